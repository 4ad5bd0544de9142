"""llm_svc's side of videos without an engine: the chat's video parts, their place in the messages vLLM's renderer
sees, the engine's cache id per sampling options, and the vLLM plugin that lets InternVL take video embeddings."""

import pytest

from llm_svc import vllm_plugin
from llm_svc.prompts import ImageRef, Message, VideoRef, to_openai_messages
from llm_svc.servicer import chat_from_pb
from llm_svc.video_client import VideoOptions
from protos import llm_pb2
from protos.errors import InvalidInput


def chat_with(*parts: llm_pb2.ContentPart) -> llm_pb2.Chat:
    return llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=parts)])


def test_video_parts_are_collected_in_order_and_placed_where_they_appear():
    chat = chat_with(llm_pb2.ContentPart(video=llm_pb2.VideoPart(data=b"v1")),
                     llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=b"i1")), llm_pb2.ContentPart(text="hi"),
                     llm_pb2.ContentPart(video=llm_pb2.VideoPart(data=b"v2")))
    videos = []
    messages, images = chat_from_pb(chat, videos)
    assert [v.data for v in videos] == [b"v1", b"v2"] and [i.data for i in images] == [b"i1"]
    content = to_openai_messages(messages)[0]["content"]
    assert [part["type"] for part in content] == ["video_embeds", "image_embeds", "text", "video_embeds"]
    assert content[0]["uuid"] == videos[0].content_hash


def test_a_video_is_refused_where_videos_are_not_taken_and_outside_user_messages():
    with pytest.raises(InvalidInput, match="videos are not taken here"):
        chat_from_pb(chat_with(llm_pb2.ContentPart(video=llm_pb2.VideoPart(data=b"v"))))
    with pytest.raises(InvalidInput, match="a video part must carry"):
        chat_from_pb(chat_with(llm_pb2.ContentPart(video=llm_pb2.VideoPart(content_hash="ab" * 32))), [])
    with pytest.raises(InvalidInput, match="user messages only"):
        to_openai_messages([Message("assistant", (VideoRef("h"),))])
    assert to_openai_messages([Message("user", (ImageRef("h"), VideoRef("h")))], with_images=False)[0]["content"] == []


def test_the_engine_s_cache_id_of_a_video_names_its_sampling_options():
    ids = {VideoOptions().uuid("h"), VideoOptions(num_frames=8).uuid("h"), VideoOptions(fps=1.0).uuid("h"),
           VideoOptions(num_frames=8).uuid("g")}
    assert len(ids) == 4 and VideoOptions(num_frames=8).uuid("h") == VideoOptions(num_frames=8).uuid("h")


def test_the_plugin_teaches_internvl_video_embeddings_once():
    from vllm.model_executor.models.internvl import InternVLChatModel, InternVLMultiModalProcessor

    vllm_plugin.register()
    patched = (InternVLMultiModalProcessor._get_prompt_repl_video, InternVLMultiModalProcessor._get_video_fields_config,
               InternVLChatModel._parse_and_validate_multimodal_inputs)
    vllm_plugin.register()  # vLLM loads plugins in every process, sometimes twice in one
    assert patched == (InternVLMultiModalProcessor._get_prompt_repl_video,
                       InternVLMultiModalProcessor._get_video_fields_config,
                       InternVLChatModel._parse_and_validate_multimodal_inputs)
    assert getattr(patched[0], "_frames_from_rows", False)
