"""vision_svc under concurrent load against transformers' `get_image_features`, same checkpoint, same tiles.

    python -m bench.vision                                  # tiny checkpoint, CPU (~1 minute)
    python -m bench.vision --size 300m                      # InternViT-300M widths, few images on a CPU
    python -m bench.vision --size 300m --device cuda --images 256 --clients 16
    python -m bench.vision --size 300m --device cuda --images 256 --clients 16 --decode-on-device

vision_svc runs as its own process (the real server, started as `deploy.local` does) and N concurrent clients
(llm_svc's `VisionClient`) each send one image per request, distinct images, so the cache never hits. The
reference is transformers' `InternVLModel.get_image_features` on the hf-layout checkpoint, fed the same tiles
in batches of vision_svc's `--max-batch-tiles`: the encoder alone, no serving around it. Preprocessing
(decode + tiling + normalize) is timed inline on one core and through vision_svc's pool. The service
and the reference alternate in rounds, so drifting background load reaches both.
"""

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import time

import torch
from transformers import InternVLModel

from bench.common import image_size, markdown_table, percentile, photo_like_jpeg, ratio, work_dir
from deploy.local import Stage, free_port, vision_stage
from deploy.tiny_model import configs, weights
from deploy.tiny_model.build import build
from deploy.tiny_model.chat_template import chat_template
from deploy.tiny_model.processor import write_processor
from deploy.tiny_model.tokenizer import write_tokenizer
from llm_svc.vision_client import ImageBlob, VisionClient
from vision_svc.image_decode import ImageLimits
from vision_svc.model_spec import VisionSpec
from vision_svc.preprocess import PreprocessPool, preprocess_image
from vision_svc.server import preprocess_in_threads
from vision_svc.tiling import TileOptions

MiB = 1 << 20
# InternViT-300M (InternVL3.5 1B..30B); the language model stays tiny, only its width shapes the projector.
INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def build_checkpoint(size: str, directory: pathlib.Path) -> pathlib.Path:
    """The hf-layout checkpoint both sides load: the tiny one, or the tiny one with InternViT-300M vision sizes."""
    if size == "tiny":
        return build(directory / "tiny-hf", layout="hf")
    out = directory / "internvit-300m-hf"
    stamp = out / "bench_build.json"
    if stamp.exists() and json.loads(stamp.read_text()) == INTERNVIT_300M:
        return out
    out.mkdir(parents=True, exist_ok=True)
    special_ids = write_tokenizer(out, chat_template("hf"))
    config = configs.hf_config("dense", "300m", max(special_ids.values()) + 1, special_ids)
    for name, value in INTERNVIT_300M.items():
        setattr(config.vision_config, name, value)
    model = weights.random_model(config, seed=0)
    model.save_pretrained(out)
    weights.reshard_saved(out)  # vision tensors in a shard of their own, as vision_svc expects
    write_processor(out)
    stamp.write_text(json.dumps(INTERNVIT_300M))
    return out


def distinct_images(count: int, size: tuple[int, int], first_seed: int) -> list[bytes]:
    return [photo_like_jpeg(*size, seed=first_seed + n) for n in range(count)]


async def load_service(address: str, images: list[bytes], clients: int) -> tuple[list[float], float, int]:
    """Per-image latencies, wall seconds and tiles encoded, `clients` requests in flight, one image each."""
    client = VisionClient([address], 64 * MiB, 1 << 30)
    queue = list(reversed(images))
    latencies, tiles = [], 0

    async def client_loop():
        nonlocal tiles
        while queue:
            data = queue.pop()
            started = time.perf_counter()
            [result] = await client.encode(f"bench-{len(queue)}", [ImageBlob(hashlib.sha256(data).hexdigest(), data)],
                                           max_tiles=0, timeout_s=3600)
            latencies.append(time.perf_counter() - started)
            tiles += result.num_tiles
            assert not result.cache_hit, "a distinct image hit the cache"

    try:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        return latencies, time.perf_counter() - started, tiles
    finally:
        await client.close()


def preprocess_inline(images: list[bytes], options: TileOptions) -> tuple[torch.Tensor, float]:
    """All tiles [total_tiles, 3, S, S] of `images` and the seconds it took on this one core."""
    started = time.perf_counter()
    tiles = torch.cat([preprocess_image(data, ImageLimits(), options) for data in images])
    return tiles, time.perf_counter() - started


async def preprocess_pooled(images: list[bytes], options: TileOptions, workers: int, threads: bool) -> float:
    with PreprocessPool(workers, threads=threads) as pool:
        await pool.warm_up()
        started = time.perf_counter()
        await asyncio.gather(*(pool.tiles(data, options) for data in images))
        return time.perf_counter() - started


def load_reference(model_dir: pathlib.Path, device: torch.device, dtype: torch.dtype) -> InternVLModel:
    return InternVLModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def time_reference(model: InternVLModel, tiles: torch.Tensor, batch: int, device: torch.device,
                   dtype: torch.dtype) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(tiles), batch):
            pixel_values = tiles[start:start + batch].to(device, dtype)  # [<=batch, 3, S, S]
            model.get_image_features(pixel_values).pooler_output.cpu()
    return time.perf_counter() - started


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # vision_svc's own default
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "300m"), default="tiny",
                        help="vision encoder: the tiny checkpoint's, or InternViT-300M's widths and depth")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i] (vision_svc and the reference)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16; auto: vision_svc's default")
    parser.add_argument("--work-dir", default=None, help="where checkpoints and logs go (checkpoints are reused)")
    # Defaults shrink for the 300M encoder on a CPU, where one tile takes seconds.
    parser.add_argument("--images", type=int, default=None, help="timed images per round (default 32; 300m on cpu: 4)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default 4; 300m on cpu: 2)")
    parser.add_argument("--image-size", type=image_size, default=None,
                        help="WIDTHxHEIGHT (default 1280x720: 6 tiles + thumbnail; 300m on cpu: 448x448, 1 tile)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2; 300m on cpu: 1)")
    parser.add_argument("--max-batch-tiles", type=int, default=None,
                        help="vision_svc's batch and the reference's (default 32; 300m on cpu: 2)")
    parser.add_argument("--preprocess-workers", type=int, default=2, help="vision_svc's preprocessing workers")
    parser.add_argument("--decode-on-device", action="store_true",
                        help="vision_svc with --preprocess-on device --decode-on device (JPEGs decoded by nvJPEG)")
    args = parser.parse_args()
    small = args.size == "300m" and args.device == "cpu"
    for name, default, default_small in (("images", 32, 4), ("clients", 4, 2), ("image_size", (1280, 720), (448, 448)),
                                         ("rounds", 2, 1), ("max_batch_tiles", 32, 2)):
        if getattr(args, name) is None:
            setattr(args, name, default_small if small else default)
    return args


def main() -> None:
    args = parse_args()
    directory = work_dir(args.work_dir)
    started = time.perf_counter()
    model_dir = build_checkpoint(args.size, directory)
    spec = VisionSpec.from_model_dir(model_dir)
    options = TileOptions(max_tiles=spec.max_dynamic_patch, use_thumbnail=spec.use_thumbnail,
                          image_size=spec.image_size, min_tiles=spec.min_dynamic_patch)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"{model_dir.name}: InternViT {spec.hidden} wide, {spec.layers} layers; {device}, {dtype}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    stage = vision_stage(model_dir, free_port(), [
        "--device", args.device, "--dtype", str(dtype).removeprefix("torch."), "--grace-s", "2",
        "--max-batch-tiles", str(args.max_batch_tiles), "--preprocess-workers", str(args.preprocess_workers),
        "--max-queue-tiles", str(max(1024, args.max_batch_tiles)),
        *(["--preprocess-on", "device", "--decode-on", "device"] if args.decode_on_device else [])],
        directory / "logs" / "vision-bench.log")
    try:
        reference = load_reference(model_dir, device, dtype)
        stage.wait_ready(timeout_s=3600)
        print(f"ready after {time.perf_counter() - started:.0f} s", flush=True)
        print(report(args, stage, reference, options, device, dtype))
    finally:
        stage.stop(30)
    print(f"\n{time.perf_counter() - started:.0f} s in all, load average {os.getloadavg()[0]:.1f}")


def report(args, stage: Stage, reference: InternVLModel, options: TileOptions, device: torch.device,
           dtype: torch.dtype) -> str:
    latencies, service_s, service_tiles, reference_s, reference_tiles, inline_s = [], 0.0, 0, 0.0, 0, 0.0
    warm = distinct_images(args.clients, args.image_size, first_seed=1_000_000)
    asyncio.run(load_service(stage.address, warm, args.clients))
    time_reference(reference, preprocess_inline(warm[:1], options)[0], args.max_batch_tiles, device, dtype)
    for round_ in range(args.rounds):
        images = distinct_images(args.images, args.image_size, first_seed=round_ * args.images)
        tiles, seconds = preprocess_inline(images, options)
        inline_s += seconds
        done, seconds, count = asyncio.run(load_service(stage.address, images, args.clients))
        latencies, service_s, service_tiles = latencies + done, service_s + seconds, service_tiles + count
        reference_s += time_reference(reference, tiles, args.max_batch_tiles, device, dtype)
        reference_tiles += len(tiles)
        print(f"round {round_ + 1} of {args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    assert service_tiles == reference_tiles, "the service and the reference encoded different tiles"
    threads = preprocess_in_threads("auto", device.type)  # what the served vision_svc chose
    pooled_s = asyncio.run(preprocess_pooled(images, options, args.preprocess_workers, threads))
    ms = [s * 1e3 for s in latencies]
    service, ref = service_tiles / service_s, reference_tiles / reference_s
    encode = markdown_table(["system", "tiles/s", "image p50 ms", "image p99 ms"], [
        [f"vision_svc, {args.clients} clients", service, percentile(ms, 50), percentile(ms, 99)],
        [f"transformers get_image_features, batch {args.max_batch_tiles}", ref, "-", "-"],
        ["**vision_svc / transformers**", ratio(service, ref), "-", "-"]])
    preprocess = markdown_table(["preprocessing (decode, tile, normalize)", "tiles/s"], [
        ["inline, 1 process", reference_tiles / inline_s],
        [f"vision_svc's pool, {args.preprocess_workers} {'threads' if threads else 'processes'}",
         len(tiles) / pooled_s]])
    return (f"\n{len(latencies)} images of {args.image_size[0]}x{args.image_size[1]} "
            f"({reference_tiles // len(latencies)} tiles each), {args.rounds} rounds\n\n{encode}\n\n{preprocess}")


if __name__ == "__main__":
    main()
