"""Helpers shared by the llm_svc tests: images, request building, a blocking gRPC client, metric scraping."""

import io
import re

import grpc
import httpx
import torch
from PIL import Image

from protos import llm_pb2, llm_pb2_grpc


def image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colour fields (not noise), so that tiles differ and the model's output depends on them."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 4, 4), generator=generator, dtype=torch.uint8).float()
    big = torch.nn.functional.interpolate(small[None], size=(height, width), mode="bilinear")[0]
    return Image.fromarray(big.clamp(0, 255).byte().permute(1, 2, 0).numpy())


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def chat(*messages: tuple[str, list]) -> llm_pb2.Chat:
    """chat(("user", [Image, "text"]), ("assistant", ["text"])) -> proto Chat; images go as PNG bytes."""
    roles = {"system": llm_pb2.ROLE_SYSTEM, "user": llm_pb2.ROLE_USER, "assistant": llm_pb2.ROLE_ASSISTANT}
    return llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=roles[role], content=[
        llm_pb2.ContentPart(text=part) if isinstance(part, str)
        else llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=png_bytes(part))) for part in parts])
        for role, parts in messages])


def openai_messages(*messages: tuple[str, list]) -> list[dict]:
    """The same conversation for vLLM's own chat API, images as PIL parts."""
    return [{"role": role, "content": [{"type": "text", "text": p} if isinstance(p, str)
                                       else {"type": "image_pil", "image_pil": p} for p in parts]}
            for role, parts in messages]


def greedy(max_tokens: int, **extra) -> llm_pb2.SamplingParams:
    return llm_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


class LlmClient:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = llm_pb2_grpc.LanguageModelStub(self.channel)

    def generate(self, request: llm_pb2.GenerateRequest, timeout: float = 120) -> list[llm_pb2.GenerateResponse]:
        return list(self.stub.Generate(request, timeout=timeout))

    def tokens(self, request: llm_pb2.GenerateRequest) -> list[int]:
        return [t for r in self.generate(request) for t in r.token_ids]

    def close(self):
        self.channel.close()


def metric(port: int, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets) scraped from a stage's --metrics-port."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))
