"""Configuration classes copied into original-layout checkpoints and loaded with `trust_remote_code`.

They are the minimal counterparts of OpenGVLab's `configuration_internvl_chat.py` and
`configuration_intern_vit.py`: the same class names, `model_type`s and fields, configuration only (no
modeling code: vLLM and this project bring their own).
"""
