"""Bounded work in flight at the gateway: past its limits on requests and on bytes held, a request gets 429 with
Retry-After at once, nothing else fails, and every slot and byte comes back when the requests end."""

import asyncio
import base64
import json

import httpx
import openai
import pytest

from gateway.config import GatewayConfig
from protos import errors, llm_pb2, llm_pb2_grpc
from tests.gateway.conftest import serving
from tests.gateway.test_gateway_errors import assert_error, chat, post

MIB = 1 << 20


async def admitted(url: str) -> dict[str, float]:
    """The gateway's gauges of work held: requests and bytes."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    return {name: float(line.split()[-1]) for line in text.splitlines()
            for name in ("gateway_admitted_requests", "gateway_admitted_bytes") if line.startswith(name + " ")}


async def wait_until_idle(url: str) -> None:
    for _ in range(100):
        if await admitted(url) == {"gateway_admitted_requests": 0, "gateway_admitted_bytes": 0}:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"work still held: {await admitted(url)}")


def assert_retry_later(response: httpx.Response) -> None:
    assert_error(response, 429, "retry later")
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "RateLimitError"


async def test_past_the_request_limit_a_request_gets_429_with_retry_after(start_gateway, fake):
    async with start_gateway(max_requests_in_flight=2) as url, httpx.AsyncClient(timeout=30) as http:
        streams = [await http.send(http.build_request("POST", f"{url}/v1/chat/completions",
                                                      json=chat("slow", stream=True)), stream=True)
                   for _ in range(2)]
        assert (await admitted(url))["gateway_admitted_requests"] == 2
        assert_retry_later(await post(url, chat()))
        assert_retry_later(await post(url, {"prompt": "hi"}, path="/v1/completions"))
        assert (await http.get(f"{url}/v1/models")).status_code == 200  # only generation counts
        for stream in streams:
            await stream.aclose()
        await wait_until_idle(url)
        assert (await post(url, chat())).status_code == 200


async def test_a_flood_of_large_requests_gets_answers_and_429s_never_an_error(start_gateway, fake):
    # One request may hold 3 MiB (a 1 MiB body and a 1 MiB image); 4 MiB in flight fit one such request at a time.
    limits = dict(max_request_bytes=2 * MIB, max_image_bytes=MIB, max_images_per_request=1, max_video_bytes=1,
                  max_videos_per_request=1)
    image = base64.b64encode(bytes(700_000)).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "sleep"}, {
        "type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}
    async with start_gateway(**limits, max_bytes_in_flight=4 * MIB) as url:
        responses = await asyncio.gather(*(post(url, body) for _ in range(12)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        for response in responses:
            if response.status_code == 429:
                assert_retry_later(response)
        await wait_until_idle(url)
        assert (await post(url, body)).status_code == 200


async def test_bodies_that_arrive_together_leave_room_for_the_first_one_s_image(start_gateway, fake):
    # Each client sends its headers, and its body only once the gateway has them all: a body is held from its
    # Content-Length on, before it arrives. Held with no room to spare, four bodies would fit in 4 MiB and none of
    # them its 0.7 MB image: each request would be refused but for the room the others' refusals free, which in a
    # flood that keeps coming the next bodies take.
    limits = dict(max_request_bytes=2 * MIB, max_image_bytes=MIB, max_images_per_request=1, max_video_bytes=1,
                  max_videos_per_request=1)
    image = base64.b64encode(bytes(700_000)).decode()
    payload = json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {
        "type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}).encode()
    arrived = asyncio.Event()

    async def body_once_all_have_asked():
        await arrived.wait()
        yield payload

    async with start_gateway(**limits, max_bytes_in_flight=4 * MIB) as url, \
            httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=8)) as http:
        sent = [asyncio.ensure_future(http.post(
            f"{url}/v1/chat/completions", content=body_once_all_have_asked(),
            headers={"content-type": "application/json", "content-length": str(len(payload))})) for _ in range(6)]
        await asyncio.sleep(1.0)  # every request's headers in, and its body's bytes held or refused
        held = await admitted(url)
        assert held["gateway_admitted_bytes"] + MIB <= 4 * MIB, held  # room for one more image
        arrived.set()
        statuses = sorted(r.status_code for r in await asyncio.gather(*sent))
    assert 200 in statuses and set(statuses) <= {200, 429}, statuses


async def test_the_openai_client_retries_a_429_after_the_time_it_names(start_gateway, fake):
    async with start_gateway(max_requests_in_flight=1) as url, httpx.AsyncClient(timeout=30) as http:
        held = await http.send(http.build_request("POST", f"{url}/v1/chat/completions",
                                                  json=chat("slow", stream=True)), stream=True)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=3)
        retried = asyncio.create_task(client.chat.completions.create(
            model=fake.MODEL, messages=[{"role": "user", "content": "hi"}]))
        await asyncio.sleep(0.5)  # its first try was refused; the next waits for Retry-After
        await held.aclose()
        assert (await retried).choices[0].message.content == "".join(fake.REPLY)


def test_the_byte_limit_must_fit_the_largest_request():
    with pytest.raises(ValueError, match="max_bytes_in_flight"):
        GatewayConfig(llm_targets=("x:1",), max_request_bytes=2 * MIB, max_image_bytes=MIB, max_images_per_request=2,
                      max_bytes_in_flight=3 * MIB)


class FullLanguageModel(llm_pb2_grpc.LanguageModelServicer):
    """A replica that is always full."""

    def __init__(self):
        self.calls = 0

    async def GetModelInfo(self, request, context):
        return llm_pb2.GetModelInfoResponse(model="m", max_model_len=4096)

    async def Generate(self, request, context):
        self.calls += 1
        raise errors.Overloaded("replica full", retry_after_s=7)
        yield  # a generator, as Generate streams


@pytest.fixture
async def full_replica():
    servicer = FullLanguageModel()
    async with serving(servicer) as target:
        yield servicer, target


async def test_a_full_replica_passes_the_request_to_another(full_replica, backend, start_gateway, fake):
    servicer, target = full_replica
    async with start_gateway(target, backend.target, served_model_name=fake.MODEL) as url:
        statuses = [(await post(url, chat())).status_code for _ in range(4)]
    assert statuses == [200] * 4 and len(fake.requests) == 4 and servicer.calls == 2


async def test_when_every_replica_is_full_the_client_gets_their_retry_after(full_replica, start_gateway):
    servicer, target = full_replica
    async with start_gateway(target, served_model_name="m") as url:
        response = await post(url, chat())
    assert_error(response, 429, "replica full")
    assert response.headers["retry-after"] == "7" and servicer.calls == 1
