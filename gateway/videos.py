"""Loads the encoded bytes of a request's videos (`video_url` parts) from data:, http(s):// and file:// URLs.

The image loader's paths and guards, unchanged (server-side request forgery checks on every hop, no
Content-Encoding, the allowed local directory), under the video limits: bytes per video and videos per request.
The gateway never decodes a frame; the vision stage decides whether the bytes are a video.
"""

import dataclasses
import ssl

from gateway.config import GatewayConfig
from gateway.errors import hold_any
from gateway.images import Hold, ImageLoader, Resolver, system_resolver
from protos.errors import InvalidInput


class VideoLoader:
    """Owns the HTTP client used for video URLs; one per gateway process."""

    def __init__(self, config: GatewayConfig, resolver: Resolver = system_resolver,
                 ssl_context: ssl.SSLContext | None = None):
        self._max_videos = config.max_videos_per_request
        limits = dataclasses.replace(config, max_image_bytes=config.max_video_bytes,
                                     max_images_per_request=config.max_videos_per_request)
        self._loader = ImageLoader(limits, resolver, ssl_context)

    async def close(self) -> None:
        await self._loader.close()

    async def load_all(self, urls: list[str], hold: Hold = hold_any) -> list[bytes]:
        """The bytes of every URL, in order, fetched concurrently; the first failure cancels the others."""
        if len(urls) > self._max_videos:
            raise InvalidInput(f"{len(urls)} videos in one request; this server allows at most {self._max_videos}")
        try:
            return await self._loader.load_all([as_image_data_url(url) for url in urls], hold)
        except InvalidInput as error:
            # The image loader's words; the part is a video.
            raise type(error)(str(error).replace("image", "video")) from None


def as_image_data_url(url: str) -> str:
    """A `data:video/<type>;base64,` URL in the spelling the image loader decodes (it checks the media type only).
    Other URLs as they are."""
    if not url[:5].lower() == "data:":
        return url
    header, sep, payload = url.partition(",")
    media_type, *params = header[5:].split(";")
    if not sep or "base64" not in params or not media_type.lower().startswith("video/"):
        raise InvalidInput("video data URLs must look like data:video/<type>;base64,<data>")
    return f"data:image/{media_type[6:]};{';'.join(params)},{payload}"
