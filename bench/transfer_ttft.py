"""What the embedding transport does to the time to first token, with 38B-sized embeddings.

    python -m bench.transfer_ttft [--requests 10] [--transports grpc socket shm]

A tiny checkpoint whose language model is 5120 wide (InternVL3.5-38B's width; 2 layers, 4 heads of 64, so the
prefill stays cheap on a CPU) makes one 1344x1792 image (3x4 tiles + thumbnail, 3328 image tokens) into a
[3328, 5120] bf16 embedding, 34 MB, exactly the 38B's. The real stages run (vision_svc in bfloat16, llm_svc,
gateway) and the same image is sent in every request: vision_svc answers from its cache and vLLM from its
prefix cache, so what differs between transports is the transfer. One llm_svc per transport
(`--embedding-transport`), the same vision_svc; streamed chat completions of one token, one at a time; the
first request of each warms the caches and is not counted.
"""

import argparse
import asyncio
import os
import pathlib

import httpx

from bench.common import markdown_table, median, photo_like_jpeg, ratio, work_dir
from bench.e2e import CPU_ENGINE_FLAGS, chat_body, stop, timed_request
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage
from deploy.tiny_model import configs
from deploy.tiny_model.build import build

WIDTH_38B = 5120
IMAGE_SIZE = (1344, 1792)  # 3x4 tiles of 448 + thumbnail = 13 tiles


def wide_checkpoint(directory: pathlib.Path) -> pathlib.Path:
    """The tiny checkpoint with the 38B's language width (built once under the work directory)."""
    saved = configs._TEXT
    configs._TEXT = dict(saved, hidden_size=WIDTH_38B)
    try:
        return build(directory / "tiny-width-5120", layout="original", seed=5120)
    finally:
        configs._TEXT = saved


async def ttfts(base_url: str, body: dict, requests: int) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        url = base_url + "/v1/chat/completions"
        await timed_request(client, url, body)  # warms both caches
        return [(await timed_request(client, url, body)).ttft_s for _ in range(requests)]


def measure(model: pathlib.Path, logs: pathlib.Path, transports: list[str], requests: int) -> dict[str, float]:
    image = photo_like_jpeg(*IMAGE_SIZE, seed=7)
    body = chat_body(model.name, "Describe the image.", image, output_len=1)
    results = {}
    vision = vision_stage(model, free_port(), ["--dtype", "bfloat16", "--grace-s", "2"], logs / "vision.log")
    stages: list[Stage] = [vision.wait_ready()]
    try:
        for transport in transports:
            llm = llm_stage(model, [vision], free_port(), [*CPU_ENGINE_FLAGS, "--grace-s", "2",
                                                           "--embedding-transport", transport],
                            logs / f"llm-{transport}.log").wait_ready()
            gateway = gateway_stage([llm], "127.0.0.1", free_port(), [], logs / f"gateway-{transport}.log")
            try:
                gateway.wait_ready()
                results[transport] = median(asyncio.run(ttfts(f"http://{gateway.address}", body, requests)))
            finally:
                stop([llm, gateway])
    finally:
        stop(stages)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10, help="timed requests per transport")
    parser.add_argument("--transports", nargs="+", default=["grpc", "socket", "shm"])
    parser.add_argument("--work-dir", default=None, help="where the checkpoint and logs go")
    args = parser.parse_args()
    directory = work_dir(args.work_dir)
    logs = directory / "logs" / "transfer-ttft"
    logs.mkdir(parents=True, exist_ok=True)
    results = measure(wide_checkpoint(directory), logs, args.transports, args.requests)
    reference = results.get("grpc")
    rows = [[t, s * 1e3, (s - reference) * 1e3 if reference else "", ratio(reference, s) if reference else ""]
            for t, s in results.items()]
    print(f"TTFT, one repeated 13-tile image ([3328, 5120] bf16, 34 MB), median of {args.requests}\n")
    print(markdown_table(["transport", "TTFT ms", "minus gRPC inline, ms", "x gRPC inline"], rows))
    print(f"\nload average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
