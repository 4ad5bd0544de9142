"""What one Encode request may carry and how much work the vision stage holds at once: built once from the
config, read by the server (GetInfo tells llm_svc these), the service and the decoders."""

import dataclasses

from vision_svc.config import VisionConfig
from vision_svc.image_decode import ImageLimits


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_images_per_request: int
    image: ImageLimits  # encoded bytes and pixels of each image
    # The largest Encode message: it carries all its images, so it bounds their sum.
    max_request_bytes: int
    # Images being preprocessed or encoded at once; each holds its bytes and later its pixels.
    max_pending_images: int
    # Work held at once: Encode requests being served, and the bytes of their messages.
    max_requests_in_flight: int
    max_bytes_in_flight: int

    @classmethod
    def from_config(cls, config: VisionConfig) -> "RequestLimits":
        return cls(max_images_per_request=config.max_images_per_request,
                   image=ImageLimits(config.max_image_bytes, config.max_image_pixels),
                   max_request_bytes=config.max_message_bytes, max_pending_images=config.max_pending_images,
                   max_requests_in_flight=config.max_requests_in_flight,
                   max_bytes_in_flight=config.max_bytes_in_flight)
