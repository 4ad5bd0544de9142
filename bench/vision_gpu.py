"""Vision encoder on one GPU at the real InternViT sizes: parity with transformers, then tiles/s.

For each size (6B, 300M, random weights, bf16): our cuda-backend encoder against transformers'
`get_image_features` in fp32 on the same weights (ours off by at most 1.5x what transformers' own bf16 model is,
see `bf16_errors`), then tiles/s and the fraction of the matmul ceiling
(a large bf16 matmul, measured at the start on the same GPU) for transformers, our reference backend, our
cuda backend (eager) and torch.compile'd layers (inductor over the plain-torch + SDPA ops). Last, what
vision_svc runs with `--compile`: `BucketedEncoder` (whole-encoder compile, CUDA graphs up to 16 tiles) at
its graph buckets, with the compile time each shape costs at start. `--smoke` runs it all at a tiny size on CPU.
A plot of tiles/s against batch size, one panel per size, goes beside the table (`--plot`); `--plot-from LOG`
draws it again from a run's saved output.
"""

import argparse
import copy
import pathlib
import re
import time

import torch

from bench import plots
from bench.common import work_dir
from bench.vision_encoder import (SIZES, build_transformers, matmul_ceiling_tflops, ours_from, tflop_per_tile,
                                  time_interleaved, transformers_fn)
from vision_svc.encoder_compile import BucketedEncoder


def compiled_layers(encoder):
    # Compile per layer: every layer is the same code, so one graph (per batch shape) serves all of them.
    for layer in encoder.vision_model.encoder.layers:
        layer.compile()
    return encoder


Row = tuple[str, str, int, float]  # size, implementation, batch, tiles/s
ROW = re.compile(r"^\s*(\d+)  (\S.*?)\s+([\d.]+)\s+[\d.]+%\s+[\d.]+$")  # what print_rows prints


def print_rows(size: str, batch: int, seconds: dict[str, float], tflop: float, ceiling: float,
               rows: list[Row]) -> None:
    for name, s in seconds.items():
        print(f"{batch:>5}  {name:<20} {batch / s:>9.1f}  {batch * tflop / s / ceiling:>9.1%}  {1000 * s:>9.1f}",
              flush=True)
        rows.append((size, name, batch, batch / s))


def rows_from_output(text: str) -> list[Row]:
    """The rows of a run's printed tables, each under the `[size] ...` line that heads its table."""
    rows, size = [], None
    for line in text.splitlines():
        if line.startswith("["):
            size = line[1:line.index("]")]
        elif (match := ROW.match(line)) and size:
            rows.append((size, match[2], int(match[1]), float(match[3])))
    return rows


def plot(rows: list[Row], path: pathlib.Path) -> pathlib.Path:
    panels: dict[str, plots.Series] = {}
    for size, name, batch, tiles_per_s in rows:
        panels.setdefault(f"InternViT-{size.upper()}: tiles/s", {}).setdefault(name, []).append((batch, tiles_per_s))
    return plots.line_panels(path, "vision encoder, bf16: tiles/s against batch size", "tiles per call", panels,
                             log2_x=True)


def build(size: str, device: torch.device):
    """transformers' model and our encoder for the given backend, holding the same random bf16 weights."""
    hf = build_transformers(size, None, device, torch.bfloat16)
    backend = "cuda" if device.type == "cuda" else "cpu"
    return hf, ours_from(hf, torch.bfloat16, backend), backend


def bf16_errors(hf, ours, device: torch.device) -> tuple[float, float]:
    """max|x - fp32| / max|fp32| of ours and of transformers, both in bf16, against transformers in fp32 on the
    same (bf16-rounded) weights.

    Two correct bf16 implementations of a deep encoder differ from each other by about as much as each differs
    from fp32 (1-2% at 24-45 layers), so each is held to the fp32 answer: ours may be off by at most 1.5x what
    transformers' own bf16 model is.
    """
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 448, 448, device=device)
    with torch.inference_mode():
        reference = copy.deepcopy(hf).float()
        expected = transformers_fn(reference)(pixel_values).float()
        del reference
        errors = [((fn(pixel_values).float() - expected).abs().max() / expected.abs().max()).item()
                  for fn in (ours, transformers_fn(hf))]
    release(device)
    return errors[0], errors[1]


def time_implementations(size: str, device: torch.device, batches: list[int], repeats: int, ceiling: float,
                         rows: list[Row]) -> None:
    started = time.perf_counter()
    hf, ours, backend = build(size, device)
    ours_error, transformers_error = bf16_errors(hf, ours, device)
    verdict = "OK" if ours_error <= max(1e-2, 1.5 * transformers_error) else "FAIL"
    print(f"\n[{size}] built in {time.perf_counter() - started:.0f}s; parity with transformers (bf16): "
          f"relative error {ours_error:.2e} against fp32, transformers' own bf16 {transformers_error:.2e} "
          f"{verdict}; {tflop_per_tile(size):.3g} TFLOP per tile")
    fns = {
        "transformers": transformers_fn(hf),
        "ours reference": ours_from(hf, torch.bfloat16, "reference"),
        f"ours {backend}": ours,
        "ours compiled layers": compiled_layers(ours_from(hf, torch.bfloat16, "cpu")),  # device-agnostic ops + SDPA
    }
    print(f"{'batch':>5}  {'implementation':<20} {'tiles/s':>9}  {'of ceiling':>9}  {'ms/call':>9}")
    for batch in batches:
        pixel_values = torch.randn(batch, 3, 448, 448, device=device)  # [tiles, 3, 448, 448]
        print_rows(size, batch, time_interleaved(fns, pixel_values, repeats), tflop_per_tile(size), ceiling, rows)
    release(device)


def time_vision_svc_compiled(size: str, device: torch.device, buckets: list[int], repeats: int,
                             ceiling: float, rows: list[Row]) -> None:
    """What `vision_svc --compile` runs: each bucket compiled (and captured) at its first call, then replayed."""
    _, ours, _ = build(size, device)
    bucketed = BucketedEncoder(ours, tuple(buckets), device)
    print(f"\n[{size}] vision_svc --compile")
    for batch in buckets:
        pixel_values = torch.randn(batch, 3, 448, 448, device=device)
        compile_started = time.perf_counter()
        with torch.inference_mode():
            bucketed(pixel_values)
        compile_s = time.perf_counter() - compile_started
        print_rows(size, batch, time_interleaved({"vision_svc --compile": bucketed}, pixel_values, 3 * repeats),
                   tflop_per_tile(size), ceiling, rows)
        print(f"       (first call, compile + capture: {compile_s:.0f}s)", flush=True)
    release(device)


def release(device: torch.device) -> None:
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny size on CPU: checks the script, not speed")
    parser.add_argument("--sizes", nargs="+", default=["6b", "300m"], choices=sorted(SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 13, 32, 64])
    parser.add_argument("--graph-batches", type=int, nargs="+", default=[1, 13],
                        help="buckets timed through vision_svc's compiled encoder (each compiles at first call)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", type=pathlib.Path, default=work_dir(None) / "vision_gpu.png",
                        help="where the PNG of tiles/s against batch size goes")
    parser.add_argument("--plot-from", type=pathlib.Path, metavar="LOG",
                        help="only draw the plot, from the saved output of an earlier run")
    args = parser.parse_args()
    if args.plot_from:
        print(f"plot: {plot(rows_from_output(args.plot_from.read_text()), args.plot)}")
        return
    if args.smoke:
        device, sizes, batches, graph_batches, repeats = torch.device("cpu"), ["tiny"], [1, 2], [1, 2], 1
    elif torch.cuda.is_available():
        device, sizes, batches, graph_batches, repeats = (torch.device("cuda"), args.sizes, args.batches,
                                                          args.graph_batches, args.repeats)
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        raise SystemExit("no CUDA device: run with --smoke on CPU")
    ceiling = matmul_ceiling_tflops(device, torch.bfloat16, n=8192 if device.type == "cuda" else 512)
    print(f"measured bf16 matmul ceiling: {ceiling:.0f} TFLOP/s" if device.type == "cuda" else
          f"measured bf16 matmul ceiling: {ceiling * 1000:.0f} GFLOP/s")
    # Every size's eager table first: they hold the goals, the compiled path's compile time comes last.
    rows: list[Row] = []
    for size in sizes:
        time_implementations(size, device, batches, repeats, ceiling, rows)
    for size in sizes:
        time_vision_svc_compiled(size, device, graph_batches, repeats, ceiling, rows)
    print(f"\nplot: {plot(rows, args.plot)}")


if __name__ == "__main__":
    main()
