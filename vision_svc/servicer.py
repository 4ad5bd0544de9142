"""gRPC servicer of the vision stage: proto <-> domain conversion only; the work is in `VisionService`."""

import logging
import time
from typing import TYPE_CHECKING

from protos import tensors, tracing, vision_pb2, vision_pb2_grpc
from protos.errors import InvalidInput, ServingError
from protos.logs import request_id_var
from vision_svc import metrics
from vision_svc.service import EncodedImage, ImageSource, VisionService

if TYPE_CHECKING:
    from vision_svc.video_servicer import VideoEncoding
    from vision_svc.transport_sender import EmbeddingSender

log = logging.getLogger(__name__)

_THUMBNAIL = {vision_pb2.THUMBNAIL_UNSPECIFIED: None, vision_pb2.THUMBNAIL_ON: True,
              vision_pb2.THUMBNAIL_OFF: False}


def images_from_pb(request: vision_pb2.EncodeRequest) -> list[ImageSource]:
    return [ImageSource(data=image.data) if image.WhichOneof("source") == "data"
            else ImageSource(content_hash=image.content_hash or None) for image in request.images]


def image_header_to_pb(image: EncodedImage) -> vision_pb2.ImageHeader:
    return vision_pb2.ImageHeader(content_hash=image.content_hash, num_tiles=image.num_tiles,
                                  tensor=tensors.header_of(image.embeddings), cache_hit=image.cache_hit)


def image_to_pb(image: EncodedImage, chunk_bytes: int):
    """The messages of one image inline: the header rides on the first chunk, `last` on the final one."""
    header = image_header_to_pb(image)
    chunks = list(tensors.to_chunks(image.embeddings, chunk_bytes))
    for n, chunk in enumerate(chunks):
        yield vision_pb2.EncodeResponse(image_index=image.index, header=header if n == 0 else None,
                                        data=chunk, last=n == len(chunks) - 1)


class VisionEncoderServicer(vision_pb2_grpc.VisionEncoderServicer):
    def __init__(self, service: VisionService, info: vision_pb2.GetInfoResponse, sender: "EmbeddingSender",
                 videos: "VideoEncoding | None" = None):
        self._service = service
        self._videos = videos  # None: videos are refused
        self._info = info
        self._sender = sender

    async def GetInfo(self, request, context):
        return self._info

    async def NegotiateDataPlane(self, request, context):
        return self._sender.negotiate(request)

    async def ReleaseDeviceMemory(self, request, context):
        return self._sender.release_device_memory(request)

    async def Encode(self, request: vision_pb2.EncodeRequest, context):
        request_id_var.set(request.request_id or "-")
        started = time.perf_counter()
        code = "OK"
        try:
            if request.videos:  # a request of videos only (video_servicer)
                if self._videos is None:
                    raise InvalidInput("this server does not encode videos")
                with self._service.admit(request.ByteSize()):
                    async for message in self._videos.messages(request):
                        yield message
                return
            if request.options.thumbnail not in _THUMBNAIL:
                raise InvalidInput(f"unknown thumbnail option {request.options.thumbnail}")
            options = self._service.options(request.options.max_tiles, _THUMBNAIL[request.options.thumbnail])
            images = images_from_pb(request)
            log.info("encode: %d images, max_tiles=%d", len(images), options.max_tiles)
            # Whatever the request holds returns however it ends (finished, refused, failed, cancelled).
            with tracing.grpc_server_span("VisionEncoder/Encode", context) as span, \
                    self._service.admit(request.ByteSize()), self._sender.open(request) as sender:
                if span.is_recording():
                    span.set_attributes({"request.id": request.request_id, "images": len(images)})
                async for image in self._service.encode(images, options):
                    with tracing.span("stream") as streaming:  # on whichever transport the sender uses
                        for message in await sender.messages(image):
                            metrics.BYTES_STREAMED.inc(len(message.data))
                            yield message
                        if streaming.is_recording():
                            streaming.set_attributes({"image.index": image.index, "bytes": image.embeddings.nbytes,
                                                      "tiles": image.num_tiles, "cache_hit": image.cache_hit})
        except BaseException as error:
            code = error.code.name if isinstance(error, ServingError) else type(error).__name__
            raise
        finally:
            metrics.REQUESTS.labels(code).inc()
            metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
