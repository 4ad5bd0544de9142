"""Table tests of the gateway's pure functions: OpenAI JSON <-> LanguageModel messages, data URLs, addresses."""

import base64
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import translate
from gateway.errors import HTTP_BY_GRPC_CODE, PayloadTooLarge, http_error
from gateway.images import decode_data_url, is_public_address
from gateway.responses import sse
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from protos import errors, llm_pb2

META = translate.ResponseMeta("chatcmpl-r1", 1700000000, "m")


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


@pytest.mark.parametrize("fields, expected", [
    ({}, llm_pb2.SamplingParams(n=1)),
    ({"temperature": 0, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": -3},
     llm_pb2.SamplingParams(n=1, temperature=0, top_p=0.9, top_k=20, min_p=0.05, seed=-3)),
    ({"max_tokens": 10}, llm_pb2.SamplingParams(n=1, max_tokens=10)),
    ({"max_tokens": 10, "max_completion_tokens": 20}, llm_pb2.SamplingParams(n=1, max_tokens=20)),
    ({"stop": "\n"}, llm_pb2.SamplingParams(n=1, stop=["\n"])),
    ({"stop": ["a", "b"], "stop_token_ids": [2]}, llm_pb2.SamplingParams(n=1, stop=["a", "b"], stop_token_ids=[2])),
    ({"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "ignore_eos": True},
     llm_pb2.SamplingParams(n=1, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                            ignore_eos=True)),
    ({"logprobs": True}, llm_pb2.SamplingParams(n=1, logprobs=0)),
    ({"logprobs": True, "top_logprobs": 3}, llm_pb2.SamplingParams(n=1, logprobs=3)),
    ({"logprobs": False, "top_logprobs": 0}, llm_pb2.SamplingParams(n=1)),
])
def test_chat_sampling_fields(fields, expected):
    generate = translate.chat_generate_request(chat_request(**fields), [], "r1", max_tokens_limit=100)
    assert generate.sampling == expected and generate.request_id == "r1"


def test_max_tokens_above_the_limit_is_invalid_input():
    with pytest.raises(errors.InvalidInput, match="above this server's limit of 100"):
        translate.chat_generate_request(chat_request(max_tokens=101), [], "r1", max_tokens_limit=100)


def test_chat_conversion_places_images_in_message_order():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "rules"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u0"}},
                                     {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": "u1", "detail": "high"}}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "more"}], "mm_processor_kwargs": {"max_dynamic_patch": 6}})
    assert translate.image_urls(request) == ["u0", "u1"]
    generate = translate.chat_generate_request(request, [b"i0", b"i1"], "r", 100)
    assert generate.max_tiles == 6 and generate.WhichOneof("input") == "chat"
    contents = [(m.role, [p.image.data if p.HasField("image") else p.text for p in m.content])
                for m in generate.chat.messages]
    assert contents == [
        (llm_pb2.ROLE_SYSTEM, ["rules"]), (llm_pb2.ROLE_USER, [b"i0", "and", b"i1"]),
        (llm_pb2.ROLE_ASSISTANT, [""]), (llm_pb2.ROLE_USER, ["more"])]


def test_completion_request_is_a_raw_prompt():
    request = CompletionRequest.model_validate({"prompt": ["Once"], "max_tokens": 3, "logprobs": 2})
    generate = translate.completion_generate_request(request, "r", 100)
    assert generate.prompt == "Once" and generate.sampling.max_tokens == 3 and generate.sampling.logprobs == 2


def message(text="", reason=llm_pb2.FINISH_REASON_UNSPECIFIED, usage=None, logprobs=(), stop_reason=""):
    return llm_pb2.GenerateResponse(text=text, finish_reason=reason, usage=usage, logprobs=logprobs,
                                    stop_reason=stop_reason)


LP = llm_pb2.TokenLogprob(token_id=5, token="é", logprob=-1.5, top=[llm_pb2.TopLogprob(token="é", logprob=-1.5)])


@pytest.mark.parametrize("response, with_logprobs, choice", [
    (message("Hi"), False, {"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}),
    (message(), False, None),
    (message("", llm_pb2.FINISH_REASON_STOP), False,
     {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}),
    (message("!", llm_pb2.FINISH_REASON_LENGTH), False,
     {"index": 0, "delta": {"content": "!"}, "logprobs": None, "finish_reason": "length", "stop_reason": None}),
    (message("", llm_pb2.FINISH_REASON_ABORT), False,
     {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "abort", "stop_reason": None}),
    (message("", llm_pb2.FINISH_REASON_STOP, stop_reason="###"), False,
     {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "stop_reason": "###"}),
    (message("é", logprobs=[LP]), True,
     {"index": 0, "delta": {"content": "é"}, "finish_reason": None, "logprobs": {"content": [
         {"token": "é", "logprob": -1.5, "bytes": [195, 169],
          "top_logprobs": [{"token": "é", "logprob": -1.5, "bytes": [195, 169]}]}]}}),
])
def test_chat_chunks(response, with_logprobs, choice):
    chunk = translate.chat_chunk(response, META, with_logprobs)
    if choice is None:
        assert chunk is None
    else:
        assert chunk == {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1700000000,
                         "model": "m", "choices": [choice]}


def test_chat_completion_aggregates_text_reason_and_usage():
    usage = llm_pb2.Usage(prompt_tokens=7, completion_tokens=2, cached_tokens=3)
    body = translate.chat_completion([message("Hel"), message("lo", llm_pb2.FINISH_REASON_LENGTH, usage)], META,
                                     with_logprobs=False)
    assert body == {"id": "chatcmpl-r1", "object": "chat.completion", "created": 1700000000, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                 "logprobs": None, "finish_reason": "length", "stop_reason": None}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
                              "prompt_tokens_details": {"cached_tokens": 3}}}
    streamed = translate.usage_chunk(META, "chat.completion.chunk", usage)
    assert streamed["choices"] == []
    assert streamed["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


@pytest.mark.parametrize("chat,reasoning,before_tokens,expected", [
    (False, None, False, {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}),
    (True, None, False, {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
                         "completion_tokens_details": None}),
    (True, 1, False, {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
                      "completion_tokens_details": {"reasoning_tokens": 1}}),
    (True, 1, True, {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7,
                     "completion_tokens_details": {"reasoning_tokens": 0}}),
])
def test_running_usage_is_vllm_s_continuous_usage(chat, reasoning, before_tokens, expected):
    choice_usage = llm_pb2.Usage(prompt_tokens=7, completion_tokens=2, reasoning_tokens=reasoning)
    assert translate.running_usage_json(choice_usage, chat, before_tokens) == expected


def test_completion_logprobs_offsets_continue_across_chunks():
    tokens = [llm_pb2.TokenLogprob(token_id=i, token=t, logprob=-1.0) for i, t in enumerate(("ab", "c"))]
    shown = translate.completion_logprobs(translate.generated_tokens(message(logprobs=tokens)), text_offset=4)
    assert shown == {"tokens": ["ab", "c"], "token_logprobs": [-1.0, -1.0],
                     "top_logprobs": [{"ab": -1.0}, {"c": -1.0}], "text_offset": [4, 6]}


def test_completion_top_logprobs_list_the_token_first_as_vllm_does():
    # A sampled token outside the top 2 is listed before them (3 entries); one inside them is listed once, first.
    top = [llm_pb2.TopLogprob(token_id=1, token="a", logprob=-0.125), llm_pb2.TopLogprob(token_id=2, token="b",
                                                                                       logprob=-0.25)]
    outside = llm_pb2.TokenLogprob(token_id=3, token="c", logprob=float("-inf"), top=top)
    inside = llm_pb2.TokenLogprob(token_id=2, token="b", logprob=-0.25, top=top)
    shown = translate.generated_tokens(message(logprobs=[outside, inside]))
    assert [list(t[2].items()) for t in shown] == [[("c", -9999.0), ("a", -0.125), ("b", -0.25)],
                                                   [("b", -0.25), ("a", -0.125)]]
    assert shown[0][1] == translate.LOWEST_LOGPROB


PROMPT = [llm_pb2.PromptTokenLogprob(token_id=7, token="Once"),
          llm_pb2.PromptTokenLogprob(token_id=8, token=" upon", logprob=-3.0, rank=4, top=[
              llm_pb2.TopLogprob(token_id=1, token="a", logprob=-0.125),
              llm_pb2.TopLogprob(token_id=2, token="b", logprob=-0.25)])]


def test_prompt_logprobs_as_vllm_returns_them():
    assert translate.prompt_logprobs_json(PROMPT) == [None, {
        "8": {"logprob": -3.0, "rank": 4, "decoded_token": " upon"},
        "1": {"logprob": -0.125, "rank": 1, "decoded_token": "a"},
        "2": {"logprob": -0.25, "rank": 2, "decoded_token": "b"}}]


def test_echo_puts_the_prompt_before_each_choice():
    first = llm_pb2.GenerateResponse(text=" a", prompt_text="Once upon", prompt_logprobs=PROMPT, logprobs=[
        llm_pb2.TokenLogprob(token_id=1, token=" a", logprob=-0.5)])
    other = llm_pb2.GenerateResponse(index=1, text=" b", finish_reason=llm_pb2.FINISH_REASON_STOP)
    last = llm_pb2.GenerateResponse(text="!", finish_reason=llm_pb2.FINISH_REASON_LENGTH,
                                    usage=llm_pb2.Usage(prompt_tokens=2, completion_tokens=3))
    body = translate.completion([first, other, last], META, with_logprobs=True, echo=True, top_logprobs=1, n=2)
    assert [c["text"] for c in body["choices"]] == ["Once upon a!", "Once upon b"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    shown = body["choices"][0]["logprobs"]
    assert shown["tokens"] == ["Once", " upon", " a"] and shown["text_offset"] == [0, 4, 9]
    assert shown["token_logprobs"] == [None, -3.0, -0.5]
    # One alternative asked for: the prompt token and the best one.
    assert shown["top_logprobs"][:2] == [None, {" upon": -3.0, "a": -0.125}]
    assert body["choices"][1]["prompt_logprobs"] == translate.prompt_logprobs_json(PROMPT)
    assert body["usage"]["completion_tokens"] == 3


def test_chat_choices_by_index_with_echo_and_role():
    request = chat_request(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
                           echo=True, n=2)
    assert translate.chat_echo_text(request) == "Sure" and translate.response_role(request) == "assistant"
    assert translate.chat_echo_text(chat_request(echo=True)) == ""
    no_generation_prompt = chat_request(add_generation_prompt=False, echo=True)
    assert translate.response_role(no_generation_prompt) == "user"
    assert translate.chat_echo_text(no_generation_prompt) == "hi"
    messages = [llm_pb2.GenerateResponse(index=1, text=",", finish_reason=llm_pb2.FINISH_REASON_STOP),
                llm_pb2.GenerateResponse(index=0, text="!", finish_reason=llm_pb2.FINISH_REASON_STOP,
                                         usage=llm_pb2.Usage(prompt_tokens=4, completion_tokens=2))]
    body = translate.chat_completion(messages, META, False, "assistant", "Sure")
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "Sure!"), (1, "Sure,")]
    chunks = translate.chat_first_chunks(META, 2, "assistant", "Sure")
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""}),
        (0, {"content": "Sure"}), (1, {"content": "Sure"})]


def test_completion_requests_carry_token_ids_echo_and_prompt_logprobs():
    tokens = translate.completion_generate_request(
        CompletionRequest.model_validate({"prompt": [[5, 6, 7]], "echo": True, "logprobs": 2, "n": 3}), "r", 100)
    assert list(tokens.prompt_tokens.token_ids) == [5, 6, 7] and tokens.return_prompt_text
    assert (tokens.sampling.n, tokens.sampling.prompt_logprobs, tokens.sampling.logprobs) == (3, 2, 2)
    text = translate.completion_generate_request(CompletionRequest.model_validate({"prompt": "x", "echo": True}),
                                                 "r", 100)
    assert text.prompt == "x" and not text.sampling.HasField("prompt_logprobs")
    chat = translate.chat_generate_request(chat_request(prompt_logprobs=3), [], "r", 100)
    assert chat.sampling.prompt_logprobs == 3 and not chat.return_prompt_text
    assert translate.chat_generate_request(chat_request(echo=True), [], "r", 100).sampling.prompt_logprobs == 0


@pytest.mark.parametrize("error, status, error_type", [
    (errors.InvalidInput("x"), 400, "BadRequestError"),
    (errors.NotFound("x"), 404, "NotFoundError"),
    (errors.Overloaded("x"), 429, "RateLimitError"),
    (errors.Unavailable("x"), 503, "ServiceUnavailableError"),
    (errors.DeadlineExceeded("x"), 504, "GatewayTimeoutError"),
    (errors.InternalError("x"), 500, "InternalServerError"),
    (PayloadTooLarge("x"), 413, "PayloadTooLargeError"),
])
def test_http_errors(error, status, error_type):
    got_status, body = http_error(error)
    assert (got_status, body["error"]["type"], body["error"]["param"], body["error"]["code"]) == \
        (status, error_type, None, status)
    # A 4xx keeps its message; a 5xx says only its kind (test_gateway_error_bodies.py has the wording).
    assert (body["error"]["message"] == "x") == (status < 500)
    assert HTTP_BY_GRPC_CODE[error.code][0] == status or isinstance(error, PayloadTooLarge)


@pytest.mark.parametrize("payload", [b"", b"a", b"ab", b"abc", bytes(range(256)) * 3])
def test_data_url_decoded_size_is_known_before_decoding(payload):
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    assert decode_data_url(url, limit=len(payload)) == payload
    if payload:
        with pytest.raises(PayloadTooLarge):
            decode_data_url(url, limit=len(payload) - 1)


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("0.0.0.0", False),
    ("100.64.0.1", False), ("224.0.0.1", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True), ("240.0.0.1", False),
])
def test_public_addresses(address, public):
    assert is_public_address(address) is public


_JSON_LEAVES = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text())
_JSON_VALUES = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _JSON_VALUES, max_size=6))
def test_an_sse_event_is_one_line_of_json_that_reads_back_as_its_payload(payload):
    event = sse(payload)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[len(b"data: "):-2]) == payload


def test_an_sse_event_writes_what_json_cannot_carry_as_null():
    assert sse({"logprob": float("nan"), "top": [float("-inf")]}) == b'data: {"logprob":null,"top":[null]}\n\n'


# What the engine can send (a log-probability, as the contract's float32), -inf and NaN among them.
ANY_LOGPROB = st.floats(max_value=0.0, width=32) | st.sampled_from([float("-inf"), float("nan")])


def floor(value: float) -> float:
    return translate.LOWEST_LOGPROB if math.isnan(value) else max(value, translate.LOWEST_LOGPROB)


@given(token=ANY_LOGPROB, top=st.lists(ANY_LOGPROB, max_size=3))
@settings(max_examples=200, deadline=None)
def test_every_logprob_a_response_carries_is_valid_json(token, top):
    """-inf (a token the grammar masks) and NaN become vLLM's floor, -9999.0: a chat answer's logprobs, a
    completion's and the prompt's all serialize as strict JSON."""
    alternatives = [llm_pb2.TopLogprob(token_id=n, token=f"t{n}", logprob=v) for n, v in enumerate(top)]
    response = llm_pb2.GenerateResponse(
        logprobs=[llm_pb2.TokenLogprob(token_id=9, token="x", logprob=token, top=alternatives)],
        prompt_logprobs=[llm_pb2.PromptTokenLogprob(token_id=9, token="x", logprob=token, rank=1, top=alternatives)])
    chat = translate.chat_logprobs(response)
    json.dumps([chat, translate.generated_tokens(response), translate.prompt_logprobs_json(response.prompt_logprobs)],
               allow_nan=False)
    assert chat[0]["logprob"] == floor(token)
    assert [t["logprob"] for t in chat[0]["top_logprobs"]] == [floor(v) for v in top]
