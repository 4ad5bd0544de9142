"""InternVL's chat-model configuration, as OpenGVLab's `configuration_internvl_chat.py` names it.

`vision_config` is an InternViT config; `llm_config` is the language model's own transformers config,
chosen by its `architectures` (Qwen3 dense or Qwen3-MoE for InternVL3.5).
"""

from transformers import PretrainedConfig, Qwen3Config, Qwen3MoeConfig

from .configuration_intern_vit import InternVisionConfig

_LLM_CONFIGS = {"Qwen3ForCausalLM": Qwen3Config, "Qwen3MoeForCausalLM": Qwen3MoeConfig}


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0,
                 select_layer=-1, force_image_size=None, downsample_ratio=0.5, template=None,
                 dynamic_image_size=False, use_thumbnail=False, ps_version="v1", min_dynamic_patch=1,
                 max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        vision_config = vision_config or {"architectures": ["InternVisionModel"]}
        llm_config = llm_config or {"architectures": ["Qwen3ForCausalLM"]}
        if isinstance(vision_config, dict):
            vision_config = InternVisionConfig(**vision_config)
        if isinstance(llm_config, dict):
            architecture = llm_config["architectures"][0]
            if architecture not in _LLM_CONFIGS:
                raise ValueError(f"unsupported language model architecture {architecture!r}; "
                                 f"supported: {sorted(_LLM_CONFIGS)}")
            llm_config = _LLM_CONFIGS[architecture](**llm_config)
        self.vision_config = vision_config
        self.llm_config = llm_config
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def get_text_config(self, *args, **kwargs):
        # transformers validates token ids inside `super().__init__`, before `llm_config` is set.
        return self.__dict__.get("llm_config") or super().get_text_config(*args, **kwargs)

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output
