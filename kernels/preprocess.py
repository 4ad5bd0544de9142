"""InternVL's image preprocessing as tensor ops on any device: resize onto the tile grid, cut tiles, normalize.

The specification is the host path (`vision_svc.tiling`: Pillow's 8-bit bicubic resize, then ToTensor +
ImageNet Normalize). Pillow resizes in two separable passes and rounds to 8 bits after each; this module
does the same passes with torch's antialiased bicubic (the same a = -0.5 kernel and support as Pillow), in
float32, rounding and clamping to 0..255 after each pass. What is left is Pillow's 22-bit fixed-point weights
against float weights: a pixel now and then one level apart (the tests state the measured tolerance).
Normalization is bit-identical to the host's for equal 8-bit input. The grid is chosen by the caller
(`vision_svc.tiling.tile_grid`), so tiling decisions live in one place.
"""

import torch
import torch.nn.functional as F

# ImageNet statistics, as in InternVL's build_transform (and vision_svc.tiling).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_and_tile(image_u8: torch.Tensor, cols: int, rows: int, use_thumbnail: bool,
                    image_size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> normalized float32 [tiles, 3, S, S] on the image's device.

    Tiles are row-major over the cols x rows grid, then the S x S thumbnail of the whole image when
    `use_thumbnail` and the grid has more than one tile (as the reference: a one-tile grid is its own thumbnail).
    """
    if image_u8.dtype != torch.uint8 or image_u8.dim() != 3 or image_u8.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image_u8.dtype} {tuple(image_u8.shape)}")
    if cols < 1 or rows < 1 or image_size < 1:
        raise ValueError(f"grid {cols}x{rows} of {image_size}px tiles: every size must be positive")
    size = image_size
    blocks = cols * rows
    image = image_u8.float()  # [3, H, W], integer values
    grid = resize_like_pillow(image, cols * size, rows * size)  # [3, rows*S, cols*S]
    # [3, rows, S, cols, S] -> [rows, cols, 3, S, S]: tile i is row i // cols, column i % cols
    tiles = grid.unflatten(2, (cols, size)).unflatten(1, (rows, size)).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(blocks, 3, size, size)  # [blocks, 3, S, S]
    if use_thumbnail and blocks != 1:
        thumbnail = resize_like_pillow(image, size, size)  # [3, S, S]
        tiles = torch.cat([tiles, thumbnail[None]])  # [blocks + 1, 3, S, S]
    return normalize(tiles)


def resize_like_pillow(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """float [C, H, W] of 8-bit values -> float [C, height, width] of 8-bit values: Pillow's bicubic resize.

    Pillow rounds to 8 bits between its two passes, and on overshooting content (sharp edges, noise) that
    clamp makes the pass order visible. Pillow 13 runs the vertical pass first when the output is shorter
    and the height shrinks by more than twice as many pixels as the width does; otherwise horizontal first
    (always, before Pillow 13). A pass whose size does not change is skipped, as in Pillow.
    """
    in_height, in_width = image.shape[-2:]
    x = image[None]  # [1, C, H, W]: interpolate wants a batch
    vertical_first = height < in_height and in_height - height > 2 * (in_width - width)
    passes = ("vertical", "horizontal") if vertical_first else ("horizontal", "vertical")
    for direction in passes:
        if direction == "horizontal" and width != x.shape[-1]:
            x = _bicubic_8bit(x, (x.shape[-2], width))
        elif direction == "vertical" and height != x.shape[-2]:
            x = _bicubic_8bit(x, (height, x.shape[-1]))
    return x[0]


def _bicubic_8bit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Antialiased bicubic is Pillow's filter (a = -0.5, support widened by the scale when shrinking);
    # floor(x + 0.5) is Pillow's round-half-up of its fixed-point sum, then the clamp to 8 bits.
    out = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.add_(0.5).floor_().clamp_(0, 255)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit values [tiles, 3, S, S] -> float32: ToTensor then ImageNet Normalize, op for op as the host
    (divide by 255, subtract mean, divide by std), so equal input gives bit-equal output."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.float().div_(255).sub_(mean).div_(std)
