"""llm_svc under generated input, over gRPC and through the gateway, against real stages: every request gets a
result or a client status (never INTERNAL, UNKNOWN or a 5xx), and vision_svc and llm_svc stay SERVING.

A bounded, reproducible run of `bench.fuzz`'s strategies; `python -m bench.fuzz --minutes N` runs them longer."""

import base64

import grpc
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import fuzz
from protos import llm_pb2
from tests.llm_svc.llm_helpers import LlmClient, chat, greedy, image, png_bytes
from tests.stack import start_gateway, start_llm, start_vision, stop_all

# Few tokens, or a value to refuse: the engine's work per request stays small. The context is 1024 tokens.
MAX_TOKENS = fuzz.mostly(st.integers(1, 3), st.sampled_from([0, 1025, (1 << 32) - 1]))


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint(layout="original", llm="dense")
    logs = tmp_path_factory.mktemp("logs")
    vision = start_vision(model, logs)
    # A short context bounds whatever gets through: long prompts and large images are refused before any work.
    # Started with vision_svc, not after it: llm_svc waits for vision_svc by itself.
    llm = start_llm(model, [vision], logs, "--max-model-len", "1024")
    vision.wait_ready()
    llm.wait_ready()
    gateway = start_gateway([llm], logs, "--max-tokens-limit", "16", "--image-fetch-timeout-s", "1").wait_ready()
    client = LlmClient(llm.address)
    yield vision, llm, gateway, client
    client.close()
    stop_all([gateway, llm, vision])


def assert_stages_serving(stack) -> None:
    vision, llm, gateway, client = stack
    assert fuzz.grpc_serving(vision.address) and fuzz.grpc_serving(llm.address)
    assert httpx.get(f"http://{gateway.address}/health", timeout=10).status_code == 200
    request = llm_pb2.GenerateRequest(chat=chat(("user", [image(100, 100, 1), "Hi"])), sampling=greedy(3))
    assert len(client.tokens(request)) == 3


def test_more_image_placeholders_than_images_is_a_client_error(stack):
    """vLLM refuses it while parsing the chat (VLLMValidationError), which once came back as INTERNAL / 500."""
    _, _, gateway, client = stack
    picture = image(100, 100, 2)
    with pytest.raises(grpc.RpcError) as error:
        client.generate(llm_pb2.GenerateRequest(chat=chat(("user", ["<image> and <image>?", picture])),
                                                sampling=greedy(3)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "placeholders" in error.value.details()
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()
    response = httpx.post(f"http://{gateway.address}/v1/chat/completions", timeout=60, json={
        "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<image> and <image>?"}, {"type": "image_url", "image_url": {"url": data_url}}]}]})
    assert response.status_code == 400 and "placeholders" in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("fields", [
    {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
    {"parallel_tool_calls": True},
    {"parallel_tool_calls": True, "messages": [{"role": "tool", "content": "", "tool_call_id": ""}]},
], ids=["tools-choice-none", "parallel-calls", "tool-message"])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_fields_on_a_server_without_a_tool_parser_are_answered(stack, fields, stream):
    """The llm_svc here has no --tool-call-parser: each of these once failed INTERNAL / 500 (`bench.fuzz` found it)."""
    _, _, gateway, _ = stack
    body = {"max_tokens": 3, "stream": stream, "messages": [{"role": "user", "content": "Hi"}], **fields}
    response = httpx.post(f"http://{gateway.address}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200 and fuzz.http_status(response) == 200, response.text


def test_a_truncation_that_cuts_out_an_image_is_a_client_error(stack):
    """vLLM truncates before the image placeholder expands; one cut out failed an assertion: INTERNAL, a 500."""
    _, _, gateway, client = stack
    picture = image(100, 100, 3)
    with pytest.raises(grpc.RpcError) as error:
        client.generate(llm_pb2.GenerateRequest(chat=chat(("user", [picture, "Describe it."])), sampling=greedy(3),
                                                truncate_prompt_tokens=4))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncate_prompt_tokens=4" in error.value.details()
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()
    response = httpx.post(f"http://{gateway.address}/v1/chat/completions", timeout=60, json={
        "max_tokens": 3, "truncate_prompt_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "Describe it."}]}]})
    assert response.status_code == 400 and "truncate_prompt_tokens" in response.json()["error"]["message"], \
        response.text


@pytest.mark.parametrize("definitions, named", [
    ("5", "tools"), ("[10000000000000000000000000000000000000000]", "tools.0"),
    ('[{"type": "function", "function": 5}]', "tools.0.function")])
def test_tools_of_the_wrong_shape_with_a_named_choice_are_a_client_error(stack, definitions, named):
    """vLLM's check of a named tool_choice reads the tools before their shape is checked: a TypeError, INTERNAL."""
    _, _, _, client = stack
    request = chat(("user", ["Hi"]))
    request.tools.CopyFrom(llm_pb2.Tools(definitions_json=definitions, function_name="get_weather"))
    with pytest.raises(grpc.RpcError) as error:
        client.generate(llm_pb2.GenerateRequest(chat=request, sampling=greedy(3)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(named + ":"), error.value.details()


def test_generated_generate_requests_get_no_internal_error(stack):
    _, _, _, client = stack

    @fuzz.bounded_run(max_examples=100)
    @given(request=fuzz.generate_request_pb(max_tokens=MAX_TOKENS))
    def generate(request):
        code, details = fuzz.grpc_code(client.stub.Generate(request, timeout=60))
        assert code not in fuzz.GRPC_SERVER_ERRORS, f"{code}: {details} for {fuzz.summary(request)}"

    generate()
    assert_stages_serving(stack)


def test_generated_http_requests_through_the_gateway_get_no_5xx(stack):
    _, _, gateway, _ = stack
    cases = fuzz.http_cases(in_schema=True, max_tokens=MAX_TOKENS) | fuzz.http_cases(
        in_schema=False, max_tokens=MAX_TOKENS, huge_size=64 << 10)

    with httpx.Client(base_url=f"http://{gateway.address}", timeout=60) as http:
        @fuzz.bounded_run(max_examples=60)
        @given(case=cases)
        def post(case):
            response = http.post(case.path, content=case.body)
            assert fuzz.http_status(response) < 500, f"{case!r} -> {response.status_code} {response.text[:500]}"

        post()
    assert_stages_serving(stack)
