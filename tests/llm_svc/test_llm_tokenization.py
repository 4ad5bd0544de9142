"""Tokenize and Detokenize on vLLM's engine: the token ids equal those vLLM gives the engine for the same prompt, a
chat's images included (fed to vLLM as raw images), and token ids decode back to their text."""

import hashlib
import threading

import pytest
import transformers

from llm_svc.admission import AdmissionCheck
from llm_svc.image_tokens import ImageTokenCounter
from llm_svc.limits import RequestLimits
from llm_svc.prompts import RENDER_IN_PLACE_CHARS, ImageRef, Message, PromptRenderer
from llm_svc.servicer import tokenize_input_from_pb, tokens_to_pb
from llm_svc.tokenization import TokenizationService, TokenizeInput, Tokens
from llm_svc.vision_client import ImageBlob
from protos import llm_pb2
from protos.errors import InvalidInput
from tests.llm_svc.llm_helpers import chat, image, png_bytes
from tests.llm_svc.test_llm_admission import policy_of

LIMITS = RequestLimits(max_images_per_request=2, max_request_bytes=64 << 20, max_image_bytes_per_request=32 << 20,
                       max_embedding_bytes=64 << 20, vision_timeout_s=10, max_requests_in_flight=8,
                       max_bytes_in_flight=1 << 30)


@pytest.fixture(scope="module")
def service(vllm_engine, tiny_checkpoint):
    """What llm_svc builds on the engine, on the tiny checkpoint's vision tiling; and the engine."""
    llm_engine = vllm_engine("original", "dense", limit_mm_per_prompt={"image": 2}).llm_engine
    counter = ImageTokenCounter(policy_of(tiny_checkpoint(layout="original", llm="dense")))
    admission = AdmissionCheck(llm_engine.renderer, llm_engine.input_processor, llm_engine.get_supported_tasks(),
                               counter, llm_engine.model_config.hf_text_config.hidden_size)
    prompts = PromptRenderer(llm_engine.renderer)
    return TokenizationService(llm_engine.renderer, prompts, admission, LIMITS), prompts, llm_engine


def blob(data: bytes | None, content_hash: str | None = None) -> ImageBlob:
    return ImageBlob(content_hash or hashlib.sha256(data).hexdigest(), data)


def chat_input(blobs: list[ImageBlob], text: str, **fields) -> TokenizeInput:
    messages = [Message("user", (*(ImageRef(b.content_hash) for b in blobs), text))]
    return TokenizeInput("t", messages, None, blobs, fields.pop("add_special_tokens", None),
                         fields.pop("return_token_strs", False), fields.pop("max_tiles", 0), **fields)


@pytest.mark.parametrize("sizes,max_tiles", [([], 0), ([(1200, 900)], 0), ([(500, 700), (60, 2000)], 0),
                                             ([(1200, 900)], 2)])
async def test_a_chats_tokens_equal_vllms_with_the_raw_images(service, sizes, max_tiles):
    tokenization, prompts, llm_engine = service
    pictures = [image(w, h, seed=n) for n, (w, h) in enumerate(sizes)]
    blobs = [blob(png_bytes(p)) for p in pictures]
    tokens = await tokenization.tokenize(chat_input(blobs, "Compare them.", max_tiles=max_tiles))

    raw = {"prompt": prompts.render(chat_input(blobs, "Compare them.").messages)}
    if pictures:
        raw["multi_modal_data"] = {"image": pictures}
    if max_tiles:
        raw["mm_processor_kwargs"] = {"max_dynamic_patch": max_tiles}
    (monolithic,) = await llm_engine.renderer.render_cmpl_async([raw])
    assert tokens.token_ids == list(monolithic["prompt_token_ids"])
    assert tokens.token_strs is None


def test_a_chat_renders_to_the_templates_text_without_tokenizing_it(service, monkeypatch):
    """The engine input tokenizes the text once; the template's own tokenizing would be a second pass."""
    _, prompts, llm_engine = service
    tokenized = []
    tokenize = transformers.PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__",
                        lambda self, *args, **kwargs: tokenized.append(args) or tokenize(self, *args, **kwargs))
    text = prompts.render(chat_input([], "Hello there.").messages)
    assert tokenized == []
    assert text == llm_engine.renderer.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Hello there."}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("chars,in_place", [(200, True), (RENDER_IN_PLACE_CHARS, True),
                                             (RENDER_IN_PLACE_CHARS + 1, False)])
async def test_a_short_prompt_is_tokenized_on_the_event_loop_and_a_long_one_on_vllms_thread(
        service, monkeypatch, chars, in_place):
    """The hand-over to vLLM's tokenizer thread costs more than tokenizing a short prompt; either way the engine input
    is the one vLLM's renderer makes."""
    _, prompts, llm_engine = service
    threads = []
    tokenize = transformers.PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__",
                        lambda self, *args, **kwargs: threads.append(threading.get_ident()) or tokenize(self, *args,
                                                                                                      **kwargs))
    text = ("The quick brown fox. " * chars)[:chars]
    engine_input = await prompts.engine_input({"prompt": text})
    assert len(threads) == 1 and (threads[0] == threading.get_ident()) == in_place
    monkeypatch.undo()
    (vllms,) = await llm_engine.renderer.render_cmpl_async([{"prompt": text}])
    assert engine_input["prompt_token_ids"] == vllms["prompt_token_ids"]
    assert engine_input["prompt"] == text


async def test_a_prompt_is_tokenized_as_is_with_special_tokens_as_asked(service):
    tokenization, _, llm_engine = service
    tokenizer = llm_engine.renderer.get_tokenizer()
    text = "Hello <image> world"  # a placeholder in a raw prompt is text, as in vLLM
    for special in (None, True, False):
        tokens = await tokenization.tokenize(TokenizeInput("t", None, text, [], special, True, 0))
        assert tokens.token_ids == tokenizer.encode(text, add_special_tokens=special is not False)
        assert tokens.token_strs == tokenizer.convert_ids_to_tokens(tokens.token_ids)


async def test_a_prompt_over_the_context_is_still_tokenized(service):
    tokenization, _, _ = service
    tokens = await tokenization.tokenize(TokenizeInput("t", None, "a " * 9000, [], None, False, 0))
    assert len(tokens.token_ids) > 8192


async def test_detokenize_gives_back_the_text(service):
    tokenization, prompts, _ = service
    text = prompts.render([Message("user", ("Tell me a story.",))])
    tokens = await tokenization.tokenize(TokenizeInput("t", None, text, [], None, False, 0))
    assert await tokenization.detokenize(tokens.token_ids) == text


async def test_an_image_of_unknown_size_or_too_many_images_are_refused(service):
    tokenization, _, _ = service
    with pytest.raises(InvalidInput, match=r"images \[0\] are named by content hash"):
        await tokenization.tokenize(chat_input([blob(None, "ab" * 32)], "Hi"))
    data = png_bytes(image(64, 64, seed=0))
    with pytest.raises(InvalidInput, match="3 images in one request; the limit is 2"):
        await tokenization.tokenize(chat_input([blob(data)] * 3, "Hi"))


def test_the_proto_defaults_are_vllms_per_form():
    prompt = tokenize_input_from_pb(llm_pb2.TokenizeRequest(prompt="hi"))
    assert (prompt.prompt, prompt.special_tokens, prompt.return_token_strs, prompt.request_id.startswith("tokenize-")) \
        == ("hi", True, False, True)
    request = llm_pb2.TokenizeRequest(chat=chat(("user", [image(8, 8, seed=0), "hi"])), max_tiles=3,
                                      return_token_strs=True, request_id="r")
    converted = tokenize_input_from_pb(request)
    assert (converted.special_tokens, converted.max_tiles, len(converted.images), converted.request_id) \
        == (False, 3, 1, "r")
    request.add_special_tokens = True
    assert tokenize_input_from_pb(request).special_tokens is True
    with pytest.raises(InvalidInput, match="neither chat messages nor a prompt"):
        tokenize_input_from_pb(llm_pb2.TokenizeRequest())
    assert tokens_to_pb(Tokens([5, 6], None), 8192) == llm_pb2.TokenizeResponse(token_ids=[5, 6], max_model_len=8192)


async def test_more_placeholders_than_images_is_vllms_refusal(service):
    tokenization, _, _ = service
    data = png_bytes(image(64, 64, seed=0))
    with pytest.raises(InvalidInput, match="placeholders in input prompt than actual multimodal data items"):
        await tokenization.tokenize(chat_input([blob(data)], "<image> <image> two?"))
