"""The tiny checkpoint's geometry: real InternVL3.5 image geometry, tiny widths.

One transformers `InternVLConfig` describes the model; the original layout's config.json is derived from
it, so both layouts always describe the same network.
"""

from transformers import InternVLConfig

IMAGE_SIZE = 448
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5
TOKENS_PER_TILE = int((IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO ** 2)  # 256
MIN_DYNAMIC_PATCH = 1
MAX_DYNAMIC_PATCH = 12
LAYER_NORM_EPS = 1e-6
LAYER_SCALE = 0.1

VISION_KINDS = ("300m", "6b")
LLM_KINDS = ("dense", "moe")

# Head dim 64: one of the head sizes vLLM's CPU attention supports. Vision heads are 32 wide.
_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
               image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, layer_norm_eps=LAYER_NORM_EPS,
               layer_scale_init_value=LAYER_SCALE, hidden_act="gelu", use_mean_pooling=True)
_VISION_BLOCK = {
    "300m": dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True),
    "6b": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
}
_TEXT = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False,
             hidden_act="silu", attention_bias=False)
_TEXT_MLP = {
    "dense": dict(model_type="qwen3", intermediate_size=512),
    "moe": dict(model_type="qwen3_moe", intermediate_size=512, moe_intermediate_size=128, num_experts=4,
                num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}
_TEXT_ARCHITECTURE = {"dense": "Qwen3ForCausalLM", "moe": "Qwen3MoeForCausalLM"}


def hf_config(llm: str, vision: str, vocab_size: int, special_ids: dict[str, int]) -> InternVLConfig:
    if llm not in LLM_KINDS or vision not in VISION_KINDS:
        raise ValueError(f"llm must be one of {LLM_KINDS} and vision one of {VISION_KINDS}, "
                         f"got llm={llm!r} vision={vision!r}")
    text = dict(_TEXT, **_TEXT_MLP[llm], vocab_size=vocab_size, architectures=[_TEXT_ARCHITECTURE[llm]],
                eos_token_id=special_ids["<|im_end|>"], pad_token_id=special_ids["<|endoftext|>"],
                bos_token_id=None)
    return InternVLConfig(
        vision_config=dict(_VISION, **_VISION_BLOCK[vision]),
        text_config=text,
        image_token_id=special_ids["<IMG_CONTEXT>"],
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def original_config(config: InternVLConfig) -> dict:
    """config.json of the OpenGVLab layout for the same network, read through `auto_map` remote code."""
    v = config.vision_config
    text = config.text_config.to_dict()
    for key in ("transformers_version", "dtype", "_name_or_path"):
        text.pop(key, None)
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        },
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "hidden_act": v.hidden_act,
            "norm_type": v.norm_type,
            "qk_normalization": v.use_qk_norm,
            "qkv_bias": v.attention_bias,
            "layer_norm_eps": v.layer_norm_eps,
            "initializer_factor": v.layer_scale_init_value,
            "initializer_range": v.initializer_range,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "use_flash_attn": False,
        },
        "llm_config": text,
        "template": "internvl2_5",
        "select_layer": config.vision_feature_layer,
        "downsample_ratio": config.downsample_ratio,
        "force_image_size": IMAGE_SIZE,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": MIN_DYNAMIC_PATCH,
        "max_dynamic_patch": MAX_DYNAMIC_PATCH,
        "ps_version": "v2",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
