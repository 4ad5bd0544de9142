"""Turns untrusted video bytes into the RGB frames vLLM would sample from them, or refuses them with a `VideoError`.

Decoding is OpenCV's (FFmpeg inside), the library vLLM's default video loader uses, and the frames chosen are
vLLM's: `num_frames` spread evenly over the whole clip with `np.linspace(..., dtype=int)` (all frames when the
clip has fewer), capped at `duration * fps` frames when `fps` is set; frames are read in order with grab/retrieve,
and a frame that fails to decode is skipped, as vLLM skips it. So the vision stage encodes the frames vLLM's own
server would for the same request options.

Every limit is checked from the container's header before a pixel is decoded: bytes, frame size, frame count,
duration; a stream without a video track (audio only, an image renamed .mp4) does not open as video, and one that
opens but yields no frame is refused too.
"""

import dataclasses
import io
import math

import numpy as np

MIB = 1 << 20
# vLLM's VideoMediaIO default when a request does not say (media_io_kwargs {"video": {"num_frames": N}}).
DEFAULT_NUM_FRAMES = 32


class VideoError(ValueError):
    """The video bytes are refused; the message names the problem and the limit. Maps to INVALID_ARGUMENT."""


@dataclasses.dataclass(frozen=True)
class VideoLimits:
    # A minute of 1080p H.264 is about 30-60 MB; longer uploads belong in a storage bucket, not a request.
    max_video_bytes: int = 64 * MIB
    # Frames handed to the encoder per video: each is one 448x448 tile, 256 prompt tokens.
    max_frames: int = 64
    # Length of the clip by its header: decoding walks the clip up to the last sampled frame.
    max_seconds: float = 600.0
    # Pixels of one frame (8K UHD is 33 MP); checked from the header before decoding.
    max_frame_pixels: int = 8192 * 4320
    # Frames the header may declare: the reader grabs every frame up to the last sampled one.
    max_total_frames: int = 100_000

    def __post_init__(self):
        if min(self.max_video_bytes, self.max_frames, self.max_seconds, self.max_frame_pixels,
               self.max_total_frames) <= 0:
            raise ValueError(f"video limits must be positive, got {self}")


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """vLLM's per-request video options: frames to sample (-1: all) and a frame-rate cap (<= 0: none)."""
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: float = -1.0


@dataclasses.dataclass(frozen=True)
class VideoHeader:
    width: int
    height: int
    total_frames: int
    fps: float

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps if self.fps > 0 else 0.0


def sampled_frame_indices(header: VideoHeader, sampling: FrameSampling) -> list[int]:
    """vLLM's `VideoBackend.compute_frames_index_to_sample` (uniform sampling), for this header."""
    total = header.total_frames
    count = total
    if sampling.num_frames > 0:
        count = min(sampling.num_frames, total)
    if sampling.fps > 0:
        count = min(count, math.floor(header.duration_s * sampling.fps))
    count = max(1, count)
    if count == total:
        return list(range(count))
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def decode_video(data: bytes, limits: VideoLimits, sampling: FrameSampling) -> np.ndarray:
    """The sampled frames, uint8 RGB [frames, height, width, 3], within `limits`; VideoError otherwise."""
    import cv2

    if not data:
        raise VideoError("video data is empty")
    if len(data) > limits.max_video_bytes:
        raise VideoError(f"video is {len(data)} bytes, over the limit of {limits.max_video_bytes} bytes")
    if (image := _image_format(data)) is not None:
        # FFmpeg reads an image as a one-frame clip; a client that sent one meant an image_url part.
        raise VideoError(f"data is a {image} image, not a video; send it as an image")
    stream = io.BytesIO(data)  # OpenCV does not hold a reference to it: it must outlive the capture
    capture = _open(stream)
    try:
        header = _read_header(capture, cv2)
        _check_header(header, limits)
        indices = sampled_frame_indices(header, sampling)
        if len(indices) > limits.max_frames:
            raise VideoError(f"{len(indices)} frames sampled, over the limit of {limits.max_frames} frames per video; "
                             "ask for fewer (media_io_kwargs.video.num_frames)")
        frames = _read_frames(capture, cv2, set(indices), max(indices), header)
    finally:
        capture.release()
    if not len(frames):
        raise VideoError("no frame of the video could be decoded (truncated or corrupt stream)")
    return frames


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"qoif", "QOI"))


def _image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _IMAGE_MAGIC if data.startswith(magic)), None)


def _open(stream: io.BytesIO):
    import cv2
    import cv2.videoio_registry as registry

    # As vLLM opens it: the first stream-buffered backend (FFmpeg), reading from memory.
    backend = next((b for b in registry.getStreamBufferedBackends() if registry.hasBackend(b)), None)
    if backend is None:
        raise RuntimeError("this OpenCV has no backend that reads video from memory")
    try:
        capture = cv2.VideoCapture(stream, backend, [])
    except cv2.error as error:
        raise VideoError(f"data is not a video OpenCV can read: {error}") from error
    if not capture.isOpened():
        raise VideoError("data is not a video in a supported container (no readable video stream)")
    return capture


def _read_header(capture, cv2) -> VideoHeader:
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = capture.get(cv2.CAP_PROP_FPS)
    # vLLM's cross-check of the count (an mp4 edit list may hide decoded lead-in frames): seek to the end, trust
    # the position only when the stream really ends there and it differs by more than one frame.
    if 0 < total <= 10_000_000 and capture.set(cv2.CAP_PROP_POS_AVI_RATIO, 1.0):
        visible = int(capture.get(cv2.CAP_PROP_POS_FRAMES))
        at_end = not capture.grab()
        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
        if at_end and 0 < visible < total - 1:
            total = visible
    return VideoHeader(width, height, total, fps if math.isfinite(fps) else 0.0)


def _check_header(header: VideoHeader, limits: VideoLimits) -> None:
    if header.width <= 0 or header.height <= 0:
        raise VideoError(f"video has no picture ({header.width}x{header.height}): not a video stream")
    if header.width * header.height > limits.max_frame_pixels:
        raise VideoError(f"video frames are {header.width}x{header.height} = {header.width * header.height} pixels, "
                         f"over the limit of {limits.max_frame_pixels} pixels")
    if header.total_frames <= 0:
        raise VideoError("video has no frames")
    if header.total_frames > limits.max_total_frames:
        raise VideoError(f"video has {header.total_frames} frames, over the limit of {limits.max_total_frames}")
    if header.duration_s > limits.max_seconds:
        raise VideoError(f"video lasts {header.duration_s:.1f} s, over the limit of {limits.max_seconds:g} s")


def _read_frames(capture, cv2, wanted: set[int], last: int, header: VideoHeader) -> np.ndarray:
    """vLLM's reader without frame recovery: grab every frame up to the last wanted one, retrieve the wanted."""
    frames = []
    for index in range(last + 1):
        if not capture.grab():
            continue
        if index in wanted:
            ok, frame = capture.retrieve()
            if ok and frame is not None and frame.shape[:2] == (header.height, header.width):
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    if not frames:
        return np.empty((0, header.height, header.width, 3), dtype=np.uint8)
    return np.stack(frames)
