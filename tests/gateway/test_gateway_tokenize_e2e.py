"""vLLM's /tokenize, /detokenize, /version and the /v1/models card end to end: the same request to the real stack and
to vLLM's own OpenAI server (same tiny checkpoint, same flags) gets the same answer, token for token; images in a
chat are counted as vLLM counts them, though the vision stage never sees them here.

The stack and vLLM's server are the package's (tests/gateway/conftest.py), shared with the other e2e modules.
"""

import base64

import httpx
import pytest

from tests.gateway.conftest import MODEL
from tests.llm_svc.llm_helpers import image, png_bytes

STORY = [{"role": "user", "content": "Tell me a story."}]


def data_url(width: int, height: int, seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image(width, height, seed))).decode()


def with_images(*sizes: tuple[int, int], text: str = "Compare them.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(w, h, seed=n)}} for n, (w, h) in enumerate(sizes)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def same(servers, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    ours, theirs = servers
    mine, vllms = ours.request(method, path, json=body), theirs.request(method, path, json=body)
    assert mine.status_code == vllms.status_code, (mine.text, vllms.text)
    assert mine.json() == vllms.json()
    return mine.status_code, mine.json()


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": "Hello, world! <image> stays text here."},
    {"prompt": "Hello", "add_special_tokens": False, "return_token_strs": True},
    {"model": MODEL, "messages": STORY},
    {"messages": [*STORY, {"role": "assistant", "content": "Once upon"}], "add_generation_prompt": False,
     "continue_final_message": True, "return_token_strs": True},
], ids=["prompt", "prompt-token-strs", "chat", "chat-prefill"])
def test_tokenize_equals_vllms(servers, body):
    status, answer = same(servers, "POST", "/tokenize", body)
    assert status == 200 and answer["count"] == len(answer["tokens"]) > 0


@pytest.mark.parametrize("sizes", [[(1200, 900)], [(500, 700), (60, 2000)]], ids=["one-image", "two-images"])
def test_tokenize_counts_images_as_vllm_does(servers, sizes):
    _, answer = same(servers, "POST", "/tokenize", {"model": MODEL, "messages": with_images(*sizes)})
    _, text_only = same(servers, "POST", "/tokenize", {"model": MODEL, "messages": with_images(text="Compare them.")})
    # Each image adds whole tiles of 256 tokens, and more than one tile for these sizes.
    assert answer["count"] - text_only["count"] > 256 * len(sizes) + 2 * len(sizes)


def test_detokenize_round_trips_as_vllms(servers):
    _, tokens = same(servers, "POST", "/tokenize", {"model": MODEL, "prompt": "Hello, world!"})
    _, text = same(servers, "POST", "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})
    assert text == {"prompt": "Hello, world!"}
    _, chat = same(servers, "POST", "/tokenize", {"messages": STORY})
    _, rendered = same(servers, "POST", "/detokenize", {"tokens": chat["tokens"]})
    assert "Tell me a story." in rendered["prompt"]


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"model": "no-such-model", "prompt": "hi"}),
    ("/detokenize", {"model": "no-such-model", "tokens": [1]}),
], ids=["tokenize", "detokenize"])
def test_an_unknown_model_is_a_404_as_vllms(servers, path, body):
    ours, theirs = servers
    mine, vllms = ours.post(path, json=body), theirs.post(path, json=body)
    assert mine.status_code == vllms.status_code == 404
    assert mine.json()["error"]["message"] == vllms.json()["error"]["message"]


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"model": MODEL}),
    ("/tokenize", {"messages": STORY, "add_generation_prompt": True, "continue_final_message": True}),
    ("/detokenize", {"tokens": [-1]}),
    ("/detokenize", {"tokens": "1 2 3"}),
], ids=["neither-form", "prefill-and-generation-prompt", "negative-token", "tokens-not-a-list"])
def test_bad_input_is_a_400_as_vllms(servers, path, body):
    ours, theirs = servers
    assert ours.post(path, json=body).status_code == theirs.post(path, json=body).status_code == 400


def test_tokenize_takes_the_api_key(stack):
    response = httpx.post(f"http://{stack['gateway'].address}/tokenize", json={"prompt": "hi"})
    assert response.status_code == 401


def test_version_is_vllms_with_ours_beside_it(servers):
    ours, theirs = servers
    mine = httpx.get(ours.base_url.join("/version")).json()  # open, like /health: no key sent
    assert mine["version"] == theirs.get("/version").json()["version"]
    assert mine["internvl_dvd_version"]


def test_models_card_has_vllms_fields(servers):
    ours, theirs = servers
    (mine,), (vllms,) = ours.get("/v1/models").json()["data"], theirs.get("/v1/models").json()["data"]
    assert mine.keys() == vllms.keys()
    assert mine["permission"][0].keys() == vllms["permission"][0].keys()
    same_values = ("id", "object", "owned_by", "parent", "max_model_len")
    assert {k: mine[k] for k in same_values} == {k: vllms[k] for k in same_values}
    stable = lambda permission: {k: v for k, v in permission.items() if k not in ("id", "created")}  # noqa: E731
    assert stable(mine["permission"][0]) == stable(vllms["permission"][0])



def test_a_corrupt_image_is_a_400(servers):
    ours, _ = servers
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG junk").decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": corrupt}}]}]}
    response = ours.post("/tokenize", json=body)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("text", ["<image> and?", "<image> <image> two?"], ids=["as-many", "one-too-many"])
def test_placeholders_written_in_the_text_are_counted_as_vllm_does(servers, text):
    ours, theirs = servers
    body = {"messages": with_images((64, 64), text=text)}
    mine, vllms = ours.post("/tokenize", json=body).json(), theirs.post("/tokenize", json=body).json()
    # The same tokens, or the same refusal (vLLM's message; the error body's other fields are the gateway's).
    assert mine.get("tokens", mine.get("error", {}).get("message")) \
        == vllms.get("tokens", vllms.get("error", {}).get("message"))
