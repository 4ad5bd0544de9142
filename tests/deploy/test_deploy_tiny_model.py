"""The tiny checkpoints: deterministic, one set of weights in two layouts, loadable by transformers and vLLM,
and vLLM's greedy tokens equal transformers' on text, on a multi-tile image and on image embeddings."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from deploy.tiny_model.build import build
from deploy.tiny_model.chat_template import DEFAULT_SYSTEM_MESSAGE
from deploy.tiny_model.weights import LANGUAGE_SHARD, VISION_SHARD, original_state_dict

QUESTION = "What is in the image?"
MAX_TOKENS = 12
# 900x500 -> a 2x1 tile grid plus the thumbnail: 3 tiles, 768 image tokens.
IMAGE_TILES = 3
IMAGE_PLACEHOLDER = {"original": "<image>", "hf": "<IMG_CONTEXT>"}


def read_tensors(checkpoint: pathlib.Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(checkpoint / shard, "pt") as f:
            tensors.update((name, f.get_tensor(name)) for name in f.keys())
    return tensors


def test_image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (500, 900, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


test_image.__test__ = False  # a helper, not a test


# ---- files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["original", "hf"])
def test_same_arguments_give_byte_identical_files(tiny_checkpoint, tmp_path, layout):
    cached = tiny_checkpoint(layout=layout)
    fresh = build(tmp_path / "again", layout=layout)
    names = sorted(p.name for p in cached.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    for name in names:
        assert (cached / name).read_bytes() == (fresh / name).read_bytes(), name


def test_another_seed_gives_other_weights(tiny_checkpoint, tmp_path):
    seed0 = read_tensors(tiny_checkpoint(layout="original"))
    seed1 = read_tensors(build(tmp_path / "seed1", layout="original", seed=1))
    assert seed0.keys() == seed1.keys()
    for name in ("vision_model.encoder.layers.0.attn.qkv.weight", "mlp1.1.weight",
                 "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert not torch.equal(seed0[name], seed1[name]), name


def test_a_complete_build_is_reused_and_an_incomplete_one_replaced(tmp_path):
    out = build(tmp_path / "ckpt")
    shard = out / VISION_SHARD
    mtime = shard.stat().st_mtime_ns
    assert build(tmp_path / "ckpt") == out and shard.stat().st_mtime_ns == mtime
    (out / "tiny_model_build.json").unlink()  # as if a build had stopped half-way
    build(tmp_path / "ckpt")
    assert (out / "tiny_model_build.json").exists() and shard.stat().st_mtime_ns != mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


@pytest.mark.parametrize("llm", ["dense", "moe"])
@pytest.mark.parametrize("vision", ["300m", "6b"])
def test_both_layouts_hold_the_same_weights(tiny_checkpoint, llm, vision):
    from transformers import InternVLForConditionalGeneration

    hf_model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint(layout="hf", llm=llm,
                                                                                vision=vision))
    expected = original_state_dict(hf_model)
    original = read_tensors(tiny_checkpoint(layout="original", llm=llm, vision=vision))
    assert sorted(original) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(original[name], tensor), name


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_vision_and_language_tensors_live_in_separate_shards(tiny_checkpoint, layout):
    weight_map = json.loads((tiny_checkpoint(layout=layout) / "model.safetensors.index.json").read_text())
    vision_prefixes = ("vision_model.", "mlp1.") if layout == "original" else ("vision_tower.",
                                                                                "multi_modal_projector.")
    for name, shard in weight_map["weight_map"].items():
        assert shard == (VISION_SHARD if name.startswith(vision_prefixes) else LANGUAGE_SHARD), name


# ---- transformers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("llm", ["dense", "moe"])
def test_original_layout_loads_through_remote_code(tiny_checkpoint, llm):
    from transformers import AutoConfig

    checkpoint = tiny_checkpoint(layout="original", llm=llm, vision="6b")
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(config).__name__ == "InternVLChatConfig" and config.template == "internvl2_5"
    assert config.llm_config.architectures == [{"dense": "Qwen3ForCausalLM", "moe": "Qwen3MoeForCausalLM"}[llm]]
    assert (config.vision_config.norm_type, config.vision_config.qk_normalization,
            config.vision_config.qkv_bias) == ("rms_norm", True, False)
    assert (config.force_image_size, config.downsample_ratio, config.ps_version, config.select_layer,
            config.max_dynamic_patch, config.use_thumbnail) == (448, 0.5, "v2", -1, 12, True)
    names = read_tensors(checkpoint).keys()
    for name in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                 "vision_model.embeddings.position_embedding", "vision_model.encoder.layers.1.attn.qkv.weight",
                 "vision_model.encoder.layers.1.attn.q_norm.weight", "vision_model.encoder.layers.1.ls1",
                 "vision_model.encoder.layers.1.norm2.weight", "vision_model.encoder.layers.1.mlp.fc2.bias",
                 "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight", "language_model.lm_head.weight",
                 "language_model.model.layers.1.self_attn.q_proj.weight", "language_model.model.norm.weight"):
        assert name in names, name
    assert not [n for n in names if not n.startswith(("vision_model.", "mlp1.", "language_model."))]


def test_chat_template_renders_internvl2_5(tiny_checkpoint):
    from transformers import AutoProcessor, AutoTokenizer

    expected = (f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n"
                f"<|im_start|>user\n{{image}}{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(layout="original"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == expected.format(image="")
    processor = AutoProcessor.from_pretrained(tiny_checkpoint(layout="hf"))
    parts = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    assert text == expected.format(image="<IMG_CONTEXT>\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_cli_help_documents_every_flag():
    result = subprocess.run([sys.executable, "-m", "deploy.tiny_model", "--help"], capture_output=True,
                            text=True, check=True)
    for flag in ("--out", "--layout", "--llm", "--vision", "--seed", "original", "moe", "6b"):
        assert flag in result.stdout


# ---- greedy parity: transformers (hf layout) vs vLLM (both layouts) -------------------------------------

class Reference:
    """transformers' greedy tokens on the hf checkpoint, the reference for both layouts."""

    def __init__(self, checkpoint: pathlib.Path):
        from transformers import AutoProcessor, InternVLForConditionalGeneration

        self.model = InternVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self._greedy: dict[bool, tuple[list[int], list[int]]] = {}

    def inputs(self, with_image: bool):
        parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": QUESTION}]
        text = self.processor.apply_chat_template([{"role": "user", "content": parts}],
                                                  add_generation_prompt=True)
        return self.processor(text=text, images=[test_image()] if with_image else None, return_tensors="pt")

    @torch.no_grad()
    def greedy(self, with_image: bool) -> tuple[list[int], list[int]]:
        """(prompt ids, generated ids)."""
        if with_image not in self._greedy:
            inputs = self.inputs(with_image)
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            prompt = inputs["input_ids"][0].tolist()
            self._greedy[with_image] = prompt, out[0, len(prompt):].tolist()
        return self._greedy[with_image]

    @torch.no_grad()
    def image_embeddings(self) -> torch.Tensor:
        pixel_values = self.inputs(with_image=True)["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return features.reshape(-1, features.shape[-1])  # [tiles * 256, llm_hidden]


@pytest.fixture(scope="module", params=[("original", "dense"), ("hf", "dense"), ("original", "moe"),
                                        ("hf", "moe")], ids=lambda p: "-".join(p))
def combo(request):
    return request.param


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    cache = {}

    def get(llm: str) -> Reference:
        if llm not in cache:
            cache[llm] = Reference(tiny_checkpoint(layout="hf", llm=llm))
        return cache[llm]

    return get


def vllm_greedy(engine, content) -> tuple[list[int], list[int]]:
    from vllm import SamplingParams

    out = engine.chat([{"role": "user", "content": content}], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                      use_tqdm=False)[0]
    return list(out.prompt_token_ids), list(out.outputs[0].token_ids)


def test_vllm_text_greedy_equals_transformers(vllm_engine, references, combo):
    layout, llm = combo
    expected_prompt, expected = references(llm).greedy(with_image=False)
    prompt, tokens = vllm_greedy(vllm_engine(layout, llm), QUESTION)
    assert prompt == expected_prompt
    assert tokens == expected and len(tokens) == MAX_TOKENS


def test_vllm_image_greedy_equals_transformers(vllm_engine, references, combo):
    layout, llm = combo
    expected_prompt, expected = references(llm).greedy(with_image=True)
    content = [{"type": "image_pil", "image_pil": test_image()}, {"type": "text", "text": QUESTION}]
    prompt, tokens = vllm_greedy(vllm_engine(layout, llm), content)
    assert prompt == expected_prompt
    assert len([t for t in prompt if t == references(llm).model.config.image_token_id]) == IMAGE_TILES * 256
    assert tokens == expected
    _, text_only = references(llm).greedy(with_image=False)
    assert tokens != text_only, "the image does not change the output: the parity check would be blind"


def test_vllm_image_embeddings_give_the_raw_image_tokens(vllm_engine, references, combo):
    from vllm import SamplingParams

    layout, llm = combo
    reference = references(llm)
    embeddings = reference.image_embeddings()
    assert embeddings.shape == (IMAGE_TILES * 256, reference.model.config.text_config.hidden_size)
    engine = vllm_engine(layout, llm)
    prompt = engine.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_PLACEHOLDER[layout]}\n{QUESTION}"}], tokenize=False,
        add_generation_prompt=True)
    out = engine.generate({"prompt": prompt, "multi_modal_data": {"image": [embeddings]}},
                          SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == reference.greedy(with_image=True)[1]
