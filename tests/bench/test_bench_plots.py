"""The benchmarks' plots: drawn from the rows their tables print, written as PNGs a reader can open."""

from PIL import Image

from bench.e2e import SYSTEMS, WORKLOADS, Summary, plot_sweep
from bench.plots import bars
from bench.vision_gpu import plot, print_rows, rows_from_output


def test_vision_gpu_rows_read_back_from_its_printed_table(capsys):
    rows = []
    print("\n[6b] built in 4s; parity with transformers (bf16): ...")
    print_rows("6b", 13, {"transformers": 0.35, "vision_svc --compile": 0.27}, tflop=12.0, ceiling=787.0, rows=rows)
    printed = capsys.readouterr().out
    assert rows_from_output(printed) == [(s, n, b, round(t, 1)) for s, n, b, t in rows]
    assert {name for _, name, _, _ in rows} == {"transformers", "vision_svc --compile"}


def test_plots_are_pngs_of_the_points(tmp_path):
    path = plot([("6b", "ours cuda", 1, 48.6), ("6b", "ours cuda", 13, 48.5), ("300m", "ours cuda", 1, 84.2)],
                tmp_path / "vision.png")
    assert Image.open(path).format == "PNG"
    summary = Summary(requests_per_s=2.0, output_tokens_per_s=64.0, ttft_p50_ms=50.0, ttft_p99_ms=80.0,
                      tpot_p50_ms=4.0, prompt_tokens=200)
    sweep = {c: {s: dict.fromkeys(WORKLOADS, summary) for s in SYSTEMS} for c in (1, 2, 4)}
    assert Image.open(plot_sweep(sweep, tmp_path / "e2e.png")).size[0] > 800  # two panels side by side
    assert Image.open(bars(tmp_path / "bars.png", "transfer", "GB/s", {"grpc": 0.5, "shm": 8.0})).format == "PNG"
