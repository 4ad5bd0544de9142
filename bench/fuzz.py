"""Fuzzing with generated input: every stage answers every request with a result or a client error, never a
server error, and stays healthy.

    python -m bench.fuzz --minutes 5
    python -m bench.fuzz --minutes 5 --parsers   # llm_svc with vLLM's tool-call and reasoning parsers

starts the real stack (vision_svc, llm_svc, gateway; the tiny checkpoint) and for that long sends each target
generated requests in turn: the gateway HTTP bodies inside its schema and outside it, llm_svc GenerateRequests
and vision_svc EncodeRequests over gRPC. It prints per target the cases run and their answers (HTTP 2xx / 4xx /
5xx; over gRPC OK / a client status / INTERNAL or UNKNOWN), the first server errors, and whether each stage is
still healthy; it exits 1 when a server error was seen or a stage is down. The strategies here also drive the
bounded runs of the test suite (`tests/*/test_*_fuzz.py`), and set every field of the gRPC requests
(`tests/bench/test_bench_fuzz.py` holds them to it).

HTTP bodies come from the gateway's pydantic models, through their JSON schema (`schema_values`): the gateway's
OpenAPI document describes no request bodies (its routes read the raw body, to cap its size), so a tool driven
by that document, such as schemathesis, would have nothing to generate from.
"""

import argparse
import base64
import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import struct
import time
import zlib
from collections.abc import Callable

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from PIL import Image

from gateway.schemas import ChatCompletionRequest, CompletionRequest
from protos import llm_pb2, vision_pb2

# ---- values: edges of every integer type, floats that are not numbers, text that means something ----------

INT_EDGES = (0, 1, -1, 2, (1 << 31) - 1, 1 << 31, -(1 << 31), -(1 << 31) - 1, (1 << 32) - 1, 1 << 32,
             (1 << 53) + 1, (1 << 63) - 1, 1 << 63, -(1 << 63), -(1 << 63) - 1, 1 << 64, 10 ** 40)
FLOAT_EDGES = (0.0, -0.0, 5e-324, 1e-45, 1e-6, 1.0000001, 2.0000001, 3.4e38, 1e308, -1e308, math.inf, -math.inf,
               math.nan)
# Special tokens, template syntax, controls, bidi and BOM, an emoji, JSON's escapes.
SPECIAL_TEXT = ("<image>", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
                "{{ messages }}", "{% if %}", "\x00", "\x1b[0m", "\u202e", "\ufeff", "\U0001f600", "\\", '"', "\n")
GRPC_SERVER_ERRORS = frozenset({"INTERNAL", "UNKNOWN"})


def ints(low: int | None = None, high: int | None = None) -> st.SearchStrategy[int]:
    edges = [v for v in INT_EDGES if (low is None or v >= low) and (high is None or v <= high)]
    return st.sampled_from(edges) | st.integers(low, high) if edges else st.integers(low, high)


def floats(low: float | None = None, high: float | None = None, exclude_low: bool = False,
           width: int = 64) -> st.SearchStrategy[float]:
    if low is None and high is None:
        return st.sampled_from(FLOAT_EDGES) | st.floats(width=width)
    edges = [v for v in FLOAT_EDGES if (low is None or v > low or (v == low and not exclude_low))
             and (high is None or v <= high)]
    return st.sampled_from(edges or [low]) | st.floats(low, high, exclude_min=exclude_low, allow_nan=False,
                                                       width=width)


def mostly(usual: st.SearchStrategy, unusual: st.SearchStrategy, one_in: int = 8) -> st.SearchStrategy:
    """`usual`, and one time in `one_in` `unusual`: so that a request with many fields has them all usual often
    enough to get past the first check and reach the code behind it. (Hypothesis favours small integers: the
    usual branch is the small one.)"""
    return st.integers(1, one_in).flatmap(lambda roll: unusual if roll == one_in else usual)


def text(max_size: int = 48) -> st.SearchStrategy[str]:
    pieces = st.lists(st.sampled_from(SPECIAL_TEXT) | st.text(max_size=8), max_size=max(1, max_size // 8))
    return st.text(max_size=max_size) | pieces.map("".join)


# ---- images -------------------------------------------------------------------------------------------------

def png(width: int, height: int, rgb: int = 0x808080) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), tuple(rgb.to_bytes(3, "big"))).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR claiming width x height, then nothing: a decompression bomb's announcement."""
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


# Images sent again and again, so that their hashes hit a cache.
REPEATED_SIDES = (64, 100)


def image_bytes(max_side: int = 1200) -> st.SearchStrategy[bytes]:
    """Valid PNGs half of the time; else random bytes, truncated PNGs, headers announcing up to 2**32 - 1 pixels a
    side with no pixels behind them, JPEG markers and then garbage."""
    valid = st.builds(png, st.integers(1, max_side), st.integers(1, max_side), st.integers(0, (1 << 24) - 1)) | \
        st.sampled_from(REPEATED_SIDES).map(lambda side: png(side, side))
    broken = st.one_of(st.binary(max_size=256), valid.flatmap(lambda b: st.integers(0, len(b) - 1).map(
        lambda n: b[:n])), st.builds(png_header, ints(0, (1 << 32) - 1), ints(0, (1 << 32) - 1)),
        st.binary(max_size=64).map(lambda tail: b"\xff\xd8\xff\xe0" + tail))
    return valid | broken


def content_hashes() -> st.SearchStrategy[str]:
    """Hashes of images `image_bytes` sends often (cache hits), well-formed unknown ones, and any text."""
    sent = st.sampled_from(REPEATED_SIDES).map(lambda side: hashlib.sha256(png(side, side)).hexdigest())
    return sent | st.binary(min_size=32, max_size=32).map(bytes.hex) | text(80)


def image_urls() -> st.SearchStrategy[str]:
    """data:, http(s)://, file:// and other URLs, with hosts that parsers disagree on."""
    hosts = st.sampled_from(("0177.0.0.1", "127.1", "0x7f.1", "2130706433", "[::1", "[::1]", "[fe80::1%25lo]",
                             "a" * 64 + ".example", "xn--", "bücher.invalid", "10.0.0.1", "", "u:p@127.0.0.1",
                             "127.0.0.1:99999", "127.0.0.1:-1", "%00", "host.invalid")) | text(16)
    http = st.builds("{}://{}/{}".format, st.sampled_from(("http", "https", "HTTP")), hosts, text(16))
    payloads = st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()) | text(16)
    data = st.builds("data:{};base64,{}".format, st.sampled_from(("image/png", "image/", "text/plain", "")),
                     payloads | image_bytes(max_side=600).map(lambda b: base64.b64encode(b).decode()))
    files = st.builds("file://{}".format, st.sampled_from(("/etc/passwd", "[::1/x", "/tmp/a%00b", "localhost/x",
                                                           "//host/share", "")) | text(16))
    return data | http | files | text(32)


# ---- HTTP bodies --------------------------------------------------------------------------------------------

def schema_values(schema: dict, overrides: dict[str, st.SearchStrategy], defs: dict | None = None,
                  text_size: int = 48) -> st.SearchStrategy:
    """Values valid for the subset of JSON schema that pydantic emits; `overrides` replace the strategy of
    object properties by name (image URLs, bounded max_tokens)."""
    defs = schema.get("$defs", {}) if defs is None else defs

    def of(sub: dict) -> st.SearchStrategy:
        return schema_values(sub, overrides, defs, text_size)

    if "$ref" in schema:
        return of(defs[schema["$ref"].rsplit("/", 1)[1]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of(*map(of, schema.get("anyOf") or schema["oneOf"]))
    kind = schema.get("type")
    if kind == "integer":
        return ints(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        exclusive = "exclusiveMinimum" in schema
        return floats(schema.get("exclusiveMinimum", schema.get("minimum")), schema.get("maximum"), exclusive)
    if kind == "array":
        return st.lists(of(schema["items"]), min_size=schema.get("minItems", 0), max_size=schema.get("maxItems", 4))
    if kind == "object":
        properties = {name: overrides[name] if name in overrides else of(sub)
                      for name, sub in schema.get("properties", {}).items()}
        required = {name: properties.pop(name) for name in schema.get("required", [])}
        return st.fixed_dictionaries(required, optional=properties)
    if kind is None:  # any JSON value (a field typed Any, such as a structural tag's format)
        return st.none() | st.booleans() | ints(None, None) | text(text_size)
    return {"string": text(text_size), "boolean": st.booleans(), "null": st.none()}[kind]


@dataclasses.dataclass(frozen=True)
class HttpCase:
    path: str
    body: bytes

    def __repr__(self) -> str:
        shown = self.body[:300].decode(errors="replace")
        return f"POST {self.path} {shown}{'...' if len(self.body) > 300 else ''} ({len(self.body)} bytes)"


ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


def valid_bodies(path: str, text_size: int = 48, max_tokens: st.SearchStrategy[int] | None = None
                 ) -> st.SearchStrategy[dict]:
    """Bodies inside the endpoint's schema. With `max_tokens`, both token limits are always set from it, so that
    a real engine's work stays bounded whatever else a body asks."""
    # The served model's name (null) mostly, and token ids mostly inside the tiny model's vocabulary (3007), so
    # that the refusal of one field does not hide what the others would do.
    overrides = {"url": image_urls(), "model": mostly(st.none(), text(16)),
                 "stop_token_ids": mostly(st.none() | st.lists(ints(0, 3000), max_size=3),
                                          st.lists(ints(0, (1 << 32) - 1), max_size=3))}
    if max_tokens is not None:
        overrides |= {"max_tokens": max_tokens, "max_completion_tokens": max_tokens}
    bodies = schema_values(ENDPOINTS[path].model_json_schema(), overrides, text_size=text_size)
    if max_tokens is None:
        return bodies
    return st.builds(lambda body, limit: {"max_tokens": limit, "max_completion_tokens": limit, **body},
                     bodies, max_tokens)


_SPLICE = "\x00splice\x00"


def json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | ints() | floats() | text()
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(8), inner,
                                                                                             max_size=4),
                        max_leaves=8)


def _slots(value, path=()) -> list[tuple]:
    """Every (container, key) inside a JSON value: where a mutation can go."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    slots = []
    for key, inner in items:
        slots.append((value, key))
        slots += _slots(inner)
    return slots


@st.composite
def mutated_body(draw, path: str, text_size: int, max_tokens, huge_size: int) -> bytes:
    """A valid body with one value replaced: a value of any type, an extreme number, deep nesting or a huge
    string; in a field the body has, a field of the model it lacks, or a key of its own."""
    body = draw(valid_bodies(path, text_size, max_tokens))
    slots = _slots(body) + [(body, name) for name in ENDPOINTS[path].model_fields] + [(body, draw(text(8)))]
    container, key = draw(st.sampled_from(slots))
    splice = None
    match draw(st.sampled_from(("value", "deep", "huge"))):
        case "value":
            container[key] = draw(json_values())
        case "deep":  # spliced into the JSON text: json.dumps itself would stop at Python's recursion limit
            depth, (opening, closing) = draw(st.integers(1, 5000)), draw(st.sampled_from((("[", "]"), ('{"a":', "}"))))
            container[key], splice = _SPLICE, opening * depth + "1" + closing * depth
        case "huge":
            container[key] = draw(st.sampled_from(("x", "\U0001f600", "<image>"))) * draw(st.integers(1, huge_size))
    encoded = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans()))
    return (encoded.replace(json.dumps(_SPLICE), splice) if splice else encoded).encode()


def raw_bodies(path: str) -> st.SearchStrategy[bytes]:
    """Bodies that are not JSON objects: bytes, truncated or non-object JSON, lone surrogates, bad UTF-8."""
    valid = valid_bodies(path).map(lambda body: json.dumps(body).encode())
    return st.one_of(st.binary(max_size=512), valid.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
                     json_values().map(lambda v: json.dumps(v, allow_nan=True).encode()),
                     st.sampled_from((b'{"messages": [{"role": "user", "content": "\\ud800"}], "prompt": "\\udfff"}',
                                      b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', b"", b"null")))


def http_cases(in_schema: bool, text_size: int = 48, max_tokens: st.SearchStrategy[int] | None = None,
               huge_size: int = 4 << 20) -> st.SearchStrategy[HttpCase]:
    """Chat and text completion requests, inside the schema or outside it; out-of-schema strings go up to
    `huge_size` characters."""
    def for_path(path: str) -> st.SearchStrategy[HttpCase]:
        if in_schema:
            bodies = valid_bodies(path, text_size, max_tokens).map(lambda b: json.dumps(b, allow_nan=True).encode())
        else:
            bodies = mutated_body(path, text_size, max_tokens, huge_size) | raw_bodies(path)
        return bodies.map(lambda body: HttpCase(path, body))
    return st.one_of(*map(for_path, ENDPOINTS))


def http_status(response: httpx.Response) -> int:
    """The status the client sees: the HTTP status or, for a stream that failed after it began, its error event's."""
    if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        for event in response.text.split("\n\n"):
            if event.startswith('data: {"error"'):
                return json.loads(event.removeprefix("data: "))["error"]["code"]
    return response.status_code


# ---- gRPC requests ------------------------------------------------------------------------------------------

UINT32, INT32, INT64 = (0, (1 << 32) - 1), (-(1 << 31), (1 << 31) - 1), (-(1 << 63), (1 << 63) - 1)
UINT64 = (0, (1 << 64) - 1)


def repeated(element: st.SearchStrategy, min_size: int = 0, max_size: int = 6, huge: int = 20000
             ) -> st.SearchStrategy[list]:
    """A short list of generated elements or, one time in ten, one element repeated 0 to `huge` times."""
    many = st.builds(lambda item, n: [item] * n, element, st.integers(0, huge))
    return mostly(st.lists(element, min_size=min_size, max_size=max_size), many, one_in=10)


def optional_fields(message_type, required: dict | None = None, **optional: st.SearchStrategy):
    """Messages of `message_type` with the `required` fields always set and each of the `optional` ones set or not."""
    return st.fixed_dictionaries(required or {}, optional=optional).map(lambda fields: message_type(**fields))


def json_text(usual: tuple[str, ...], max_size: int = 64) -> st.SearchStrategy[str]:
    """One of the `usual` JSON texts, else any JSON value's text or any text."""
    return mostly(st.sampled_from(usual), json_values().map(json.dumps) | text(max_size))


def between(low: float, high: float, exclude_low: bool = False) -> st.SearchStrategy[float]:
    return mostly(floats(low, high, exclude_low), floats(width=32))


def counted(low: int, high: int, wire: tuple[int, int]) -> st.SearchStrategy[int]:
    return mostly(ints(low, high), ints(*wire))


def structured_outputs_pb() -> st.SearchStrategy[llm_pb2.StructuredOutputs]:
    """One constraint (or none, or several, which is refused): small ones that compile quickly, else any text."""
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    return optional_fields(
        llm_pb2.StructuredOutputs, json=json_text((schema, '{"type": "string", "enum": ["x", "y"]}')),
        regex=mostly(st.sampled_from(("[a-z]{1,3}", "yes|no", r"\d+")), text(16)),
        choice=st.builds(llm_pb2.Choices, values=mostly(st.lists(text(8), max_size=3), repeated(text(8), huge=1000))),
        grammar=mostly(st.just('root ::= "a" | "b"'), text(32)), json_object=st.booleans(),
        structural_tag=json_text(("{}",), 32), disable_any_whitespace=st.booleans(),
        disable_additional_properties=st.booleans(), whitespace_pattern=mostly(st.just(" ?"), text(8)))


def sampling_pb(max_tokens: st.SearchStrategy[int] = ints(*UINT32)) -> st.SearchStrategy[llm_pb2.SamplingParams]:
    """Each field mostly in its valid range, else at any value its type holds; `max_tokens` is always set, so that
    a real engine's work is bounded."""
    token_ids = mostly(st.lists(ints(0, 3000), max_size=3), repeated(ints(*UINT32)))
    return optional_fields(
        llm_pb2.SamplingParams, {"max_tokens": max_tokens},
        temperature=between(0.0, 2.0), top_p=between(0.0, 1.0, exclude_low=True), min_p=between(0.0, 1.0),
        presence_penalty=between(-2.0, 2.0), frequency_penalty=between(-2.0, 2.0),
        repetition_penalty=between(0.0, 2.0, exclude_low=True), top_k=counted(-1, 100, INT32), seed=ints(*INT64),
        logprobs=counted(0, 20, UINT32), n=counted(1, 1, UINT32), ignore_eos=st.booleans(),
        stop=mostly(st.lists(text(16).filter(bool), max_size=3), repeated(text(16), huge=100)),
        stop_token_ids=token_ids, min_tokens=counted(0, 4, UINT32),
        bad_words=mostly(st.lists(text(16), max_size=3), repeated(text(16), huge=100)),
        allowed_token_ids=token_ids, include_stop_str_in_output=st.booleans(), skip_special_tokens=st.booleans(),
        spaces_between_special_tokens=st.booleans(), structured_outputs=structured_outputs_pb(),
        prompt_logprobs=counted(-1, 5, INT32),
        logit_bias=mostly(st.dictionaries(ints(0, 3000), between(-100.0, 100.0), max_size=3),
                          st.dictionaries(ints(*UINT32), floats(width=32), max_size=3)))


def video_source(message_type) -> st.SearchStrategy:
    """A video's bytes (never a real video: decoding one costs seconds) or a content hash, as `message_type`."""
    return st.binary(max_size=256).map(lambda d: message_type(data=d)) | \
        content_hashes().map(lambda h: message_type(content_hash=h))


def video_options(message_type) -> st.SearchStrategy:
    """How a video's frames are sampled (both stages' VideoOptions have these fields)."""
    return optional_fields(message_type, num_frames=counted(-1, 32, INT32), fps=between(0.0, 30.0))


def _image_part(kind: str, value) -> llm_pb2.ImagePart:
    return llm_pb2.ImagePart(**{kind: value}) if kind else llm_pb2.ImagePart()


def content_part_pb(text_size: int = 48) -> st.SearchStrategy[llm_pb2.ContentPart]:
    """Text, an image, or now and then a video (bytes that are no video, or a hash) or an empty part."""
    image = mostly(image_bytes().map(lambda d: _image_part("data", d)) |
                   content_hashes().map(lambda h: _image_part("content_hash", h)), st.just(_image_part("", None)))
    video = video_source(llm_pb2.VideoPart)
    return mostly(text(text_size).map(lambda t: llm_pb2.ContentPart(text=t)) |
                  image.map(lambda i: llm_pb2.ContentPart(image=i)),
                  video.map(lambda v: llm_pb2.ContentPart(video=v)) | st.just(llm_pb2.ContentPart()))


TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])


def tools_pb() -> st.SearchStrategy[llm_pb2.Tools]:
    """OpenAI's tools, tool_choice and parallel_tool_calls: mostly a valid tool and a known choice."""
    mode = mostly(st.sampled_from(("none", "auto", "required")), text(12))
    function = mostly(st.just("get_weather"), text(16))
    choice = st.one_of(st.just({}), mode.map(lambda m: {"mode": m}), function.map(lambda f: {"function_name": f}))
    return st.builds(lambda definitions, chosen, parallel: llm_pb2.Tools(
        definitions_json=definitions, **chosen, **({} if parallel is None else {"parallel_calls": parallel})),
        json_text((TOOLS, "", "[]")), choice, st.none() | st.booleans())


def chat_pb(text_size: int = 48) -> st.SearchStrategy[llm_pb2.Chat]:
    # Proto3 enums are open: any int32 is a role.
    roles = mostly(st.sampled_from(tuple(llm_pb2.Role.values())), ints(*INT32))
    tool_call = st.builds(llm_pb2.ToolCall, id=text(16), name=mostly(st.just("get_weather"), text(16)),
                          arguments=json_text(('{"city": "Paris"}', "{}"), 32))
    message = optional_fields(llm_pb2.ChatMessage, {"role": roles, "content": repeated(content_part_pb(text_size),
                                                                                        huge=300)},
                              tool_calls=repeated(tool_call, max_size=2, huge=300), tool_call_id=text(16))
    return optional_fields(
        llm_pb2.Chat, {"messages": repeated(message, min_size=1, max_size=4, huge=300)},
        add_generation_prompt=st.booleans(), continue_final_message=st.booleans(),
        chat_template_kwargs_json=json_text(('{"enable_thinking": false}', "{}"), 32), tools=tools_pb())


def generate_request_pb(text_size: int = 48, max_tokens: st.SearchStrategy[int] = ints(*UINT32)
                        ) -> st.SearchStrategy[llm_pb2.GenerateRequest]:
    prompt = mostly(text(text_size).filter(bool), st.just(""))
    prompt_tokens = st.builds(llm_pb2.PromptTokens, token_ids=mostly(st.lists(ints(0, 3000), min_size=1, max_size=16),
                                                                     repeated(ints(*UINT32), huge=5000)))
    inputs = st.one_of(chat_pb(text_size).map(lambda c: {"chat": c}), prompt.map(lambda p: {"prompt": p}),
                       prompt_tokens.map(lambda t: {"prompt_tokens": t}), st.just({}))
    fields = optional_fields(
        dict, {"request_id": text(40), "sampling": sampling_pb(max_tokens),
               "max_tiles": mostly(st.integers(0, 13), ints(*UINT32))},
        return_prompt_text=st.booleans(), parse_at_end=st.booleans(),
        truncate_prompt_tokens=mostly(ints(-1, 2000), ints(*INT64)),
        truncation_side=mostly(st.sampled_from(("left", "right", "")), text(8)), continuous_usage=st.booleans(),
        video_options=video_options(llm_pb2.VideoOptions))
    return st.builds(lambda given, what: llm_pb2.GenerateRequest(**given, **what), fields, inputs)


def data_plane_offer_pb() -> st.SearchStrategy[vision_pb2.DataPlaneOffer]:
    """Offers the caller did not negotiate: slots that are not this data plane's, tokens no connection brings, leases
    mostly short (a socket offer waits for its connection up to the lease), and a Mooncake session on the loopback
    only: the server must never be led to connect to an address a client names."""
    slot = st.builds(vision_pb2.SharedMemorySlot, name=mostly(st.just("dvd-emb-0-1"), text(24)),
                     size_bytes=ints(*UINT64))
    return optional_fields(
        vision_pb2.DataPlaneOffer, transport=mostly(st.sampled_from(tuple(vision_pb2.Transport.values())),
                                                    ints(*INT32)),
        slots=repeated(slot, max_size=3, huge=1000), socket_token=st.binary(max_size=32),
        lease_ms=mostly(st.integers(0, 50), ints(*UINT32), one_in=50),
        mooncake_session=st.sampled_from(("127.0.0.1:1", "127.0.0.1", "", "no session")),
        mooncake_buffers=repeated(ints(*UINT64), max_size=3), mooncake_buffer_bytes=ints(*UINT64))


def encode_request_pb() -> st.SearchStrategy[vision_pb2.EncodeRequest]:
    image = mostly(image_bytes().map(lambda d: vision_pb2.ImageInput(data=d)) |
                   content_hashes().map(lambda h: vision_pb2.ImageInput(content_hash=h)),
                   st.just(vision_pb2.ImageInput()))
    options = st.builds(vision_pb2.PreprocessOptions, max_tiles=mostly(st.integers(0, 13), ints(*UINT32)),
                        thumbnail=mostly(st.sampled_from(tuple(vision_pb2.Thumbnail.values())), ints(*INT32)))
    return optional_fields(
        vision_pb2.EncodeRequest, {"request_id": text(40), "images": repeated(image, min_size=1, huge=1000),
                                   "options": options},
        data_plane=data_plane_offer_pb(), videos=repeated(video_source(vision_pb2.VideoInput), max_size=2, huge=100),
        video_options=video_options(vision_pb2.VideoOptions))


def bounded_run(max_examples: int) -> settings:
    """The test suite's runs: bounded and reproducible (the same examples every run: derandomized, no example
    database), no deadline (2 shared cores), and no complaint about large or slowly built examples (their point)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def grpc_code(call) -> tuple[str, str]:
    """(status name, details) of a server-streaming call, read to its end."""
    try:
        for _ in call:
            pass
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


def grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def summary(request) -> str:
    """A request shortened for a report: long bytes and repeated fields elided."""
    shown = str(request).replace("\n", " ")
    return shown[:400] + (f"... ({request.ByteSize()} bytes)" if len(shown) > 400 else "")


# ---- the long run -------------------------------------------------------------------------------------------

KINDS = ("success", "client error", "server error")


@dataclasses.dataclass
class Tally:
    """Answers of one target, by kind (HTTP 2xx / 4xx / 5xx; gRPC OK / another status / INTERNAL or UNKNOWN)."""
    cases: int = 0
    seconds: float = 0.0
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, answer: str, kind: str, describe: Callable[[], str]) -> None:
        self.cases += 1
        self.kinds[kind] += 1
        self.answers[answer] += 1
        if kind == "server error" and len(self.failures) < 5:
            self.failures.append(f"{answer} for {describe()}")


def http_target(base_url: str, in_schema: bool, tally: Tally):
    client = httpx.Client(base_url=base_url, timeout=120)
    max_tokens = mostly(ints(1, 4), ints(5, 1 << 20))  # the stack's gateway refuses above 16 (--max-tokens-limit)
    strategy = http_cases(in_schema, text_size=256, max_tokens=max_tokens, huge_size=256 << 10)

    def send(case: HttpCase) -> None:
        try:
            status = http_status(client.post(case.path, content=case.body))
        except httpx.TransportError as error:  # no answer at all: the gateway hung up or is gone
            tally.add(f"no answer ({type(error).__name__})", "server error", lambda: repr(case))
            return
        kind = "server error" if status >= 500 else "client error" if status >= 400 else "success"
        tally.add(str(status), kind, lambda: repr(case))
    return strategy, send


def grpc_target(stub_call: Callable, strategy: st.SearchStrategy, tally: Tally):
    def send(request) -> None:
        code, details = grpc_code(stub_call(request, timeout=120))
        kind = "success" if code == "OK" else "server error" if code in GRPC_SERVER_ERRORS else "client error"
        tally.add(code, kind, lambda: f"{summary(request)}: {details[:300]}")
    return strategy, send


def run_batch(strategy: st.SearchStrategy, send: Callable, examples: int, seed: int) -> None:
    """`examples` cases of `strategy`, generated only (no shrinking: nothing here fails, `send` counts)."""
    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def batch(case):
        send(case)
    batch()


# What README's tools and thinking sections start llm_svc with: the answers then go through vLLM's parsers.
PARSER_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]


def start_stack(work: pathlib.Path, llm_flags: list[str]):
    from deploy.local import free_port, gateway_stage, llm_stage, vision_stage
    from deploy.tiny_model.build import build

    model = build(work / "tiny", layout="original")
    logs = work / "logs"
    vision = vision_stage(model, free_port(), ["--preprocess-workers", "0"], logs / "fuzz-vision.log").wait_ready()
    # A short context bounds the work of any request that gets through (long prompts, images), and max_new_tokens
    # the answers of requests that leave max_tokens unset or null, which the gateway's --max-tokens-limit does not
    # bound: 3 prompts with n=101 each ran to the context's end, 300,000 tokens, past the client's timeout.
    llm = llm_stage(model, [vision], free_port(), ["--max-model-len", "1024", "--max-num-seqs", "8",
                                                   "--kv-cache-memory-bytes", str(256 << 20),
                                                   "--override-generation-config", '{"max_new_tokens": 16}',
                                                   *llm_flags],
                    logs / "fuzz-llm.log").wait_ready()
    gateway = gateway_stage([llm], "127.0.0.1", free_port(), ["--max-tokens-limit", "16",
                                                             "--image-fetch-timeout-s", "1"],
                            logs / "fuzz-gateway.log").wait_ready()
    return vision, llm, gateway


def stack_health(vision, llm, gateway_url: str) -> dict[str, bool]:
    try:
        gateway = httpx.get(f"{gateway_url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        gateway = False
    return {"vision_svc": grpc_serving(vision.address), "llm_svc": grpc_serving(llm.address), "gateway": gateway}


def report(tallies: dict[str, Tally], health: dict[str, bool]) -> str:
    from bench.common import markdown_table

    rows = [[name, t.cases, f"{t.cases / max(t.seconds, 1e-9):.1f}", *(t.kinds[k] for k in KINDS),
             ", ".join(f"{answer} {n}" for answer, n in t.answers.most_common())] for name, t in tallies.items()]
    table = markdown_table(["target", "cases", "cases/s", "2xx / OK", "4xx / client status",
                            "5xx / INTERNAL, UNKNOWN", "answers"], rows)
    stages = markdown_table(["stage", "healthy at the end"], [[k, "SERVING" if v else "NOT SERVING"]
                                                              for k, v in health.items()])
    failures = [f"- {name}: {f}" for name, t in tallies.items() for f in t.failures]
    return "\n\n".join([table, stages] + (["first server errors:\n" + "\n".join(failures)] if failures else []))


def main() -> None:
    from bench.common import work_dir

    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to fuzz, all targets together")
    parser.add_argument("--batch", type=int, default=25, help="cases per target before moving to the next")
    parser.add_argument("--seed", type=int, default=None, help="first hypothesis seed (default: from the clock)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    parser.add_argument("--parsers", action="store_true",
                        help=f"start llm_svc with vLLM's tool-call and reasoning parsers ({' '.join(PARSER_FLAGS)}), "
                             "so that answers are parsed too; without it, tool fields only reach the chat template")
    args = parser.parse_args()
    work = work_dir(args.work_dir)
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"seed {seed}, logs in {work / 'logs'}, parsers {'on' if args.parsers else 'off'}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    vision, llm, gateway = start_stack(work, PARSER_FLAGS if args.parsers else [])
    try:
        from protos import llm_pb2_grpc, vision_pb2_grpc
        tallies = {name: Tally() for name in ("gateway, inside the schema", "gateway, outside the schema",
                                              "llm_svc Generate", "vision_svc Encode")}
        base = f"http://{gateway.address}"
        llm_stub = llm_pb2_grpc.LanguageModelStub(grpc.insecure_channel(llm.address))
        vision_stub = vision_pb2_grpc.VisionEncoderStub(grpc.insecure_channel(vision.address))
        targets = [http_target(base, True, tallies["gateway, inside the schema"]),
                   http_target(base, False, tallies["gateway, outside the schema"]),
                   grpc_target(llm_stub.Generate, generate_request_pb(256, mostly(ints(1, 4), ints(*UINT32))),
                               tallies["llm_svc Generate"]),
                   grpc_target(vision_stub.Encode, encode_request_pb(), tallies["vision_svc Encode"])]
        deadline = time.monotonic() + args.minutes * 60
        health = stack_health(vision, llm, base)
        while time.monotonic() < deadline and all(health.values()):
            for (strategy, send), tally in zip(targets, tallies.values()):
                started = time.perf_counter()
                run_batch(strategy, send, args.batch, seed)
                tally.seconds += time.perf_counter() - started
                seed += 1
            health = stack_health(vision, llm, base)  # a stage that is down stops the run: what follows is noise
            print(f"{', '.join(f'{n}: {t.cases}' for n, t in tallies.items())}; healthy: "
                  f"{', '.join(k for k, v in health.items() if v)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for stage in (gateway, llm, vision):
            stage.stop()
    print("\n" + report(tallies, health))
    if any(t.kinds["server error"] for t in tallies.values()) or not all(health.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
