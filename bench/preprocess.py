"""Tiles/s of host preprocessing for a 1920x1080 JPEG (9 tiles: 4x2 grid + thumbnail): inline, on a pool of
threads and on a pool of processes, with the CPU each image costs (this process and its workers).

    python -m bench.preprocess [--images 60] [--workers 2]
"""

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import torch

from bench.common import photo_like_jpeg, tree_cpu_s
from vision_svc.image_decode import ImageLimits
from vision_svc.preprocess import PreprocessPool, preprocess_image
from vision_svc.tiling import TileOptions


def bench_single_call(data: bytes, options: TileOptions, images: int) -> tuple[float, float]:
    """Seconds and CPU seconds for `images` direct calls."""
    preprocess_image(data, ImageLimits(), options)
    started, cpu_started = time.perf_counter(), tree_cpu_s(os.getpid())
    for _ in range(images):
        preprocess_image(data, ImageLimits(), options)
    return time.perf_counter() - started, tree_cpu_s(os.getpid()) - cpu_started


async def bench_pool(images: int, workers: int, one_image: Callable[[PreprocessPool], Awaitable],
                     pool: PreprocessPool | None = None) -> tuple[float, float]:
    """Seconds and CPU seconds for `images` calls of `one_image(pool)` (default pool: `workers` processes)."""
    # Two images in flight per worker, each dropped once made, as a server that feeds an encoder would:
    # holding every result at once would measure page faults of fresh memory instead.
    in_flight = asyncio.Semaphore(2 * max(workers, 1))
    last = None

    async def run(pool: PreprocessPool) -> None:
        nonlocal last
        async with in_flight:
            last = await one_image(pool)

    with pool or PreprocessPool(workers) as pool:
        await pool.warm_up()
        await asyncio.gather(*(run(pool) for _ in range(2 * max(workers, 1))))  # this image's first runs
        started, cpu_started = time.perf_counter(), tree_cpu_s(os.getpid())
        await asyncio.gather(*(run(pool) for _ in range(images)))
        if isinstance(last, torch.Tensor) and last.device.type == "cuda":  # ready when the device says so
            torch.cuda.synchronize(last.device)
        return time.perf_counter() - started, tree_cpu_s(os.getpid()) - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60, help="images per measurement")
    parser.add_argument("--workers", type=int, default=2, help="threads or processes of the pooled runs")
    args = parser.parse_args()
    data = photo_like_jpeg(1920, 1080, seed=0)
    options = TileOptions(max_tiles=12, use_thumbnail=True)
    tiles = len(preprocess_image(data, ImageLimits(), options))

    def tiles_of(pool: PreprocessPool) -> Awaitable:
        return pool.tiles(data, options)

    rows = [
        ("direct call, one core", bench_single_call(data, options, args.images)),
        ("PreprocessPool(0), one thread", asyncio.run(bench_pool(args.images, 0, tiles_of))),
        (f"PreprocessPool({args.workers}), threads", asyncio.run(
            bench_pool(args.images, args.workers, tiles_of, PreprocessPool(args.workers, threads=True)))),
        (f"PreprocessPool({args.workers}), processes", asyncio.run(bench_pool(args.images, args.workers, tiles_of))),
    ]
    print(f"1920x1080 JPEG ({len(data)} bytes), {tiles} tiles, {args.images} images, {os.cpu_count()} CPUs")
    print(f"{'mode':<34}{'ms/image':>10}{'tiles/s':>10}{'CPU ms/image':>14}")
    for name, (seconds, cpu_seconds) in rows:
        print(f"{name:<34}{1000 * seconds / args.images:>10.1f}{tiles * args.images / seconds:>10.1f}"
              f"{1000 * cpu_seconds / args.images:>14.1f}")


if __name__ == "__main__":
    main()
