"""CPU speed of the compact vision encoder against transformers' InternVL, same weights, same run.

    python -m bench.vision_encoder                 # InternViT-300M width, 2 of its 24 layers, batch 1 and 8
    python -m bench.vision_encoder --layers 24     # the whole encoder (slow on a small CPU)

Prints tiles/s per implementation and dtype, ours over transformers, and the fraction of this CPU's matmul
ceiling (a large matmul in the same dtype and threads, measured in the same run) that the encoder's FLOPs
reach. Runs are interleaved (one timed call of each in turn) and the median kept, so a noisy shared machine
slows all rows alike.
"""

import argparse
import statistics
import time

import torch
from transformers import InternVLConfig, InternVLModel

from deploy.tiny_model.weights import randomize_
from vision_svc.checkpoint import hf_to_original
from vision_svc.encoder import InternVisionEncoder, build_encoder
from vision_svc.model_spec import VisionSpec

# Real InternViT sizes (and the LLM width their projector feeds); "tiny" is for smoke runs.
SIZES = {
    "6b": dict(vision=dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
                           norm_type="rms_norm", use_qk_norm=True, attention_bias=False), llm_hidden=5120),
    "300m": dict(vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                             norm_type="layer_norm", use_qk_norm=False, attention_bias=True), llm_hidden=2048),
    "tiny": dict(vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                             norm_type="rms_norm", use_qk_norm=True, attention_bias=False), llm_hidden=48),
}
PATCHES, PATCH_PIXELS = 1024, 3 * 14 * 14  # a 448 px tile: 32 x 32 patches of 14 x 14
TOKENS = PATCHES + 1  # + the class token


def tflop_per_tile(size: str, layers: int | None = None) -> float:
    """Matmul and attention TFLOP of one 448 px tile through `layers` encoder layers and the projector.

    6B: 12.0 TFLOP, 300M: 0.73 (the issue's figures); norms and activations are left out (under 1%).
    """
    vision, llm = SIZES[size]["vision"], SIZES[size]["llm_hidden"]
    d, mlp = vision["hidden_size"], vision["intermediate_size"]
    layers = layers or vision["num_hidden_layers"]
    per_layer = 2 * TOKENS * (4 * d * d + 2 * d * mlp) + 4 * TOKENS * TOKENS * d  # qkv + out + MLP, QK^T + PV
    patch_embed = 2 * PATCHES * PATCH_PIXELS * d
    projector = 2 * (PATCHES // 4) * (4 * d * llm + llm * llm)  # after pixel shuffle: 256 tokens of width 4d
    return (layers * per_layer + patch_embed + projector) / 1e12


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """TFLOP/s of a large square matmul: what the encoder's matmuls could reach at best here."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = time_interleaved({"matmul": lambda _: a @ b}, a, repeats)["matmul"]
    return 2 * n ** 3 / seconds / 1e12


def build_transformers(size: str, layers: int | None, device: torch.device, dtype: torch.dtype,
                       seed: int = 0) -> InternVLModel:
    """transformers' model with random weights (norms and layer scales included), made on `device` directly."""
    vision = dict(SIZES[size]["vision"])
    vision["num_hidden_layers"] = layers or vision["num_hidden_layers"]
    llm_hidden = SIZES[size]["llm_hidden"]
    text = dict(model_type="qwen2", hidden_size=llm_hidden, num_hidden_layers=1, num_attention_heads=8,
                num_key_value_heads=8, intermediate_size=64, vocab_size=128)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=100)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InternVLModel(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    randomize_(model, std=0.02, language_model=False)
    return model


def ours_from(model: InternVLModel, dtype: torch.dtype, backend: str | None) -> InternVisionEncoder:
    """The compact encoder holding the same weights as transformers' `model`."""
    spec = VisionSpec.from_config(model.config.to_dict())
    tensors = hf_to_original({f"model.{name}": t for name, t in model.state_dict().items()})
    return build_encoder(spec, tensors, next(model.parameters()).device, dtype, backend)


def transformers_fn(model: InternVLModel):
    """[tiles, 256, llm_hidden] from transformers, whichever shape its version returns (the GPU host's may differ)."""
    def image_features(pixel_values: torch.Tensor) -> torch.Tensor:
        features = model.get_image_features(pixel_values)
        features = getattr(features, "pooler_output", features)  # a plain tensor before transformers 5
        return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features

    return image_features


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, pixel_values: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn; one warm-up call each, then the calls alternate."""
    device = pixel_values.device
    samples = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(pixel_values)
        for _ in range(repeats):
            for name, fn in fns.items():
                synchronize(device)
                start = time.perf_counter()
                fn(pixel_values)
                synchronize(device)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="300m", help="encoder width (real sizes)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers to build (default 2 of 24)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="tiles per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation and batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    hf32 = build_transformers(args.size, args.layers, cpu, torch.float32)
    hf16 = build_transformers(args.size, args.layers, cpu, torch.bfloat16)
    fns = {
        "transformers fp32": transformers_fn(hf32),
        "transformers bf16": transformers_fn(hf16),
        "ours cpu fp32": ours_from(hf32, torch.float32, "cpu"),
        "ours cpu bf16": ours_from(hf32, torch.bfloat16, "cpu"),
    }
    ceilings = {dtype: matmul_ceiling_tflops(cpu, getattr(torch, dtype), n=2048, repeats=5)
                for dtype in ("float32", "bfloat16")}
    tflop = tflop_per_tile(args.size, args.layers)
    print(f"InternViT-{args.size} width, {args.layers} layers ({tflop * 1000:.1f} GFLOP per tile), "
          f"{torch.get_num_threads()} threads; matmul ceiling: fp32 {ceilings['float32'] * 1000:.0f}, "
          f"bf16 {ceilings['bfloat16'] * 1000:.0f} GFLOP/s")
    print(f"{'batch':>5}  {'implementation':<18} {'tiles/s':>8}  {'vs transformers fp32':>20}  "
          f"{'vs transformers same dtype':>26}  {'of ceiling':>10}")
    for batch in args.batches:
        pixel_values = torch.randn(batch, 3, 448, 448)  # [tiles, 3, 448, 448]
        seconds = time_interleaved(fns, pixel_values, args.repeats)
        for name, s in seconds.items():
            dtype = name.split()[-1]
            ceiling = ceilings["float32" if dtype == "fp32" else "bfloat16"]
            print(f"{batch:>5}  {name:<18} {batch / s:>8.2f}  {seconds['transformers fp32'] / s:>19.2f}x  "
                  f"{seconds['transformers ' + dtype] / s:>25.2f}x  {batch * tflop / s / ceiling:>10.0%}")


if __name__ == "__main__":
    main()
