"""Vision encoder on one GPU at the real InternViT sizes: parity with transformers, then tiles/s.

For each size (6B, 300M, random weights, bf16): our cuda-backend encoder against transformers'
`get_image_features` (max|a-b| / max|ref| <= 1e-2), then tiles/s and the fraction of the matmul ceiling for
transformers, our reference backend, our cuda backend (eager) and torch.compile'd layers (inductor over the
plain-torch + SDPA ops). `--smoke` runs the same steps at a tiny size on CPU.
"""

import argparse
import time

import torch

from bench.vision_encoder import SIZES, build_transformers, ours_from, time_interleaved, transformers_fn

MATMUL_CEILING_TFLOPS = 773.0  # H200 dense bf16


def compiled(encoder):
    # Compile per layer: every layer is the same code, so one graph (per batch shape) serves all of them.
    for layer in encoder.vision_model.encoder.layers:
        layer.compile()
    return encoder


def run_size(size: str, device: torch.device, batches: list[int], repeats: int, layers: int | None) -> None:
    started = time.perf_counter()
    hf = build_transformers(size, layers, device, torch.bfloat16)
    backend = "cuda" if device.type == "cuda" else "cpu"
    ours = ours_from(hf, torch.bfloat16, backend)
    torch.manual_seed(1)
    with torch.inference_mode():
        pixel_values = torch.randn(2, 3, 448, 448, device=device)
        expected = transformers_fn(hf)(pixel_values).float()
        error = ((ours(pixel_values).float() - expected).abs().max() / expected.abs().max()).item()
    print(f"\n[{size}] built in {time.perf_counter() - started:.0f}s; parity with transformers (bf16): "
          f"relative error {error:.2e} {'OK' if error <= 1e-2 else 'FAIL'}")
    fns = {
        "transformers": transformers_fn(hf),
        "ours reference": ours_from(hf, torch.bfloat16, "reference"),
        f"ours {backend}": ours,
        "ours compiled": compiled(ours_from(hf, torch.bfloat16, "cpu")),  # device-agnostic torch ops + SDPA
    }
    tflop = SIZES[size]["tflop_per_tile"] * (layers or SIZES[size]["vision"]["num_hidden_layers"]) / \
        SIZES[size]["vision"]["num_hidden_layers"]
    print(f"{'batch':>5}  {'implementation':<16} {'tiles/s':>9}  {'of ceiling':>10}")
    for batch in batches:
        pixel_values = torch.randn(batch, 3, 448, 448, device=device)  # [tiles, 3, 448, 448]
        for name, seconds in time_interleaved(fns, pixel_values, repeats).items():
            tiles_per_s = batch / seconds
            print(f"{batch:>5}  {name:<16} {tiles_per_s:>9.1f}  {tiles_per_s * tflop / MATMUL_CEILING_TFLOPS:>9.1%}",
                  flush=True)
    del fns, hf, ours
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny size on CPU: checks the script, not speed")
    parser.add_argument("--sizes", nargs="+", default=["6b", "300m"], choices=sorted(SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 13, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.smoke:
        run_size("tiny", torch.device("cpu"), batches=[1, 2], repeats=1, layers=None)
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for size in args.sizes:
        run_size(size, torch.device("cuda"), args.batches, args.repeats, layers=None)


if __name__ == "__main__":
    main()
