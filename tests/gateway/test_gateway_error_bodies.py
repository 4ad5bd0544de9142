"""What an error body tells the client: a 5xx only its kind and the request id (peers, ports and exception text
go to the log line with that id); a 4xx its own message, without the peer that passed it on."""

import json
import logging

import grpc
import httpx
import pytest

from deploy.local import free_port
from gateway import translate
from gateway.errors import client_message, http_error
from protos import errors
from protos.logs import request_id_var


def chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
def gateway_log(caplog):
    """The gateway's log records, each with the request id it was written under (as the real log formatter has)."""
    def with_request_id(record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True

    caplog.handler.addFilter(with_request_id)
    caplog.set_level(logging.INFO, logger="gateway")
    yield caplog
    caplog.handler.removeFilter(with_request_id)


def logged_under(caplog, request_id: str) -> str:
    """Everything the gateway logged under `request_id`, tracebacks included."""
    records = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    return "\n".join(r.getMessage() + (caplog.handler.formatter.formatException(r.exc_info) if r.exc_info else "")
                     for r in records)


async def failing_request(base: str, body: dict, request_id: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{base}/v1/chat/completions", json=body, headers={"x-request-id": request_id})


def assert_opaque(response: httpx.Response, status: int, kind: str, request_id: str, *secrets: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"] == request_id
    message = response.json()["error"]["message"]
    assert kind in message and request_id in message, message
    for secret in ("127.0.0.1", "Error:", "Traceback", *secrets):
        assert secret not in message, message


async def test_internal_error_from_llm_svc(gateway_url, backend, fake, gateway_log):
    port = backend.target.rsplit(":", 1)[1]
    response = await failing_request(gateway_url, chat("error:INTERNAL"), "rid-internal")
    assert_opaque(response, 500, "Internal server error", "rid-internal", port, "scripted")
    assert f"{backend.target}: scripted INTERNAL" in logged_under(gateway_log, "rid-internal")


async def test_unavailable_llm_svc(gateway_url, backend, fake, gateway_log):
    response = await failing_request(gateway_url, chat("error:UNAVAILABLE"), "rid-unavailable")
    assert_opaque(response, 503, "Service unavailable (llm_svc down)", "rid-unavailable",
                  backend.target.rsplit(":", 1)[1], "scripted")
    assert f"{backend.target}: scripted UNAVAILABLE" in logged_under(gateway_log, "rid-unavailable")


async def test_unavailable_vision_stage_is_named(gateway_url, fake, gateway_log):
    response = await failing_request(gateway_url, chat("error:VISION_UNAVAILABLE"), "rid-vision")
    assert_opaque(response, 503, "Service unavailable (vision_svc down)", "rid-vision", "scripted")
    assert "scripted vision_svc down" in logged_under(gateway_log, "rid-vision")


async def test_no_llm_svc_listening(start_gateway, gateway_log):
    dead_port = str(free_port())
    async with start_gateway(f"127.0.0.1:{dead_port}", served_model_name="m") as url:
        response = await failing_request(url, chat("hi", model="m"), "rid-down")
    assert_opaque(response, 503, "Service unavailable", "rid-down", dead_port)
    assert f"127.0.0.1:{dead_port}" in logged_under(gateway_log, "rid-down")


async def test_deadline_exceeded(start_gateway, fake, gateway_log):
    async with start_gateway(request_timeout_s=0.3) as url:
        response = await failing_request(url, chat("sleep"), "rid-deadline")
    assert_opaque(response, 504, "Deadline exceeded", "rid-deadline")
    assert "Deadline Exceeded" in logged_under(gateway_log, "rid-deadline")


async def test_unexpected_exception_in_the_gateway(gateway_url, fake, gateway_log, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot reach 10.1.2.3:9999")

    monkeypatch.setattr(translate, "chat_generate_request", broken)
    response = await failing_request(gateway_url, chat("hi"), "rid-bug")
    assert_opaque(response, 500, "Internal server error", "rid-bug", "10.1.2.3", "9999", "RuntimeError")
    logged = logged_under(gateway_log, "rid-bug")
    assert "RuntimeError: cannot reach 10.1.2.3:9999" in logged and "Traceback" in logged
    assert fake.requests == []


async def test_error_after_the_first_token_is_an_opaque_sse_event(gateway_url, backend, fake, gateway_log):
    response = await failing_request(gateway_url, chat("crash", stream=True), "rid-crash")
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "rid-crash" in error["message"], error
    assert "crashed" not in error["message"] and backend.target not in error["message"], error
    assert events[-1] == "[DONE]"
    assert "RuntimeError: engine crashed" in logged_under(gateway_log, "rid-crash")


async def test_bad_request_from_llm_svc_keeps_its_message_without_the_peer(gateway_url, backend, fake):
    response = await failing_request(gateway_url, chat("hi", max_tokens=5000), "rid-400")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "max_tokens=5000 exceeds the context length"


VLLM_TOO_LONG = ("The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure "
                 "that `max_model_len` is no smaller than the number of text tokens plus multimodal tokens.")


PEER = "10.0.0.7:50051"


@pytest.mark.parametrize("error, status, message", [
    (errors.InvalidInput(VLLM_TOO_LONG, peer=PEER), 400, VLLM_TOO_LONG),
    (errors.InvalidInput("image 0: not an image", peer="vision_svc [fd00::7]:50052"), 400, "image 0: not an image"),
    (errors.InvalidInput("image 0: cannot fetch http://example.com:8080/a.png: ConnectError"), 400,
     "image 0: cannot fetch http://example.com:8080/a.png: ConnectError"),
    (errors.Overloaded("queue is full (64 waiting)", peer=PEER), 429, "queue is full (64 waiting)"),
    (errors.NotFound("The model `gpt-4o` does not exist."), 404, "The model `gpt-4o` does not exist."),
    (errors.InternalError("internal error: KeyError: 'x'", peer=PEER), 500,
     "Internal server error; the server's log has the details under request id R"),
    (errors.Unavailable("failed to connect to all addresses", peer=PEER), 503,
     "Service unavailable (llm_svc down), retry later; request id R"),
    (errors.Unavailable("down", metadata=((errors.FAILED_STAGE_KEY, "vision_svc"),), peer=PEER), 503,
     "Service unavailable (vision_svc down), retry later; request id R"),
    (errors.DeadlineExceeded("Deadline Exceeded", peer=PEER), 504,
     "Deadline exceeded: the request did not finish in time; request id R"),
], ids=lambda value: value.code.name if isinstance(value, errors.ServingError) else None)
def test_client_messages(error, status, message):
    assert client_message(error, status, "R") == message


def test_grpc_codes_without_a_mapping_are_opaque_500s():
    class DataLoss(errors.ServingError):
        code = grpc.StatusCode.DATA_LOSS

    token = request_id_var.set("R")
    try:
        status, body = http_error(DataLoss("frame checksum mismatch", peer=PEER))
    finally:
        request_id_var.reset(token)
    assert status == 500 and "10.0.0.7" not in body["error"]["message"] and "R" in body["error"]["message"]
