"""video_url parts at the gateway, against a scripted llm_svc: data:, http(s):// and file:// URLs carry the video's
bytes in message order with the image guards and the video limits, and media_io_kwargs reach the proto."""

import httpx
import pytest

from gateway.videos import as_image_data_url
from tests.gateway.conftest import MODEL
from tests.vision_svc.video_helpers import data_url, make_video

CLIP = make_video(3)


def chat(*parts: dict, **fields) -> dict:
    return {"model": MODEL, "max_tokens": 4, **fields,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what happens?"}]}]}


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


async def post(base: str, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        return await http.post(path, json=body)


def media(request) -> list[tuple[str, bytes]]:
    return [(part.WhichOneof("part"), getattr(part, part.WhichOneof("part")).data)
            for message in request.chat.messages for part in message.content if part.WhichOneof("part") != "text"]


async def test_a_data_url_video_and_an_image_reach_llm_svc_in_message_order_with_the_sampling_options(
        gateway_url, fake, png):
    image = png()
    response = await post(gateway_url, chat(video(data_url(CLIP)), {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + __import__("base64").b64encode(image).decode()}},
        media_io_kwargs={"video": {"num_frames": 4, "fps": 2.5}}))
    assert response.status_code == 200, response.text
    request = fake.requests[-1]
    assert media(request) == [("video", CLIP), ("image", image)]
    assert (request.video_options.num_frames, request.video_options.fps) == (4, 2.5)


async def test_without_media_io_kwargs_the_options_stay_unset_for_the_vision_stage_s_defaults(gateway_url, fake):
    assert (await post(gateway_url, chat(video(data_url(CLIP))))).status_code == 200
    assert not fake.requests[-1].HasField("video_options")


async def test_an_http_video_is_fetched_with_the_image_guards(gateway_url, start_gateway, fake, image_server):
    base, served = image_server
    served["/clip.mp4"] = CLIP
    assert (await post(gateway_url, chat(video(f"{base}/clip.mp4")))).status_code == 200
    assert media(fake.requests[-1]) == [("video", CLIP)]
    async with start_gateway() as guarded:  # private addresses refused by default
        response = await post(guarded, chat(video(f"{base}/clip.mp4")))
    assert response.status_code == 400 and "video 0" in response.text and "non-public" in response.text


async def test_a_local_file_is_read_under_the_allowed_directory_only(start_gateway, fake, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(CLIP)
    async with start_gateway(allowed_local_media_path=tmp_path) as url:
        assert (await post(url, chat(video(f"file://{tmp_path}/clip.mp4")))).status_code == 200
        assert media(fake.requests[-1]) == [("video", CLIP)]
        outside = await post(url, chat(video("file:///etc/hostname")))
    assert outside.status_code == 400 and "outside the allowed media path" in outside.text


async def test_video_limits_are_a_413_and_a_400(start_gateway, fake):
    async with start_gateway(max_video_bytes=len(CLIP) - 1, max_videos_per_request=1) as url:
        too_big = await post(url, chat(video(data_url(CLIP))))
        too_many = await post(url, chat(video(data_url(CLIP[:10])), video(data_url(CLIP[:10]))))
    assert too_big.status_code == 413 and "video 0" in too_big.text
    assert too_many.status_code == 400 and "2 videos in one request" in too_many.text
    assert not fake.requests


@pytest.mark.parametrize("url,message", [
    ("data:image/png;base64,AAAA", "data:video/<type>;base64"),
    ("data:video/mp4,notbase64", "data:video/<type>;base64"),
    ("ftp://example.com/clip.mp4", "unsupported URL scheme"),
])
async def test_malformed_video_urls_are_a_400(gateway_url, fake, url, message):
    response = await post(gateway_url, chat(video(url)))
    assert response.status_code == 400 and message in response.text


async def test_tokenize_refuses_a_video_by_name(gateway_url, fake):
    response = await post(gateway_url, chat(video(data_url(CLIP))), path="/tokenize")
    assert response.status_code == 400 and "video_url" in response.text


def test_a_video_data_url_is_handed_to_the_image_decoder_unchanged_but_for_its_media_type():
    assert as_image_data_url("data:video/webm;base64,AAAA") == "data:image/webm;base64,AAAA"
    assert as_image_data_url("https://example.com/v.mp4") == "https://example.com/v.mp4"
