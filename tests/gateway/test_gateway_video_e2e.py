"""Videos end to end: the same chat to the real stack and to vLLM's own OpenAI server (same tiny checkpoint, which
holds the video context token) gets the same greedy tokens and the same prompt token count, streamed and not, for
a video alone and for a video beside an image; hostile videos are a 400 and the stages keep serving.

The stack and vLLM's server are the package's (tests/gateway/conftest.py).
"""

import base64
import io

import pytest
from PIL import Image

from tests.gateway.conftest import MODEL, assembled, streamed_chat
from tests.vision_svc.video_helpers import data_url, hostile_videos, make_video

GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 8}


def png_url(size=(40, 30), color=(20, 120, 220)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat(*parts: dict) -> dict:
    return {**GREEDY, "messages": [{"role": "user", "content": [*parts, {"type": "text",
                                                                         "text": "What happens in the clip?"}]}]}


def video_part(video: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(video)}}


def answer(client, body: dict) -> dict:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "usage": {k: response.json()["usage"][k] for k in ("prompt_tokens", "completion_tokens")}}


@pytest.mark.parametrize("parts", [
    [video_part(make_video(6))],
    [{"type": "image_url", "image_url": {"url": png_url()}}, video_part(make_video(5, size=(64, 96)))],
], ids=["video", "image and video"])
def test_greedy_tokens_and_prompt_tokens_equal_vllm_s_server(servers, parts):
    ours, theirs = servers
    body = chat(*parts)
    mine = answer(ours, body)
    assert mine == answer(theirs, body)
    # Every frame is 256 context tokens: the video reached the engine as embeddings, not as a placeholder.
    assert mine["usage"]["prompt_tokens"] > 5 * 256
    ours_streamed, theirs_streamed = assembled(*streamed_chat(ours, body)), assembled(*streamed_chat(theirs, body))
    assert ours_streamed == theirs_streamed
    assert ours_streamed["content"] == mine["content"]


def test_num_frames_reaches_the_vision_stage(servers):
    ours, _ = servers
    clip = make_video(10)
    every = answer(ours, chat(video_part(clip)))["usage"]["prompt_tokens"]
    four = answer(ours, {**chat(video_part(clip)), "media_io_kwargs": {"video": {"num_frames": 4}}})
    # Each frame left out is its 256 context tokens and its "FrameN: <img></img>" text.
    assert every - four["usage"]["prompt_tokens"] >= 6 * 256


@pytest.mark.parametrize("name", list(hostile_videos()))
def test_a_hostile_video_is_a_400_and_the_stages_keep_serving(stack, servers, name):
    ours, _ = servers
    data = hostile_videos()[name]
    response = ours.post("/v1/chat/completions", json=chat({"type": "video_url", "video_url": {
        "url": f"data:video/mp4;base64,{base64.b64encode(data).decode()}"}}))
    assert response.status_code == 400, response.text
    assert "video" in response.json()["error"]["message"]
    assert all(stack[stage].healthy() for stage in ("vision", "llm", "gateway"))  # gRPC health SERVING, /health 200
    assert answer(ours, {**GREEDY, "max_tokens": 1, "messages": [{"role": "user", "content": "still there?"}]})


@pytest.mark.parametrize("options,named", [
    ({"video": {"backend": "torchcodec"}}, "backend"),
    ({"image": {}}, "image"),
    ({"video": {"num_frames": "many"}}, "num_frames"),
])
def test_media_io_kwargs_not_carried_are_a_400_naming_them(servers, options, named):
    ours, _ = servers
    response = ours.post("/v1/chat/completions", json={**chat(video_part(make_video(2))), "media_io_kwargs": options})
    assert response.status_code == 400 and named in response.text
