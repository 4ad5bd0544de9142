"""The language stage: chat messages or a prompt in, tokens out, on vLLM's V1 engine (`AsyncLLM`).

The engine is built without InternVL's vision tower (`limit_mm_per_prompt` 0 for every modality,
`enable_mm_embeds`), so the language devices hold no vision weights; images become embeddings in
vision_svc, fetched over gRPC once the rendered prompt has passed the engine's admission checks, and
enter the engine as `multi_modal_data`.
"""
