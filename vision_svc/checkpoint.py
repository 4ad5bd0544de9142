"""Reads the vision stage's tensors of an InternVL checkpoint, in either layout, and nothing else.

Two layouts exist:
- original (OpenGVLab): `vision_model.*` with a fused `attn.qkv`, projector `mlp1.{0,1,3}`, config with
  `vision_config` / `llm_config`;
- hf (transformers-native `InternVLForConditionalGeneration`): `model.vision_tower.*` with separate
  q/k/v, `model.multi_modal_projector.*`, config with `vision_config` / `text_config`.
The vision stage's own module uses the original names, so hf tensors are renamed (and q/k/v fused) here.
A 241B checkpoint is ~480 GB: only the shards that hold vision tensors are opened, and only those tensors
are read from them.
"""

import json
import pathlib
import re

import torch
from safetensors import safe_open

ORIGINAL_PREFIXES = ("vision_model.", "mlp1.")
# transformers saves the legacy names (no `model.` prefix) and loads both; so do we.
HF_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")

# hf name (after the `model.vision_tower.` prefix) -> original name (after `vision_model.`)
_HF_TO_ORIGINAL_RULES = [
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"^encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.layers.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.", r"encoder.layers.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.lambda_1$", r"encoder.layers.\1.ls1"),
    (r"^encoder\.layer\.(\d+)\.lambda_2$", r"encoder.layers.\1.ls2"),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]
_HF_PROJECTOR = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


class CheckpointError(ValueError):
    """The checkpoint directory is not an InternVL checkpoint this project can serve."""


def read_config(model_dir: pathlib.Path) -> dict:
    path = pathlib.Path(model_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json")
    return json.loads(path.read_text())


def detect_layout(config: dict) -> str:
    """'original' (`llm_config`) or 'hf' (`text_config`)."""
    if "vision_config" in config and "llm_config" in config:
        return "original"
    if "vision_config" in config and "text_config" in config:
        return "hf"
    raise CheckpointError("config.json has neither vision_config+llm_config (original) nor "
                          "vision_config+text_config (hf): not an InternVL checkpoint")


def _shards_by_tensor(model_dir: pathlib.Path) -> dict[str, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return {name: single.name for name in f.keys()}


def read_vision_tensors(model_dir: pathlib.Path | str) -> dict[str, torch.Tensor]:
    """The vision tower's and projector's tensors, in original names, read from their shards only."""
    model_dir = pathlib.Path(model_dir)
    layout = detect_layout(read_config(model_dir))
    prefixes = ORIGINAL_PREFIXES if layout == "original" else HF_PREFIXES
    wanted: dict[str, list[str]] = {}
    for name, shard in _shards_by_tensor(model_dir).items():
        if name.startswith(prefixes):
            wanted.setdefault(shard, []).append(name)
    if not wanted:
        raise CheckpointError(f"{model_dir}: no tensor starts with {' or '.join(prefixes)}")
    tensors = {}
    for shard, names in wanted.items():
        with safe_open(model_dir / shard, "pt") as f:
            tensors.update((name, f.get_tensor(name)) for name in names)
    if layout == "original":
        return tensors
    return hf_to_original({name if name.startswith("model.") else f"model.{name}": t for name, t in tensors.items()})


def hf_to_original(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames hf-layout vision and projector tensors to the original layout; fuses q/k/v into qkv.

    Other tensors (the language model's) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if name.startswith("model.multi_modal_projector."):
            module, param = name.removeprefix("model.multi_modal_projector.").split(".", 1)
            out[f"mlp1.{_HF_PROJECTOR[module]}.{param}"] = tensor
            continue
        if not name.startswith("model.vision_tower."):
            continue
        rest = name.removeprefix("model.vision_tower.")
        if match := _HF_QKV.match(rest):
            layer, which, param = match.groups()
            qkv_parts.setdefault((layer, param), {})[which] = tensor
            continue
        for pattern, replacement in _HF_TO_ORIGINAL_RULES:
            if re.match(pattern, rest):
                out["vision_model." + re.sub(pattern, replacement, rest)] = tensor
                break
        # Anything else (e.g. a final `layernorm` that InternVL configs disable) has no original counterpart.
    for (layer, param), parts in qkv_parts.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out
