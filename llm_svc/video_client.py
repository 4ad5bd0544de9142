"""The language stage's video calls to vision_svc: one Encode request holding a chat's videos only.

Videos go apart from the images (vision_svc takes one kind per request): always as bytes, inline, on the replica
that the first video's hash ranks first. A video's embeddings are one 256-row block per sampled frame, in clip
order; the frames depend on the sampling options, so the engine's cache id of a video (`VideoOptions.uuid`)
names the file and the options together.
"""

import dataclasses
import hashlib
from collections.abc import Callable

import grpc

from protos import errors, llm_pb2, tensors, tracing, vision_pb2
from protos.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class VideoBlob:
    content_hash: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """vLLM's per-request video options; None leaves each to the vision stage's default (vLLM's)."""
    num_frames: int | None = None
    fps: float | None = None

    def to_pb(self) -> vision_pb2.VideoOptions:
        return vision_pb2.VideoOptions(num_frames=self.num_frames, fps=self.fps)

    def uuid(self, content_hash: str) -> str:
        """The engine's cache id of this video's embeddings: other options sample other frames."""
        return hashlib.sha256(f"{content_hash}:{self.num_frames}:{self.fps}".encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class VideoEmbedding:
    content_hash: str
    num_frames: int
    embeddings: object  # torch.Tensor [num_frames * tokens_per_tile, llm_hidden]


def video_from_pb(part: llm_pb2.VideoPart) -> VideoBlob:
    if part.WhichOneof("source") != "data" or not part.data:
        raise InvalidInput("a video part must carry the video's bytes")
    return VideoBlob(hashlib.sha256(part.data).hexdigest(), part.data)


def check_video_bytes(videos: list[VideoBlob], limit: int) -> None:
    """Refuses videos that together exceed what the vision stage receives in one Encode request."""
    total = sum(len(video.data) for video in videos)
    if total > limit:
        raise InvalidInput(f"the videos of this request are {total} bytes together; the vision stage takes at most "
                           f"{limit} per request")


def options_from_pb(request: llm_pb2.GenerateRequest) -> VideoOptions:
    options = request.video_options
    return VideoOptions(num_frames=options.num_frames if options.HasField("num_frames") else None,
                        fps=options.fps if options.HasField("fps") else None)


async def encode_videos(stub, target: str, request_id: str, videos: list[VideoBlob], options: VideoOptions,
                        timeout_s: float, assembler: Callable[[vision_pb2.TensorHeader], tensors.TensorAssembler]
                        ) -> list[VideoEmbedding]:
    """Embeddings of `videos`, in order; `assembler(header)` holds a video's bytes before they are received."""
    request = vision_pb2.EncodeRequest(request_id=request_id, videos=[vision_pb2.VideoInput(data=v.data)
                                                                      for v in videos],
                                       video_options=options.to_pb())
    results: list[VideoEmbedding | None] = [None] * len(videos)
    assembling: dict[int, tuple[vision_pb2.ImageHeader, tensors.TensorAssembler]] = {}
    call = stub.Encode(request, timeout=timeout_s, metadata=tracing.outgoing_metadata())
    try:
        async for message in call:
            index = message.image_index
            if not message.video:
                raise errors.InternalError(f"vision_svc {target} answered videos with images")
            if message.HasField("header"):
                assembling[index] = (message.header, assembler(message.header.tensor))
            header, assembly = assembling[index]
            assembly.add(message.data)
            if message.last:
                results[index] = VideoEmbedding(header.content_hash, header.num_tiles, assembly.finish())
    except grpc.aio.AioRpcError as error:
        raise errors.from_rpc_error(error, f"vision_svc {target}", stage="vision_svc") from error
    except (KeyError, IndexError, tensors.TensorFormatError) as error:
        raise errors.InternalError(f"vision_svc {target} sent a malformed stream: {error}") from error
    finally:
        call.cancel()
    if any(r is None for r in results):
        raise errors.InternalError(f"vision_svc {target} ended the stream before sending every video")
    return results
