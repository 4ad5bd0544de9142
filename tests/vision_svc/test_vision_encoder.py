"""The compact encoder equals transformers' `InternVLModel.get_image_features` on tiny checkpoints.

Both layouts hold the same weights (the original one is derived from the hf one), both block styles are
covered, and the reference is always transformers' model loaded from the hf layout.
"""

import functools
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from deploy.tiny_model.weights import randomize_
from vision_svc.checkpoint import CheckpointError, hf_to_original
from vision_svc.encoder import EncoderInputError, load_encoder
from vision_svc.model_spec import VisionSpec

VISION_STYLES = {
    "6b": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
    "300m": dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True),
}
TINY_VISION = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128)
TINY_TEXT = dict(model_type="qwen2", hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=96, vocab_size=128)
# max|ours - transformers| / max|transformers|
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def random_model(vision: str, feature_layer: int = -1, seed: int = 0) -> InternVLForConditionalGeneration:
    """Random weights everywhere, norms and layer scales included (their default init is 0 or 1)."""
    config = InternVLConfig(vision_config={**TINY_VISION, **VISION_STYLES[vision]}, text_config=dict(TINY_TEXT),
                            image_token_id=100, vision_feature_layer=feature_layer)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    randomize_(model, std=0.05)
    return model


def save_hf(model: InternVLForConditionalGeneration, out_dir) -> None:
    """transformers' own files, with the weights under the current module names (`model.vision_tower.*`):
    `save_pretrained` writes the legacy hub names (`vision_tower.*`), which transformers maps on load."""
    model.save_pretrained(out_dir)
    tensors = {name: t.clone().contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def save_original(model: InternVLForConditionalGeneration, out_dir) -> None:
    """The vision stage in OpenGVLab names with an OpenGVLab-style config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_to_original(model.state_dict())
    save_file({name: t.contiguous() for name, t in tensors.items()}, out_dir / "model.safetensors")
    vision = model.config.vision_config
    config = {
        "vision_config": {
            "hidden_size": vision.hidden_size, "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
            "norm_type": vision.norm_type, "qk_normalization": vision.use_qk_norm, "qkv_bias": vision.attention_bias,
            "layer_norm_eps": vision.layer_norm_eps, "image_size": 448, "patch_size": 14, "hidden_act": "gelu",
        },
        "llm_config": {"hidden_size": model.config.text_config.hidden_size},
        "downsample_ratio": 0.5, "select_layer": model.config.vision_feature_layer, "force_image_size": 448,
        "ps_version": "v2", "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
    }
    (out_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """(vision style, feature layer) -> {"hf": dir, "original": dir}, built on first use."""
    built = {}

    def get(vision: str, feature_layer: int = -1) -> dict:
        key = (vision, feature_layer)
        if key not in built:
            root = tmp_path_factory.mktemp(f"internvl-{vision}{feature_layer}")
            model = random_model(vision, feature_layer)
            save_hf(model, root / "hf")
            save_original(model, root / "original")
            built[key] = {"hf": root / "hf", "original": root / "original"}
        return built[key]
    return get


@pytest.fixture(scope="session")
def pixel_values():
    torch.manual_seed(1)
    return torch.randn(2, 3, 448, 448)  # [tiles, 3, 448, 448]


@functools.cache
def transformers_embeddings(model_dir, pixel_values, dtype) -> torch.Tensor:
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():
        return model.get_image_features(pixel_values.to(dtype)).pooler_output.float()  # [T, 256, llm]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("vision", ["6b", "300m"])
def test_embeddings_equal_transformers(checkpoints, pixel_values, vision, layout, backend, dtype):
    dirs = checkpoints(vision)
    expected = transformers_embeddings(dirs["hf"], pixel_values, dtype)
    encoder, spec = load_encoder(dirs[layout], "cpu", dtype, backend=backend)
    with torch.inference_mode():
        ours = encoder(pixel_values)
    assert ours.shape == (2, 256, TINY_TEXT["hidden_size"]) and ours.dtype == dtype
    assert relative_error(ours, expected) <= TOLERANCE[dtype]
    assert spec.tokens_per_tile == 256 and spec.llm_hidden == TINY_TEXT["hidden_size"]


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_earlier_feature_layer_equals_transformers(checkpoints, pixel_values, layout):
    dirs = checkpoints("300m", feature_layer=-2)
    expected = transformers_embeddings(dirs["hf"], pixel_values, torch.float32)
    encoder, spec = load_encoder(dirs[layout], "cpu", torch.float32)
    assert spec.layers_used == TINY_VISION["num_hidden_layers"] - 1
    with torch.inference_mode():
        assert relative_error(encoder(pixel_values), expected) <= TOLERANCE[torch.float32]


def test_spec_is_the_same_from_both_layouts(checkpoints):
    dirs = checkpoints("6b")
    hf, original = VisionSpec.from_model_dir(dirs["hf"]), VisionSpec.from_model_dir(dirs["original"])
    assert (hf.hidden, hf.heads, hf.layers, hf.mlp, hf.norm, hf.qk_norm, hf.qkv_bias, hf.llm_hidden) == \
           (64, 2, 2, 128, "rms", True, False, 48)
    for field in ("hidden", "heads", "layers", "mlp", "norm", "eps", "qk_norm", "qkv_bias", "llm_hidden",
                  "image_size", "patch_size", "downsample_ratio", "select_layer"):
        assert getattr(hf, field) == getattr(original, field), field


def test_missing_and_leftover_tensors_are_named(checkpoints, tmp_path):
    source = checkpoints("300m")["original"]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    from safetensors.torch import load_file
    tensors = load_file(source / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.ls2"]
    tensors["vision_model.encoder.layers.9.ls1"] = torch.zeros(64)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \(1\): vision_model.encoder.layers.1.ls2.*"
                                              r"not part of the model \(1\): vision_model.encoder.layers.9.ls1"):
        load_encoder(tmp_path, "cpu", torch.float32)


def test_other_tile_sizes_are_refused(checkpoints):
    encoder, _ = load_encoder(checkpoints("300m")["hf"], "cpu", torch.float32)
    with pytest.raises(EncoderInputError, match=r"expected \[tiles, 3, 448, 448\]"):
        encoder(torch.zeros(1, 3, 224, 224))


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("vision", ["6b", "300m"])
def test_shared_tiny_checkpoints_equal_transformers(tiny_checkpoint, pixel_values, vision, layout):
    """The project's own tiny checkpoints (deploy.tiny_model): both layouts hold the same weights."""
    expected = transformers_embeddings(tiny_checkpoint(layout="hf", vision=vision), pixel_values, torch.float32)
    encoder, _ = load_encoder(tiny_checkpoint(layout=layout, vision=vision), "cpu", torch.float32)
    with torch.inference_mode():
        assert relative_error(encoder(pixel_values), expected) <= TOLERANCE[torch.float32]
