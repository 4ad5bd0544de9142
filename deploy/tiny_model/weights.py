"""The tiny checkpoint's weights: one seeded random model, written in either layout, in two shards.

The transformers-native model is the single source of the weights; the original layout is a renaming of
its state dict (vision + projector by `vision_svc.checkpoint.hf_to_original`, the language model here), so
a seed gives the same weights in both layouts.
"""

import json
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

from vision_svc.checkpoint import hf_to_original

# Random init gives logits of std ~0.3; scaled, std ~13, so fp32 margins dwarf the noise of other kernels
# and summation orders. It does not change relative margins, which bf16 compute disturbs: run parity in fp32.
LM_HEAD_SCALE = 40.0

VISION_SHARD = "model-00001-of-00002.safetensors"
LANGUAGE_SHARD = "model-00002-of-00002.safetensors"
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.", "vision_model.", "mlp1.")


def random_model(config: InternVLConfig, seed: int) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


def add_token_rows(model: InternVLForConditionalGeneration, vocab_size: int, seed: int) -> None:
    """Grows the vocabulary to `vocab_size` without changing a weight already drawn: the new tokens' embeddings
    come from a generator of their own, their LM-head rows are zero (a logit of 0: never the likeliest token)."""
    old_size = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        rows = torch.randn(vocab_size - old_size, embeddings.shape[1], generator=generator) * embeddings.std()
        embeddings[old_size:] = rows.to(embeddings.dtype)
        model.lm_head.weight[old_size:] = 0.0


def randomize_(model: torch.nn.Module, std: float, language_model: bool = True) -> None:
    """Random values in place, norms and layer scales included: their default init (0 or 1) would hide a
    mistake in how they are applied. The language model is left alone unless `language_model`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model." in name and not language_model:
                continue
            if name.endswith(("lambda_1", "lambda_2")):
                param.uniform_(0.05, 0.5)
            elif "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, std)


def original_state_dict(model: InternVLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's tensors under OpenGVLab's names."""
    hf = model.state_dict()
    out = hf_to_original(hf)
    for name, tensor in hf.items():
        if name.startswith("model.language_model."):
            out["language_model.model." + name.removeprefix("model.language_model.")] = tensor
        elif name == "lm_head.weight":
            out["language_model.lm_head.weight"] = tensor
    return out


def write_shards(tensors: dict[str, torch.Tensor], out_dir: pathlib.Path) -> None:
    """Vision + projector in one shard, the language model in the other, and the index that maps them.

    The split lets the vision service open only the vision shard.
    """
    shards: dict[str, dict[str, torch.Tensor]] = {VISION_SHARD: {}, LANGUAGE_SHARD: {}}
    for name, tensor in tensors.items():
        shard = VISION_SHARD if name.startswith(_VISION_PREFIXES) else LANGUAGE_SHARD
        shards[shard][name] = tensor.detach().contiguous()
    for shard, shard_tensors in shards.items():
        save_file(shard_tensors, str(out_dir / shard), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: shard for shard, names in shards.items() for name in sorted(names)},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def reshard_saved(out_dir: pathlib.Path) -> None:
    """Splits the single `model.safetensors` that `save_pretrained` wrote into the two shards."""
    single = out_dir / "model.safetensors"
    with safe_open(single, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    single.unlink()
    write_shards(tensors, out_dir)
