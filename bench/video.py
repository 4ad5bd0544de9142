"""Frames per second of a video through vision_svc, decoding and encoding apart, against vLLM's own video path.

    python -m bench.video                          # 30 s of 720p at 30 fps, vLLM's 32 frames, tiny checkpoint, CPU
    python -m bench.video --frames 64 --size 300m  # InternViT-300M widths (slow on a CPU)

The clip is written here with OpenCV (MPEG-4 Part 2, a moving pattern over noise, so frames differ). Measured:
- decode: the sampled frames out of the file, ours (`vision_svc.video_decode`) and vLLM's OpenCV loader;
- preprocess: sampled frames to normalized 448x448 tiles, ours and vLLM's InternVL video processor;
- encode: the encoder on those tiles, as vision_svc's runner batches them;
- through vision_svc: one Encode call of the video on a real server (gRPC, decode in its preprocessing pool),
  cache off, so every call decodes and encodes.
Each is the median of --repeats runs; frames/s counts sampled frames.
"""

import argparse
import asyncio
import os
import pathlib
import statistics
import tempfile
import time

import cv2
import grpc
import numpy as np
import torch

from bench.common import markdown_table, ratio, work_dir
from bench.vision import build_checkpoint
from protos import vision_pb2, vision_pb2_grpc
from vision_svc.config import VisionConfig
from vision_svc.server import VisionServer
from vision_svc.tiling import normalize_tiles
from vision_svc.video_decode import FrameSampling, VideoLimits, decode_video
from vision_svc.video_frames import frames_to_tile_pixels


def make_clip(seconds: float, size: tuple[int, int], fps: float) -> bytes:
    width, height = size
    # A panning gradient with texture: compresses like filmed video (a few MB per minute of 720p), unlike noise.
    x = np.linspace(0, 4 * np.pi, 2 * width)
    y = np.linspace(0, 2 * np.pi, height)[:, None]
    scene = np.stack([127 + 100 * np.sin(x + y), 127 + 100 * np.cos(x / 2 - y), 127 + 60 * np.sin(3 * y + x / 3)],
                     axis=-1).astype(np.uint8)  # [height, 2 * width, 3]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(pathlib.Path(tmp) / "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for i in range(int(seconds * fps)):
            offset = (4 * i) % width
            frame = np.ascontiguousarray(scene[:, offset:offset + width])
            cv2.circle(frame, (int(width / 2 + width / 3 * np.sin(i / 15)), height // 2), height // 6,
                       (i % 256, 255 - i % 256, 128), -1)
            writer.write(frame)
        writer.release()
        return pathlib.Path(path).read_bytes()


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


async def through_vision_svc(model: pathlib.Path, clip: bytes, frames: int, repeats: int, batch: int) -> float:
    config = VisionConfig(model=model, host="127.0.0.1", port=0, preprocess_workers=1, cache_bytes=0, grace_s=0,
                          max_message_bytes=max(64 << 20, 2 * len(clip)),
                          max_bytes_in_flight=max(2 << 30, 4 * len(clip)),
                          max_batch_tiles=batch, max_video_bytes=max(len(clip), 1 << 20), max_video_frames=frames)
    server = VisionServer(config)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_receive_message_length", 1 << 30),
                                                      ("grpc.max_send_message_length", 1 << 30)]) as channel:
            stub = vision_pb2_grpc.VisionEncoderStub(channel)
            request = vision_pb2.EncodeRequest(videos=[vision_pb2.VideoInput(data=clip)],
                                               video_options=vision_pb2.VideoOptions(num_frames=frames))
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                async for _message in stub.Encode(request):
                    pass
                times.append(time.perf_counter() - started)
            return statistics.median(times)
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--frames", type=int, default=32, help="frames sampled (vLLM's default: 32)")
    parser.add_argument("--size", choices=("tiny", "300m"), default="tiny", help="vision encoder widths")
    parser.add_argument("--batch", type=int, default=32, help="vision_svc --max-batch-tiles")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.processors.internvl import video_to_pixel_values_internvl

    started = time.perf_counter()
    clip = make_clip(args.seconds, (args.width, args.height), args.fps)
    print(f"clip: {args.seconds:g} s of {args.width}x{args.height} at {args.fps:g} fps, {len(clip) / 2**20:.1f} MiB "
          f"(written in {time.perf_counter() - started:.1f} s); {args.frames} frames sampled; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    n, repeats = args.frames, args.repeats
    limits, sampling = VideoLimits(max_video_bytes=len(clip), max_frames=n), FrameSampling(num_frames=n)
    ours_decode, frames = timed(lambda: decode_video(clip, limits, sampling), repeats)
    vllm_loader = VIDEO_LOADER_REGISTRY.load("opencv")
    theirs_decode, (their_frames, _) = timed(lambda: vllm_loader.load_bytes(clip, num_frames=n), repeats)
    assert np.array_equal(frames, their_frames), "the sampled frames differ from vLLM's"
    ours_pre, tiles = timed(lambda: torch.from_numpy(normalize_tiles(frames_to_tile_pixels(frames, 448))), repeats)
    theirs_pre, _ = timed(lambda: video_to_pixel_values_internvl(frames, input_size=448, min_num=1, max_num=1,
                                                                 use_thumbnail=False), repeats)
    model = build_checkpoint(args.size, work_dir(args.work_dir))
    from vision_svc.encoder import load_encoder

    encoder, _ = load_encoder(model, "cpu", torch.float32)

    def encode():
        with torch.inference_mode():
            return [encoder(batch) for batch in tiles.split(args.batch)]

    encode_s, _ = timed(encode, repeats)
    service_s = asyncio.run(through_vision_svc(model, clip, n, repeats, args.batch))
    rows = [["decode (sampled frames out of the file)", n / ours_decode, n / theirs_decode,
             ratio(theirs_decode, ours_decode)],
            ["preprocess (frames to 448x448 tiles)", n / ours_pre, n / theirs_pre, ratio(theirs_pre, ours_pre)],
            [f"encode ({args.size} encoder, batches of {args.batch})", n / encode_s, "-", "-"],
            ["through vision_svc (gRPC Encode, decode + encode)", n / service_s, "-", "-"]]
    print(markdown_table(["stage", "ours frames/s", "vLLM frames/s", "speed vs vLLM"], rows))


if __name__ == "__main__":
    main()
