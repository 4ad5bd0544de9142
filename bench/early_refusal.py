"""A request that cannot fit the context: what it costs this stack, against vLLM's own OpenAI server.

    python -m bench.early_refusal              # ~2 minutes on 2 quiet cores
    python -m bench.early_refusal --requests 20

Each request is a chat with four distinct 1200x900 JPEGs (13 tiles each, 4 x 13 x 256 = 13,312 image tokens)
against a context of 8192 tokens: both systems answer 400. Reported per system: the median time to that 400,
and for this stack the tiles the vision stage encoded for it (vision_svc's `vision_tiles_encoded_total`).
Both serve the tiny checkpoint with the same engine flags, one after the other.
"""

import argparse

import httpx

from bench.common import jpeg_data_url, markdown_table, median, photo_like_jpeg, work_dir
from bench.e2e import CPU_ENGINE_FLAGS
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage

IMAGES_PER_REQUEST = 4
IMAGE_SIZE = (1200, 900)


def vision_tiles_encoded(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vision_tiles_encoded_total"))


def bodies(model: str, requests: int) -> list[dict]:
    return [{"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": jpeg_data_url(photo_like_jpeg(*IMAGE_SIZE, seed=100 * n + i))}}
          for i in range(IMAGES_PER_REQUEST)),
        {"type": "text", "text": "Compare these four pictures."}]}]} for n in range(requests)]


def time_refusals(base_url: str, requests: list[dict], tiles=None) -> tuple[float, float | None]:
    """Median seconds to the 400, and the tiles encoded per request (None when not measured)."""
    seconds, before = [], tiles() if tiles else None
    for body in requests:
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=600)
        if response.status_code != 400:
            raise RuntimeError(f"expected a 400, got {response.status_code}: {response.text[:300]}")
        seconds.append(response.elapsed.total_seconds())
    per_request = (tiles() - before) / len(requests) if tiles else None
    return median(seconds), per_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10, help="refused requests per system")
    args = parser.parse_args()
    from deploy.tiny_model.build import build  # transformers: imported here, so that --help is quick

    directory = work_dir(None)
    logs = directory / "logs"
    model = build(directory / "tiny-internvl")
    requests = bodies(model.name, args.requests)
    rows = []

    metrics_port = free_port()
    vision = vision_stage(model, free_port(), ["--metrics-port", str(metrics_port)], logs / "vision.log")
    stages = [vision.wait_ready()]
    try:
        stages.append(llm_stage(model, [vision], free_port(), CPU_ENGINE_FLAGS, logs / "llm.log").wait_ready())
        stages.append(gateway_stage(stages[-1:], "127.0.0.1", free_port(), [], logs / "gateway.log").wait_ready())
        seconds, tiles = time_refusals(f"http://{stages[-1].address}", requests,
                                       lambda: vision_tiles_encoded(metrics_port))
        rows.append(["DvD (gateway)", f"{seconds * 1000:.0f}", f"{tiles:.0f}"])
    finally:
        for stage in reversed(stages):
            stage.stop(30)

    port = free_port()
    vllm = Stage("vllm", ["vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
                          "--port", str(port), "--served-model-name", model.name, "--trust-remote-code",
                          *CPU_ENGINE_FLAGS], port, logs / "vllm.log", http_health=True)
    try:
        seconds, _ = time_refusals(f"http://{vllm.wait_ready().address}", requests)
        rows.append(["vLLM monolithic", f"{seconds * 1000:.0f}", "-"])
    finally:
        vllm.stop(30)
    print(markdown_table(["system", "median ms to the 400", "tiles encoded per request"], rows))


if __name__ == "__main__":
    main()
