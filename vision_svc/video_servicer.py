"""The video half of `VisionEncoder.Encode`: proto <-> domain conversion only; the work is in `VideoService`."""

import logging
from collections.abc import AsyncIterator

from protos import vision_pb2
from protos.errors import InvalidInput
from vision_svc import metrics
from vision_svc.service import ImageSource
from vision_svc.servicer import image_to_pb
from vision_svc.video_service import VideoService

log = logging.getLogger(__name__)


def videos_from_pb(request: vision_pb2.EncodeRequest) -> list[ImageSource]:
    return [ImageSource(data=video.data) if video.WhichOneof("source") == "data"
            else ImageSource(content_hash=video.content_hash or None) for video in request.videos]


class VideoEncoding:
    def __init__(self, service: VideoService, chunk_bytes: int):
        self.service = service
        self._chunk_bytes = chunk_bytes

    async def messages(self, request: vision_pb2.EncodeRequest) -> AsyncIterator[vision_pb2.EncodeResponse]:
        """Every video's messages, inline: its header on the first chunk, `video` set on all of them."""
        if request.images:
            raise InvalidInput("a request carries images or videos, not both")
        options = request.video_options
        sampling = self.service.sampling(options.num_frames if options.HasField("num_frames") else None,
                                         options.fps if options.HasField("fps") else None)
        videos = videos_from_pb(request)
        log.info("encode: %d videos, num_frames=%d fps=%g", len(videos), sampling.num_frames, sampling.fps)
        async for video in self.service.encode(videos, sampling):
            for message in image_to_pb(video, self._chunk_bytes):
                message.video = True
                metrics.BYTES_STREAMED.inc(len(message.data))
                yield message
