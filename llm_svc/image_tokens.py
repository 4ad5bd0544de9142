"""How many prompt tokens each image of a request takes, known before the vision stage runs.

vision_svc tiles an image with InternVL's dynamic tiling, whose grid follows from the image's width and
height and the tiling options alone. So the count here comes from the image's header (no pixel decoded)
and the vision stage's own `tile_count`, with the tiling settings the vision stage reports in GetInfo.
The header read also refuses, before any vision call, what the vision stage would refuse from it (bytes,
pixels, format), with the vision stage's message.

An image named by content hash only is counted from its size remembered when its bytes last came through
this server; one never seen here counts at the fewest tokens any image can take, a lower bound.
"""

import collections
import dataclasses

from llm_svc.vision_client import ImageBlob
from protos import vision_pb2
from protos.errors import InvalidInput
from vision_svc.image_decode import ImageError, ImageLimits, open_image
from vision_svc.tiling import TileOptions, fewest_tiles, tile_count

# Content hashes whose image size is remembered (about 200 bytes each).
REMEMBERED_SIZES = 16384


@dataclasses.dataclass(frozen=True)
class TilingPolicy:
    """The vision stage's tiling and image limits, as its GetInfo reports them."""
    tokens_per_tile: int
    image_size: int
    max_tiles: int
    min_tiles: int
    use_thumbnail: bool
    image_limits: ImageLimits

    @classmethod
    def from_info(cls, info: vision_pb2.GetInfoResponse) -> "TilingPolicy":
        return cls(tokens_per_tile=info.tokens_per_tile, image_size=info.image_size, max_tiles=info.max_tiles,
                   min_tiles=info.min_tiles or 1, use_thumbnail=info.use_thumbnail,
                   image_limits=ImageLimits(info.max_image_bytes, info.max_image_pixels))

    def options(self, max_tiles: int) -> TileOptions:
        """What vision_svc applies for a request's `max_tiles` (0: its default), refused as it would refuse it."""
        if max_tiles > self.max_tiles:
            raise InvalidInput(f"max_tiles {max_tiles} is over this server's limit of {self.max_tiles}")
        max_tiles = max_tiles or self.max_tiles
        return TileOptions(max_tiles=max_tiles, use_thumbnail=self.use_thumbnail, image_size=self.image_size,
                           min_tiles=min(self.min_tiles, max_tiles))

    def image_tokens(self, width: int, height: int, options: TileOptions) -> int:
        """Embedding rows, and so `<IMG_CONTEXT>` tokens, of a width x height image."""
        return tile_count(width, height, options) * self.tokens_per_tile


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    tokens: int
    exact: bool  # False: named by hash and never seen here; `tokens` is the fewest it can take


class ImageTokenCounter:
    def __init__(self, policy: TilingPolicy, remembered: int = REMEMBERED_SIZES):
        self.policy = policy
        self._remembered = remembered
        self._sizes: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()

    def count(self, images: list[ImageBlob], max_tiles: int) -> list[ImageTokens]:
        """Each image's tokens; raises InvalidInput for what the vision stage would refuse from headers alone."""
        options = self.policy.options(max_tiles)
        counts = []
        for index, image in enumerate(images):
            size = self._size(index, image)
            if size is None:
                counts.append(ImageTokens(fewest_tiles(options) * self.policy.tokens_per_tile, exact=False))
            else:
                counts.append(ImageTokens(self.policy.image_tokens(*size, options), exact=True))
        return counts

    def _size(self, index: int, image: ImageBlob) -> tuple[int, int] | None:
        if image.data is None:
            size = self._sizes.get(image.content_hash)
            if size is not None:
                self._sizes.move_to_end(image.content_hash)
            return size
        try:
            with open_image(image.data, self.policy.image_limits) as header:
                size = header.size
        except ImageError as error:
            raise InvalidInput(f"image {index}: {error}") from error
        self._sizes[image.content_hash] = size
        self._sizes.move_to_end(image.content_hash)
        while len(self._sizes) > self._remembered:
            self._sizes.popitem(last=False)
        return size
