"""vision_svc.tiling against the published OpenGVLab preprocessing and transformers' GotOcr2 processors."""

import fractions
import itertools
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

from vision_svc.preprocess import image_to_tiles
from vision_svc.tiling import TileOptions, tile_count, tile_grid

# ---- Reference: verbatim from the InternVL3.5 model card's `load_image` example (OpenGVLab). ----
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(input_size):
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
    transform = T.Compose([
        T.Lambda(lambda img: img.convert('RGB') if img.mode != 'RGB' else img),
        T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=MEAN, std=STD)
    ])
    return transform


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images
# ---- end of reference ----


def reference_tiles(image, max_num, use_thumbnail, image_size=448):
    transform = build_transform(input_size=image_size)
    images = dynamic_preprocess(image, image_size=image_size, use_thumbnail=use_thumbnail, max_num=max_num)
    return torch.stack([transform(tile) for tile in images])


def reference_grid(width, height, max_num, min_num=1, image_size=448):
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return find_closest_aspect_ratio(width / height, target_ratios, width, height, image_size)


def random_image(width, height, seed):
    # Smooth gradients plus noise: bicubic overshoot and rounding both get exercised.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def random_sizes(count, seed):
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            sizes.append((rng.randint(1, 4096), rng.randint(1, 4096)))
        elif kind < 0.8:  # extreme aspect ratios
            sizes.append((rng.randint(1, 64), rng.randint(1, 20000)) if rng.random() < 0.5 else (rng.randint(1, 20000), rng.randint(1, 64)))
        else:  # exact multiples of a grid's ratio: the tie-break decides these
            c, r, k = rng.randint(1, 12), rng.randint(1, 12), rng.randint(1, 600)
            sizes.append((c * k, r * k))
    return sizes


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_grid_equals_reference_on_random_sizes(max_tiles):
    for width, height in random_sizes(1200, seed=max_tiles):
        assert tile_grid(width, height, 1, max_tiles, 448) == reference_grid(width, height, max_tiles), (width, height)


def tie_sizes(max_tiles, image_size=448):
    """Sizes whose aspect ratio is exactly halfway between two candidate grids, or equal to a grid's ratio,
    at areas on both sides of every tie-break threshold."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles]
    ratios = {fractions.Fraction(c, r) for c, r in grids}
    ratios |= {(a + b) / 2 for a, b in itertools.combinations(sorted(ratios), 2)}
    sizes = set()
    for ratio in ratios:
        w0, h0 = ratio.numerator, ratio.denominator
        for tiles in range(1, max_tiles + 1):
            threshold = 0.5 * image_size * image_size * tiles
            k = max(1, int((threshold / (w0 * h0)) ** 0.5))
            sizes.update((w0 * j, h0 * j) for j in (k - 1, k, k + 1, k + 2) if j >= 1)
    return sorted(sizes)


@pytest.mark.parametrize("max_tiles", [1, 2, 6, 9, 12, 16])
def test_grid_equals_reference_on_every_tie(max_tiles):
    # The reference orders equal-count grids by set hash order, the product by (cols, rows); this proves
    # the order never matters, including at the thresholds of the area tie-break.
    for width, height in tie_sizes(max_tiles):
        assert tile_grid(width, height, 1, max_tiles, 448) == reference_grid(width, height, max_tiles), (width, height)


def test_grid_honours_min_tiles():
    for width, height in random_sizes(300, seed=7):
        for min_tiles, max_tiles in [(2, 12), (4, 6), (6, 6)]:
            expected = reference_grid(width, height, max_tiles, min_num=min_tiles)
            assert tile_grid(width, height, min_tiles, max_tiles, 448) == expected


PIXEL_CASES = [
    # (width, height, max_tiles, use_thumbnail)
    (1920, 1080, 12, True), (1080, 1920, 12, False), (448, 448, 12, True), (896, 448, 12, True),
    (1792, 1792, 12, True), (640, 480, 6, True), (640, 480, 1, True), (1, 1, 12, True),
    (1, 10000, 12, True), (10000, 1, 6, True), (3, 700, 12, False), (1000, 999, 12, True),
    (224, 224, 12, True), (300, 1000, 6, False), (2016, 1512, 12, True), (500, 2000, 12, True),
    (1023, 511, 12, True), (449, 447, 12, True), (100, 3000, 12, False), (2000, 50, 12, True),
    (1344, 896, 6, True), (800, 600, 12, False), (57, 91, 12, True), (2560, 1440, 6, True),
    (1200, 400, 12, True), (400, 1200, 12, True), (898, 450, 12, True), (1000, 1000, 1, False),
    (333, 777, 12, True), (1600, 1200, 12, True),
]


@pytest.mark.parametrize("width,height,max_tiles,use_thumbnail", PIXEL_CASES)
def test_tile_pixels_equal_reference(width, height, max_tiles, use_thumbnail):
    image = random_image(width, height, seed=width * 7919 + height)
    expected = reference_tiles(image, max_tiles, use_thumbnail)
    got = image_to_tiles(image, max_tiles=max_tiles, use_thumbnail=use_thumbnail)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert tile_count(width, height, TileOptions(max_tiles=max_tiles, use_thumbnail=use_thumbnail)) == got.shape[0]


def test_1080p_image_is_eight_tiles_and_a_thumbnail():
    tiles = image_to_tiles(random_image(1920, 1080, seed=0), max_tiles=12, use_thumbnail=True)
    assert tile_grid(1920, 1080, 1, 12, 448) == (4, 2)
    assert tiles.shape == (9, 3, 448, 448)


def test_tiling_refuses_non_rgb_images():
    with pytest.raises(ValueError, match="RGB"):
        image_to_tiles(Image.new("RGBA", (10, 10)), max_tiles=12, use_thumbnail=True)


# ---- transformers' processor of the hf-layout InternVL checkpoints (GotOcr2, crop_to_patches) ----

def got_ocr2_processor(backend):
    from transformers.models.got_ocr2 import image_processing_got_ocr2, image_processing_pil_got_ocr2

    cls = {
        "torchvision": image_processing_got_ocr2.GotOcr2ImageProcessor,
        "pil": image_processing_pil_got_ocr2.GotOcr2ImageProcessorPil,
    }[backend]
    # The settings of InternVL3.5-*-HF's preprocessor_config.json.
    return cls(
        crop_to_patches=True, min_patches=1, max_patches=12, size={"height": 448, "width": 448},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    )


def test_grid_equals_got_ocr2():
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    for max_tiles in (1, 6, 12):
        sizes = random_sizes(600, seed=100 + max_tiles) + tie_sizes(max_tiles)
        for width, height in sizes:
            expected = get_optimal_tiled_canvas((height, width), (448, 448), 1, max_tiles)
            assert tile_grid(width, height, 1, max_tiles, 448) == expected, (width, height)


GOT_OCR2_CASES = [(1920, 1080), (640, 480), (448, 448), (1, 3000), (1000, 999)]


@pytest.mark.parametrize("width,height", GOT_OCR2_CASES)
def test_pixels_equal_got_ocr2_pil_backend(width, height):
    image = random_image(width, height, seed=width + height)
    expected = got_ocr2_processor("pil")(image, return_tensors="pt")["pixel_values"]
    got = image_to_tiles(image, max_tiles=12, use_thumbnail=True)
    assert got.shape == expected.shape
    # Same PIL bicubic resize and the same float32 arithmetic: equal to the last bit.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("width,height", GOT_OCR2_CASES)
def test_got_ocr2_torchvision_backend_differs_only_by_resampling(width, height):
    # The default (torchvision) backend resizes tensors with torch's antialiased bicubic, not PIL's: same
    # grid and tile count, pixels at most 2 steps of 1/255 apart and almost all equal. The OpenGVLab
    # reference is PIL's, so the product follows PIL.
    image = random_image(width, height, seed=width + height)
    expected = got_ocr2_processor("torchvision")(image, return_tensors="pt")["pixel_values"]
    got = image_to_tiles(image, max_tiles=12, use_thumbnail=True)
    assert got.shape == expected.shape
    pixel_steps = ((got - expected).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)
    assert pixel_steps.max() < 2.01
    assert pixel_steps.mean() < 0.05
