"""Tiles/s of host vs device preprocessing for a 1920x1080 JPEG (9 tiles: 4x2 grid + thumbnail).

    python -m bench.preprocess_device [--images 30] [--device cpu|cuda] [--threads N]

host:   decode + Pillow resize + numpy normalize, one call per image (`vision_svc.preprocess.preprocess_image`).
device: decode on the host, then upload + resize + tile + normalize on --device
        (`vision_svc.device_preprocess.image_tiles_on_device`), timed to the device's completion; the
        device step alone is also reported, as it is what leaves the preprocessing workers' cores.
device decode: torchvision's decode_jpeg on --device (nvJPEG on CUDA), then the same device step.
Wall time and CPU time of this process are both reported: on a shared machine, tiles per CPU-second is the
steadier figure of what a path costs a core. Then what one replica sustains: vision_svc's pools as the server
runs them (`--workers` decoding processes), two images in flight per worker, to the device's completion.
Last, a correctness check: the pool's tiles while the device is busy as under an encoder.
"""

import argparse
import asyncio
import threading
import time

import numpy as np
import torch

from bench.common import photo_like_jpeg
from bench.preprocess import bench_pool
from vision_svc.device_preprocess import (DevicePreprocessPool, decode_jpeg_on_device, image_tiles_on_device,
                                          pixels_to_tiles)
from vision_svc.image_decode import ImageLimits, decode_image
from vision_svc.preprocess import PreprocessPool, preprocess_image
from vision_svc.tiling import TileOptions


def timed(step, images: int, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds per image of `step()`, after one untimed call (allocator and kernel warm-up)."""
    step()
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(images):
        step()
    _sync(device)
    return (time.perf_counter() - wall) / images, (time.process_time() - cpu) / images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_decode_parity(data: bytes, limits: ImageLimits, device: torch.device) -> None:
    """How far the device's JPEG decoder lands from Pillow's (libjpeg-turbo), in 8-bit levels."""
    expected = torch.from_numpy(np.array(decode_image(data, limits))).permute(2, 0, 1).int()  # [3, H, W]
    got = decode_jpeg_on_device(data, limits, device).cpu().int()
    diff = (got - expected).abs().float()
    print(f"{device.type} JPEG decode vs Pillow: max {diff.max():.0f} levels, mean {diff.mean():.3f}, "
          f"{(diff > 0).float().mean():.2%} of values differ")


def check_under_load(limits: ImageLimits, options: TileOptions, device: torch.device, dtype: torch.dtype,
                     images: int = 16) -> None:
    """The pool's tiles (device decode) while another thread keeps the device busy as the encoder does, queueing
    long matmuls and freeing their memory with work still queued: each image's tiles must equal those made on
    an idle device. Streams or allocator blocks shared by mistake would show here as differing tiles."""
    datas = [photo_like_jpeg(1920, 1080, seed=100 + n) for n in range(images)]
    expected = [pixels_to_tiles(decode_jpeg_on_device(d, limits, device), options, dtype).cpu() for d in datas]
    stop = threading.Event()

    def encoder_like_load() -> None:
        while not stop.is_set():
            x = torch.randn(4096, 4096, device=device, dtype=dtype)
            (x @ x @ x).sum()  # queued; the products' memory is freed at once, with the work still queued
            del x

    async def run() -> list[torch.Tensor]:
        with DevicePreprocessPool(0, limits, device, dtype, decode_on_device=True) as pool:  # JPEGs: no workers
            await pool.warm_up()
            return [t.cpu() for t in await asyncio.gather(*(pool.tiles(d, options) for d in datas))]

    load = threading.Thread(target=encoder_like_load) if device.type != "cpu" else None
    if load:
        load.start()
    try:
        got = asyncio.run(run())
    finally:
        stop.set()
        if load:
            load.join()
    same = sum(torch.equal(g, e) for g, e in zip(got, expected))
    print(f"\nunder an encoder-like load{'' if load else ' (none on a cpu)'}: {same} of {images} images' tiles "
          f"equal to those made on an idle device{'' if same == images else '  <-- FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=30, help="images per measurement")
    parser.add_argument("--device", default="cpu", help="device of the device path: cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the pooled runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    data = photo_like_jpeg(1920, 1080, seed=0)
    limits, options = ImageLimits(), TileOptions(max_tiles=12, use_thumbnail=True)
    image = decode_image(data, limits)
    tiles = len(image_tiles_on_device(image, options, device, dtype))
    rows = [
        ("host: decode + Pillow + normalize", timed(lambda: preprocess_image(data, limits, options), args.images,
                                                    torch.device("cpu"))),
        ("host decode only", timed(lambda: decode_image(data, limits), args.images, torch.device("cpu"))),
        (f"{device.type}: resize + tile + normalize", timed(lambda: image_tiles_on_device(image, options, device,
                                                                                          dtype), args.images, device)),
        (f"decode + {device.type} step", timed(lambda: image_tiles_on_device(decode_image(data, limits), options,
                                                                             device, dtype), args.images, device)),
        (f"{device.type} decode + {device.type} step",
         timed(lambda: pixels_to_tiles(decode_jpeg_on_device(data, limits, device), options, dtype), args.images,
               device)),
    ]
    print(f"1920x1080 JPEG ({len(data)} bytes), {tiles} tiles, {args.images} images, device {device} ({dtype}), "
          f"{torch.get_num_threads()} torch threads")
    print_decode_parity(data, limits, device)
    print(f"{'path':<40}{'ms/image':>10}{'tiles/s':>10}{'CPU ms/image':>14}{'tiles/CPU-s':>13}")
    for name, (wall, cpu) in rows:
        print(f"{name:<40}{1000 * wall:>10.1f}{tiles / wall:>10.1f}{1000 * cpu:>14.1f}{tiles / cpu:>13.1f}")
    print(f"\none replica's pools, {args.workers} decoding processes, {2 * args.images} images")
    print(f"{'pool':<40}{'ms/image':>10}{'tiles/s':>10}")
    pools = [
        ("decode only, images back to the server", PreprocessPool(args.workers, limits),
         lambda pool: pool.in_worker(decode_image, data, limits)),
        (f"decode on host, tile on {device.type}", DevicePreprocessPool(args.workers, limits, device, dtype),
         lambda pool: pool.tiles(data, options)),
        (f"decode on {device.type}, tile on {device.type}",
         DevicePreprocessPool(args.workers, limits, device, dtype, decode_on_device=True),
         lambda pool: pool.tiles(data, options)),
    ]
    for name, pool, one_image in pools:
        seconds, _ = asyncio.run(bench_pool(2 * args.images, args.workers, one_image, pool))
        print(f"{name:<40}{1000 * seconds / (2 * args.images):>10.1f}{tiles * 2 * args.images / seconds:>10.1f}")
    check_under_load(limits, options, device, dtype)


if __name__ == "__main__":
    main()
