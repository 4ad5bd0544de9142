"""Small videos made here with OpenCV's writer (the library the vision stage decodes with), and hostile ones."""

import io
import pathlib
import struct
import tempfile
import wave

import cv2
import numpy as np
from PIL import Image


def make_video(frames: int = 12, size: tuple[int, int] = (96, 64), fps: float = 4.0, codec: str = "mp4v",
               suffix: str = ".mp4") -> bytes:
    """A clip whose frames all differ: a moving square on a colour that changes frame by frame."""
    width, height = size
    with tempfile.TemporaryDirectory() as tmp:
        path = str(pathlib.Path(tmp) / f"clip{suffix}")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        assert writer.isOpened(), f"OpenCV cannot write {codec} {suffix}"
        for i in range(frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:] = ((i * 37) % 256, (255 - i * 23) % 256, (i * 91) % 256)
            x = (i * 7) % max(width - 16, 1)
            frame[height // 4:height // 4 + 16, x:x + 16] = 255
            writer.write(frame)
        writer.release()
        return pathlib.Path(path).read_bytes()


def data_url(video: bytes, media_type: str = "video/mp4") -> str:
    import base64

    return f"data:{media_type};base64,{base64.b64encode(video).decode()}"


def with_header_size(avi: bytes, width: int, height: int) -> bytes:
    """An MJPEG AVI whose headers (avih, the stream's BITMAPINFOHEADER, each frame's JPEG SOF0) claim another frame
    size than its few bytes of pixels hold: a decompression bomb."""
    patched = bytearray(avi)
    avih = avi.find(b"avih") + 8
    patched[avih + 32:avih + 40] = struct.pack("<ii", width, height)
    strf = avi.find(b"strf") + 8
    patched[strf + 4:strf + 12] = struct.pack("<ii", width, height)
    start = 0
    while (sof := patched.find(b"\xff\xc0", start)) >= 0:
        patched[sof + 5:sof + 9] = struct.pack(">HH", height, width)
        start = sof + 2
    return bytes(patched)


def audio_only() -> bytes:
    """A WAV file: a container with an audio track and no video."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(bytes(16000))
    return buffer.getvalue()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_videos() -> dict[str, bytes]:
    """Files that must each be refused as a video."""
    mp4 = make_video(8)
    return {
        "empty": b"",
        "truncated": mp4[:len(mp4) // 2],
        "zero frames": make_video(0, codec="MJPG", suffix=".avi"),
        "huge header dimensions": with_header_size(make_video(4, codec="MJPG", suffix=".avi"), 8000, 8000),
        "header dimensions past FFmpeg's": with_header_size(make_video(4, codec="MJPG", suffix=".avi"), 30000, 30000),
        "audio only": audio_only(),
        "renamed image": png_bytes(),
        "random bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }
