"""Every way a request fails, as the client sees it: the HTTP status, the OpenAI error body, the backend's view."""

import asyncio
import base64
import time

import httpx
import openai
import pytest

from deploy.local import free_port
from gateway import images


def chat(text: str = "hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


def with_image(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


async def post(base: str, body, path="/v1/chat/completions", **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        if isinstance(body, (bytes, str)):
            return await http.post(f"{base}{path}", content=body, **kwargs)
        return await http.post(f"{base}{path}", json=body, **kwargs)


def assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert words in error["message"], error["message"]


async def test_bad_json_and_bad_schema_are_400(gateway_url, fake):
    assert_error(await post(gateway_url, b'{"messages": ['), 400, "not valid JSON")
    assert_error(await post(gateway_url, {"messages": []}), 400, "messages")
    assert_error(await post(gateway_url, chat(temperature=5)), 400, "temperature")
    assert_error(await post(gateway_url, chat(n=129)), 400, "n:")
    assert_error(await post(gateway_url, chat(functions=[{"name": "f"}])), 400, "'functions' is not supported")
    assert_error(await post(gateway_url, {"messages": [{"role": "tool", "content": "x"}]}), 400, "tool_call_id")
    assert_error(await post(gateway_url, {"messages": [{"role": "critic", "content": "x"}]}), 400, "role")
    assert_error(await post(gateway_url, {"prompt": ["a"] * 65}, path="/v1/completions"), 400, "prompt")
    assert fake.requests == []


async def test_unknown_model_is_404_through_the_openai_client(gateway_url, fake):
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as error:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404 and "The model `gpt-4o` does not exist." in str(error.value)


async def test_backend_statuses_map_to_http(gateway_url, fake):
    assert_error(await post(gateway_url, chat(max_tokens=5000)), 400, "exceeds the context length")
    assert_error(await post(gateway_url, chat("error:RESOURCE_EXHAUSTED")), 429, "scripted RESOURCE_EXHAUSTED")
    assert_error(await post(gateway_url, chat("error:INTERNAL")), 500, "Internal server error")
    # A streaming request that fails before its first token still gets a real status.
    assert_error(await post(gateway_url, chat("error:RESOURCE_EXHAUSTED", stream=True)), 429, "RESOURCE_EXHAUSTED")


async def test_gateway_max_tokens_limit_is_400_before_any_call(start_gateway, fake):
    async with start_gateway(max_tokens_limit=100) as url:
        assert_error(await post(url, chat(max_completion_tokens=101)), 400, "above this server's limit of 100")
    assert fake.requests == []


async def test_deadline_is_504(start_gateway, fake):
    async with start_gateway(request_timeout_s=0.3) as url:
        assert_error(await post(url, chat("sleep")), 504, "Deadline")


async def test_backend_down_is_503_and_unhealthy(start_gateway):
    async with start_gateway(f"127.0.0.1:{free_port()}", served_model_name="m") as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as error:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert error.value.status_code == 503
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/health")).status_code == 503


async def test_unavailable_replica_is_retried_on_another(backend, start_gateway, fake):
    async with start_gateway(f"127.0.0.1:{free_port()}", backend.target) as url:
        statuses = [(await post(url, chat())).status_code for _ in range(4)]
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/health")).json()["healthy_replicas"] == [backend.target]
    assert statuses == [200] * 4 and len(fake.requests) == 4


async def test_a_stage_down_behind_llm_svc_is_503_without_retry(backend, start_gateway, fake):
    async with start_gateway(backend.target, backend.target) as url:
        assert_error(await post(url, chat("error:VISION_UNAVAILABLE")), 503, "vision_svc down")
        assert len(fake.requests) == 1  # every llm_svc replica shares the vision stage: no retry


async def test_api_key_is_required_when_set(start_gateway, fake):
    async with start_gateway(api_key="sesame") as url:
        assert_error(await post(url, chat()), 401, "API key")
        assert_error(await post(url, chat(), headers={"Authorization": "Bearer wrong"}), 401, "API key")
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        good = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert (await good.models.list()).data[0].id == fake.MODEL
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/health")).status_code == 200  # probes need no key
            for path in ("/v1/completions", "/tokenize", "/detokenize"):
                assert_error(await http.post(f"{url}{path}", json={}), 401, "API key")
    assert len(fake.requests) == 0


async def test_a_request_without_the_key_takes_no_room_in_the_work_limit(start_gateway, fake):
    async with start_gateway(api_key="sesame", max_requests_in_flight=1) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        slow = await client.chat.completions.create(model=fake.MODEL, stream=True,
                                                    messages=[{"role": "user", "content": "slow"}])
        await anext(aiter(slow))  # the one slot is taken
        assert_error(await post(url, chat()), 401, "API key")  # not 429: refused before it is admitted
        await slow.close()


async def test_images_that_cannot_be_loaded_are_400(gateway_url, image_server, fake):
    base, _ = image_server
    assert_error(await post(gateway_url, with_image("data:image/png;base64,@@@")), 400, "invalid base64")
    assert_error(await post(gateway_url, with_image("data:text/plain;base64,aGk=")), 400, "data:image/")
    assert_error(await post(gateway_url, with_image("ftp://example.com/a.png")), 400, "unsupported URL scheme")
    assert_error(await post(gateway_url, with_image(f"{base}/missing.png")), 400, "HTTP 404")
    assert_error(await post(gateway_url, with_image(f"{base}/redirect/9/red.png")), 400, "more than 3 redirects")
    assert_error(await post(gateway_url, with_image("file:///etc/passwd")), 400, "file:// URLs are not allowed")
    assert_error(await post(gateway_url, with_image("http://host.invalid/a.png")), 400, "cannot resolve")
    assert fake.requests == []


async def test_a_request_over_the_language_services_limit_is_413_and_never_sent(start_gateway, fake):
    # Each image is within the gateway's limits; together they are over what llm_svc receives (6 MiB).
    image = "data:image/png;base64," + base64.b64encode(bytes(4 << 20)).decode()
    two = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}] * 2}]}
    async with start_gateway(max_image_bytes=5 << 20, max_images_per_request=2) as url:
        assert_error(await post(url, two), 413, "the language service takes at most 6291456")
        assert fake.requests == []
        assert (await post(url, with_image(image))).status_code == 200


async def test_image_and_body_size_limits_are_413(start_gateway, image_server, fake):
    base, _ = image_server
    async with start_gateway(max_image_bytes=1 << 20, max_request_bytes=2 << 20, max_images_per_request=2,
                             allow_private_image_urls=True) as url:
        big = "data:image/png;base64," + base64.b64encode(bytes((1 << 20) + 1)).decode()
        assert_error(await post(url, with_image(big)), 413, "above the limit")
        assert_error(await post(url, with_image(f"{base}/big.png")), 413, "above the limit")
        assert_error(await post(url, chat("x" * (3 << 20))), 413, "request body")
        three = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{base}/red.png"}}] * 3}]}
        assert_error(await post(url, three), 400, "at most 2")
    assert fake.requests == []


async def test_image_fetch_time_limit(start_gateway, image_server, fake):
    base, _ = image_server
    async with start_gateway(image_fetch_timeout_s=0.3, allow_private_image_urls=True) as url:
        assert_error(await post(url, with_image(f"{base}/slow.png")), 400, "did not finish within 0.3 s")


async def test_private_addresses_are_refused_without_the_flag(start_gateway, image_server, fake):
    base, _ = image_server
    port = base.rsplit(":", 1)[1]
    async with start_gateway() as url:
        for image_url in (f"{base}/red.png", f"http://localhost:{port}/red.png", "http://[::1]/a.png",
                          "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/a.png", "http://0.0.0.0/a"):
            assert_error(await post(url, with_image(image_url)), 400, "non-public address")
    assert fake.requests == []


async def test_every_redirect_hop_is_checked(start_gateway, image_server, fake, monkeypatch):
    base, _ = image_server
    port = base.rsplit(":", 1)[1]
    # Pretend 127.0.0.1 is public, so that only the redirect's target (127.0.0.2) is refused.
    monkeypatch.setattr(images, "is_public_address", lambda address: address == "127.0.0.1")
    async with start_gateway() as url:
        assert (await post(url, with_image(f"{base}/red.png"))).status_code == 200
        away = f"{base}/away?to=http://127.0.0.2:{port}/red.png"
        assert_error(await post(url, with_image(away)), 400, "host '127.0.0.2' resolves to a non-public address")
    assert len(fake.requests) == 1


async def test_local_files_only_inside_the_allowed_directory(start_gateway, fake, png, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(b"secret")
    (media / "link.png").symlink_to(tmp_path / "secret.png")
    async with start_gateway(allowed_local_media_path=media) as url:
        assert (await post(url, with_image((media / "cat.png").as_uri()))).status_code == 200
        assert fake.requests[0].chat.messages[0].content[1].image.data == png()
        for outside in ((media / ".." / "secret.png").as_uri(), (media / "link.png").as_uri()):
            assert_error(await post(url, with_image(outside)), 400, "outside the allowed media path")
        assert_error(await post(url, with_image((media / "none.png").as_uri())), 400, "no such file")


async def test_client_disconnect_mid_stream_cancels_the_backend_call(gateway_url, fake):
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model=fake.MODEL, stream=True,
                                                  messages=[{"role": "user", "content": "slow"}])
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.close()
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)


async def test_client_disconnect_before_a_plain_response_cancels_the_backend_call(gateway_url, fake):
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{gateway_url}/v1/chat/completions", json=chat("slow"), timeout=0.5)
    await asyncio.wait_for(fake.cancelled.wait(), timeout=5)


async def requests_with_status(gateway_url: str, status: str) -> float:
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gateway_url}/metrics")).text
    line = f'gateway_requests_total{{endpoint="/v1/chat/completions",status="{status}"}} '
    return sum(float(row.removeprefix(line)) for row in metrics.splitlines() if row.startswith(line))


async def test_client_gone_while_its_image_downloads_ends_the_request_then(start_gateway, image_server, fake):
    base, _ = image_server
    async with start_gateway(allow_private_image_urls=True) as url:
        started = time.monotonic()
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{url}/v1/chat/completions", json=with_image(f"{base}/slow.png?seconds=10"),
                                timeout=0.5)
        while await requests_with_status(url, "499") == 0 and time.monotonic() - started < 10:
            await asyncio.sleep(0.05)
        # Ended while its image was still on the way (10 s), not once it had come.
        assert await requests_with_status(url, "499") == 1 and time.monotonic() - started < 10
    assert fake.requests == []


async def test_client_gone_before_its_body_arrived_is_499_not_a_server_error(gateway_url, fake):
    before = {status: await requests_with_status(gateway_url, status) for status in ("499", "500")}
    host, port = gateway_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b'{"messages": [')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if await requests_with_status(gateway_url, "499") > before["499"]:
            break
        await asyncio.sleep(0.05)
    assert await requests_with_status(gateway_url, "499") == before["499"] + 1
    assert await requests_with_status(gateway_url, "500") == before["500"] and fake.requests == []


async def test_error_after_the_first_token_arrives_as_an_sse_error_event(gateway_url, fake):
    response = await post(gateway_url, chat("crash", stream=True))
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert '"error"' in events[-2] and "Internal server error" in events[-2] and events[-1] == "[DONE]"
