"""What the language stage agrees with its model and its vision stage, built once at start and passed down.

Two records, because they change for different reasons: `ModelDimensions` is what the checkpoint and the vision
stage's embeddings must share; `RequestLimits` is what one Generate request may carry, how long its vision call may
take, and how much work the stage holds at once. The vision stage's own limits are folded in here (a request's
images travel on to it), so the servicer, the service and the vision client read the same numbers.
"""

import dataclasses

from llm_svc.config import LlmConfig
from protos import tensors, vision_pb2
from protos.errors import InvalidInput

# What an Encode request carries besides image bytes: request id, options, the framing of each image.
ENCODE_OVERHEAD_BYTES = 64 << 10
# Bytes per embedding element when the vision stage does not say its dtype: float32, the widest that travels.
WIDEST_EMBEDDING_ITEMSIZE = 4


class WorkLimitTooSmall(ValueError):
    """--max-bytes-in-flight is below what one request may hold: the largest requests would be refused forever."""


@dataclasses.dataclass(frozen=True)
class ModelDimensions:
    hidden_size: int  # the language model's, and the width of every image embedding
    tokens_per_tile: int  # embedding rows per image tile, from the vision stage
    max_model_len: int  # the engine's context, image tokens included


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_images_per_request: int
    # The largest Generate message this stage takes (reported to the gateway): the lower of the two stages' limits.
    max_request_bytes: int
    # The image bytes one Encode request may carry: the vision stage's message limit, less the framing.
    max_image_bytes_per_request: int
    max_embedding_bytes: int  # one image's embeddings, as received from the vision stage
    vision_timeout_s: float
    # Work held at once: Generate requests being served, and the bytes they hold (messages, embeddings received).
    max_requests_in_flight: int
    max_bytes_in_flight: int
    # The most embeddings one request may hold: a Generate message is admitted only while it leaves room for them.
    embedding_room_bytes: int = 0

    @classmethod
    def agreed(cls, config: LlmConfig, vision: vision_pb2.GetInfoResponse, dims: ModelDimensions) -> "RequestLimits":
        vision_request_bytes = vision.max_request_bytes or config.max_message_bytes
        return cls(max_images_per_request=_agreed_images_per_request(config, vision),
                   max_request_bytes=min(config.max_message_bytes, vision_request_bytes),
                   max_image_bytes_per_request=vision_request_bytes - ENCODE_OVERHEAD_BYTES,
                   max_embedding_bytes=config.max_embedding_bytes, vision_timeout_s=config.vision_timeout_s,
                   max_requests_in_flight=config.max_requests_in_flight,
                   max_bytes_in_flight=config.max_bytes_in_flight,
                   embedding_room_bytes=largest_embeddings_bytes(config, vision, dims))

    def check_images(self, images: list) -> None:
        """Refuses more images, or more image bytes, than one request may carry (`images`: `ImageBlob`s)."""
        if len(images) > self.max_images_per_request:
            raise InvalidInput(f"{len(images)} images in one request; the limit is {self.max_images_per_request}")
        image_bytes = sum(len(image.data) for image in images if image.data)
        if image_bytes > self.max_image_bytes_per_request:
            raise InvalidInput(f"the images of this request are {image_bytes} bytes together; the vision stage "
                               f"takes at most {self.max_image_bytes_per_request} per request")


def largest_request_bytes(config: LlmConfig, vision: vision_pb2.GetInfoResponse, dims: ModelDimensions) -> int:
    """The most bytes one admissible request can hold: its message, as large as this stage receives, and its
    embeddings at their largest."""
    return config.max_message_bytes + largest_embeddings_bytes(config, vision, dims)


def largest_embeddings_bytes(config: LlmConfig, vision: vision_pb2.GetInfoResponse, dims: ModelDimensions) -> int:
    """The most embedding bytes one request can hold: its images', each at the vision stage's most tiles, all
    together within the context."""
    itemsize = (tensors.dtype_from_proto(vision.dtype).itemsize if vision.dtype != vision_pb2.DTYPE_UNSPECIFIED
                else WIDEST_EMBEDDING_ITEMSIZE)
    row_bytes = dims.hidden_size * itemsize
    one_image = config.max_embedding_bytes
    if vision.max_tiles:  # a vision stage that states its tiling bounds each image more tightly
        most_tiles = vision.max_tiles + (1 if vision.use_thumbnail else 0)
        one_image = min(one_image, most_tiles * dims.tokens_per_tile * row_bytes)
    images = _agreed_images_per_request(config, vision)
    return min(images * one_image, dims.max_model_len * row_bytes)


def _agreed_images_per_request(config: LlmConfig, vision: vision_pb2.GetInfoResponse) -> int:
    return min(config.max_images_per_request, vision.max_images_per_request)


def check_work_limit(config: LlmConfig, vision: vision_pb2.GetInfoResponse, dims: ModelDimensions) -> None:
    """Refuses to start where the largest request could never be admitted: it would get RESOURCE_EXHAUSTED forever,
    which clients retry forever."""
    largest = largest_request_bytes(config, vision, dims)
    if config.max_bytes_in_flight < largest:
        raise WorkLimitTooSmall(
            f"--max-bytes-in-flight {config.max_bytes_in_flight} is below what one request may hold, {largest} bytes "
            f"(--max-message-bytes, and up to {dims.max_model_len} embedding rows {dims.hidden_size} wide for its "
            f"images); raise it, or lower --max-message-bytes or --max-images-per-request")
