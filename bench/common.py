"""What the service benchmarks share: test images, summary statistics, markdown tables."""

import base64
import contextlib
import io
import pathlib
import statistics
import tempfile

import numpy as np
import psutil
from PIL import Image


def photo_like_jpeg(width: int, height: int, seed: int) -> bytes:
    """A distinct photo-like JPEG per seed (distinct bytes defeat every content cache).

    Smooth gradients plus mild noise decode like a photo; pure noise would be unrealistically slow to decode.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    rgb = np.stack([128 + 100 * np.sin(x / (37 + seed % 11) + phase[0]),
                    y * 255 / height,
                    128 + 100 * np.sin(x / 40 + phase[1]) * np.cos(y / 30 + phase[2])], axis=-1)  # [h, w, 3]
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def jpeg_data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs and theirs == theirs and ours == ours else "-"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) and abs(value) < 1000 else \
            f"{value:.0f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) so far of a process and its live descendants; one that ended is lost."""
    root = psutil.Process(pid)
    used = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            used += sum(process.cpu_times()[:2])
    return used


def image_size(value: str) -> tuple[int, int]:
    """argparse type for WIDTHxHEIGHT."""
    width, _, height = value.partition("x")
    return int(width), int(height)


def work_dir(path: str | None) -> pathlib.Path:
    """Where checkpoints are built (reused across runs: a build with the same arguments is kept) and logs go."""
    directory = pathlib.Path(path) if path else pathlib.Path(tempfile.gettempdir()) / "internvl-dvd-bench"
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    return directory
