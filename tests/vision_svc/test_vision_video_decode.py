"""Video decoding and frame sampling against vLLM's own loader and InternVL video processor (no engine), and the
refusal of hostile files and files over the limits."""

import numpy as np
import pytest
import torch
from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoBackend
from vllm.multimodal.video_decoders import VideoSourceMetadata, VideoTargetMetadata
from vllm.transformers_utils.processors.internvl import video_to_pixel_values_internvl

from tests.vision_svc.video_helpers import hostile_videos, make_video
from vision_svc.tiling import normalize_tiles
from vision_svc.video_decode import (FrameSampling, VideoError, VideoHeader, VideoLimits, decode_video,
                                     sampled_frame_indices)
from vision_svc.video_frames import frames_to_tile_pixels

SAMPLINGS = [FrameSampling(), FrameSampling(num_frames=5), FrameSampling(num_frames=1), FrameSampling(num_frames=-1),
             FrameSampling(num_frames=7, fps=2.0), FrameSampling(num_frames=32, fps=0.5)]


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {"mp4v": make_video(40, fps=8.0), "mjpeg": make_video(23, size=(80, 50), codec="MJPG", suffix=".avi")}


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=str)
@pytest.mark.parametrize("clip", ["mp4v", "mjpeg"])
def test_the_sampled_frames_are_vllm_s(clips, clip, sampling):
    theirs, metadata = VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(clips[clip], num_frames=sampling.num_frames,
                                                                       fps=sampling.fps)
    ours = decode_video(clips[clip], VideoLimits(), sampling)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs)
    assert len(metadata["frames_indices"]) == len(ours)


@pytest.mark.parametrize("total,fps", [(1, 30.0), (31, 30.0), (32, 30.0), (33, 24.0), (1000, 29.97), (90, 0.0)])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=str)
def test_the_frame_positions_are_vllm_s(total, fps, sampling):
    header = VideoHeader(64, 48, total, fps)
    source = VideoSourceMetadata(total_frames_num=total, original_fps=fps, duration=header.duration_s)
    target = VideoTargetMetadata(num_frames=sampling.num_frames, fps=sampling.fps, max_duration=300)
    assert sampled_frame_indices(header, sampling) == VideoBackend.compute_frames_index_to_sample(source, target)


def test_each_frame_is_one_tile_as_vllm_s_internvl_video_processor_makes_it(clips):
    frames = decode_video(clips["mjpeg"], VideoLimits(), FrameSampling(num_frames=4))
    ours = torch.from_numpy(normalize_tiles(frames_to_tile_pixels(frames, 448)))
    theirs = video_to_pixel_values_internvl(frames, input_size=448, min_num=1, max_num=1, use_thumbnail=False)
    assert ours.shape == theirs.shape == (4, 3, 448, 448)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(hostile_videos()))
def test_a_hostile_file_is_refused(name):
    with pytest.raises(VideoError):
        decode_video(hostile_videos()[name], VideoLimits(), FrameSampling())


def test_a_renamed_image_is_refused_by_name():
    with pytest.raises(VideoError, match="PNG image, not a video"):
        decode_video(hostile_videos()["renamed image"], VideoLimits(), FrameSampling())


@pytest.mark.parametrize("limits,sampling,message", [
    (VideoLimits(max_video_bytes=1000), FrameSampling(), "bytes, over the limit of 1000"),
    (VideoLimits(max_frames=16), FrameSampling(num_frames=-1), "40 frames sampled, over the limit of 16"),
    (VideoLimits(max_seconds=2.0), FrameSampling(), r"lasts 5.0 s, over the limit of 2 s"),
    (VideoLimits(max_frame_pixels=96 * 64 - 1), FrameSampling(), "96x64 = 6144 pixels, over the limit"),
    (VideoLimits(max_total_frames=39), FrameSampling(), "40 frames, over the limit of 39"),
])
def test_each_limit_refuses_a_video_over_it(clips, limits, sampling, message):
    with pytest.raises(VideoError, match=message):
        decode_video(clips["mp4v"], limits, sampling)



def test_frame_dimensions_are_checked_from_the_header_before_a_frame_is_decoded():
    with pytest.raises(VideoError, match="8000x8000 = 64000000 pixels, over the limit"):
        decode_video(hostile_videos()["huge header dimensions"], VideoLimits(), FrameSampling())
