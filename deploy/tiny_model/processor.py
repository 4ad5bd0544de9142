"""The hf layout's processor files: transformers' `InternVLProcessor` over the checkpoint's tokenizer.

Its image processor is `GotOcr2ImageProcessor` configured as InternVL's dynamic tiling: 448 px tiles,
1..12 tiles plus a thumbnail, bicubic resize, ImageNet mean/std.
"""

import pathlib

from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

from deploy.tiny_model.chat_template import HF_CHAT_TEMPLATE
from deploy.tiny_model.configs import IMAGE_SIZE, MAX_DYNAMIC_PATCH, MIN_DYNAMIC_PATCH, TOKENS_PER_TILE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def write_processor(out: pathlib.Path) -> None:
    """Writes processor_config.json and chat_template.jinja; rewrites the tokenizer files it owns."""
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = GotOcr2ImageProcessor(
        crop_to_patches=True, min_patches=MIN_DYNAMIC_PATCH, max_patches=MAX_DYNAMIC_PATCH, size=size,
        resample=_BICUBIC, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True)
    video_processor = InternVLVideoProcessor(size=size, resample=_BICUBIC, image_mean=IMAGENET_MEAN,
                                             image_std=IMAGENET_STD)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(out),
                                  video_processor=video_processor, image_seq_length=TOKENS_PER_TILE,
                                  chat_template=HF_CHAT_TEMPLATE)
    processor.save_pretrained(out)
