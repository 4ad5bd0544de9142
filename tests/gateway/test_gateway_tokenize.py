"""/tokenize, /detokenize, /version and the /v1/models card against a scripted LanguageModel: every field of vLLM's
tokenize requests is carried or refused by name, each form reaches the proto with vLLM's defaults, and the answers
have vLLM's shape."""

import base64

import httpx
import pytest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest as VllmDetokenizeRequest
from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest as VllmTokenizeChatRequest
from vllm.entrypoints.serve.tokenize.protocol import TokenizeCompletionRequest as VllmTokenizeCompletionRequest

from gateway.tokenization import (REFUSED_FIELDS, DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest,
                                  tokenize_request, tokenize_to_proto)
from protos import errors, llm_pb2, llm_pb2_grpc, server_version
from protos.server import GrpcServer
from tests.gateway.conftest import MODEL, FakeLanguageModel, gateway_config, png_bytes, running_gateway

CHAT = [{"role": "user", "content": "hi"}]


class TokenizingFake(FakeLanguageModel):
    """Answers Tokenize with three tokens, Detokenize with their text, and records the requests."""

    def __init__(self):
        super().__init__()
        self.tokenize_requests: list[llm_pb2.TokenizeRequest] = []

    async def Tokenize(self, request, context):
        self.tokenize_requests.append(request)
        return llm_pb2.TokenizeResponse(token_ids=[7, 8, 9], max_model_len=4096,
                                        token_strs=["a", "b", "c"] if request.return_token_strs else [])

    async def Detokenize(self, request, context):
        if any(t >= 1000 for t in request.token_ids):
            raise errors.InvalidInput("Token id 1000 is out of vocabulary")
        return llm_pb2.DetokenizeResponse(text="abc")

    async def GetVersion(self, request, context):
        return llm_pb2.GetVersionResponse(vllm_version="0.32.0", server_version="0.1.0")


@pytest.fixture(scope="module")
async def tokenizing():
    """(the scripted backend, the gateway's URL)."""
    servicer = TokenizingFake()
    server = GrpcServer("127.0.0.1", 0, max_message_bytes=64 << 20, grace_s=0.5, announce_s=0)
    server.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server, servicer, "internvl.llm.v1.LanguageModel")
    port = await server.start()
    await server.set_serving()
    async with running_gateway(gateway_config(f"127.0.0.1:{port}", api_key="k")) as url:
        yield servicer, url
    await server.drain()


@pytest.fixture
async def http(tokenizing):
    servicer, url = tokenizing
    servicer.tokenize_requests.clear()
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer k"}) as client:
        yield client


@pytest.mark.parametrize("theirs,ours", [(VllmTokenizeCompletionRequest, TokenizeCompletionRequest),
                                         (VllmTokenizeChatRequest, TokenizeChatRequest),
                                         (VllmDetokenizeRequest, DetokenizeRequest)])
def test_every_vllm_tokenize_field_is_carried_or_refused(theirs, ours):
    assert set(theirs.model_fields) - set(ours.model_fields) - set(REFUSED_FIELDS) == set()
    assert set(ours.model_fields) & set(REFUSED_FIELDS) == set()


def test_a_body_with_messages_is_a_chat_as_in_vllm():
    assert isinstance(tokenize_request({"prompt": "x", "messages": CHAT}), TokenizeChatRequest)
    assert isinstance(tokenize_request({"prompt": "x"}), TokenizeCompletionRequest)


def test_each_form_reaches_the_proto_with_vllms_defaults():
    prompt = tokenize_to_proto(tokenize_request({"prompt": "x"}), [], "r")
    assert (prompt.prompt, prompt.add_special_tokens, prompt.return_token_strs) == ("x", True, False)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}},
                                                      {"type": "text", "text": "what?"}]}],
            "add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": {"x": 1},
            "mm_processor_kwargs": {"max_dynamic_patch": 4}, "return_token_strs": True}
    chat = tokenize_to_proto(tokenize_request(body), [b"PNG"], "r")
    assert (chat.add_special_tokens, chat.max_tiles, chat.return_token_strs, chat.request_id) == (False, 4, True, "r")
    assert (chat.chat.add_generation_prompt, chat.chat.continue_final_message) == (False, True)
    assert chat.chat.chat_template_kwargs_json == '{"x": 1}'
    assert chat.chat.messages[0].content[0].image.data == b"PNG"


async def test_tokenize_answers_in_vllms_shape(http, tokenizing):
    servicer, _ = tokenizing
    response = await http.post("/tokenize", json={"model": MODEL, "prompt": "hi"})
    assert response.status_code == 200
    assert response.json() == {"count": 3, "max_model_len": 4096, "tokens": [7, 8, 9], "token_strs": None}
    strs = await http.post("/tokenize", json={"messages": CHAT, "return_token_strs": True})
    assert strs.json()["token_strs"] == ["a", "b", "c"]
    assert [r.WhichOneof("input") for r in servicer.tokenize_requests] == ["prompt", "chat"]


async def test_a_chats_images_travel_as_bytes(http, tokenizing):
    servicer, _ = tokenizing
    data = png_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    assert (await http.post("/tokenize", json=body)).status_code == 200
    assert servicer.tokenize_requests[-1].chat.messages[0].content[0].image.data == data


@pytest.mark.parametrize("path,body,status,named", [
    ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "The model `other` does not exist."),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "The model `other` does not exist."),
    ("/tokenize", {"messages": CHAT, "chat_template": "{{ x }}"}, 400, "chat_template"),
    ("/tokenize", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", [1, 2], 400, "object"),
    ("/detokenize", {"tokens": [1 << 32]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1000]}, 400, "out of vocabulary"),
])
async def test_errors_are_vllms_statuses(http, tokenizing, path, body, status, named):
    servicer, _ = tokenizing
    response = await http.post(path, json=body)
    assert response.status_code == status and named in response.json()["error"]["message"]
    assert servicer.tokenize_requests == []


async def test_tools_none_or_empty_are_accepted(http):
    for tools in (None, []):
        assert (await http.post("/tokenize", json={"messages": CHAT, "tools": tools})).status_code == 200


async def test_detokenize_and_version(tokenizing, http):
    _, url = tokenizing
    assert (await http.post("/detokenize", json={"tokens": [7, 8, 9]})).json() == {"prompt": "abc"}
    async with httpx.AsyncClient(base_url=url) as without_key:
        assert (await without_key.post("/detokenize", json={"tokens": [1]})).status_code == 401
        version = await without_key.get("/version")  # open, as /health
    assert version.json() == {"version": "0.32.0", "internvl_dvd_version": server_version()}


async def test_the_model_card_has_vllms_fields(http):
    (card,) = (await http.get("/v1/models")).json()["data"]
    assert card.keys() == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
    assert (card["id"], card["root"], card["max_model_len"], card["parent"]) == (MODEL, MODEL, 4096, None)
    assert card["permission"][0]["object"] == "model_permission"
