"""A vLLM general plugin (entry point `vllm.general_plugins`, see pyproject.toml): vLLM loads it in every
process it starts (front, engine core, each worker), before any model runs.

It lets videos be given as embeddings (`video_embeddings`), image tiling options reach a checkpoint that also
serves videos (`image_options_with_videos`), and one engine step hold images of different sizes
given as embeddings. InternVL's embedding-input schemas declare every image of a step with the same number of
rows, so two concurrent requests whose images have different tile counts (a 448x448 and an 896x448 image: 256
and 768 rows) fail the schema's check in the worker, which kills the engine. The models themselves take the
embeddings as a list of tensors, one per image, and never need them to agree; only the check is wrong. The plugin
marks that one dimension dynamic, as vLLM already does for the pixel inputs.
"""

import importlib
import logging
import os
import typing

logger = logging.getLogger(__name__)

NAME = "internvl_dvd"  # the entry point's name, as `VLLM_PLUGINS` lists it

# module -> (schema class, its per-image row dimension); the vision stage sends embeddings for both layouts.
ROW_DIMENSIONS = {
    "vllm.model_executor.models.internvl": [("InternVLImageEmbeddingInputs", "f"),
                                            ("InternVLVideoEmbeddingInputs", "f")],
    "vllm.model_executor.models.interns1": [("InternS1ImageEmbeddingInputs", "tifs"),
                                            ("InternS1VideoEmbeddingInputs", "tvfs")],
}


def register() -> None:
    video_embeddings()
    image_options_with_videos()
    for module_name, schemas in ROW_DIMENSIONS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a vLLM without this model
            logger.warning("vLLM has no %s: its image embeddings are left as vLLM checks them", module_name)
            continue
        for class_name, dim in schemas:
            schema = getattr(module, class_name, None)
            shape = _data_shape(schema) if schema is not None else None
            if shape is None or dim not in shape.dims:
                logger.warning("vLLM's %s.%s is not as expected; images of different sizes given as embeddings "
                               "may not share an engine step", module_name, class_name)
                continue
            shape.dynamic_dims = set(shape.dynamic_dims) | {dim}


def video_embeddings() -> None:
    """InternVL's processor expands a video's `<video>` placeholder into one `FrameN: <img>...</img>` per frame, the
    frame count read from the pixel inputs; for a video given as embeddings there are none and it fails with an
    IndexError. A video's embeddings hold 256 rows (`image_seq_length`) per frame, so the count is read from them.
    And its fields leave out `video_embeds` (the image fields hold `image_embeds`), so the embeddings never reached
    the model: it is added, batched per video as the images' are, and the model is made to read it."""
    try:
        from vllm.model_executor.models.internvl import InternVLChatModel, InternVLMultiModalProcessor
        from vllm.multimodal.inputs import MultiModalFieldConfig
        from vllm.multimodal.parse import VideoEmbeddingItems
        from vllm.multimodal.processing import PromptReplacement
    except ImportError:
        logger.warning("vLLM has no InternVL video processor: videos given as embeddings are left as vLLM takes them")
        return
    original = InternVLMultiModalProcessor._get_prompt_repl_video
    if getattr(original, "_frames_from_rows", False):
        return

    def repl_video(self, mm_items, hf_processor, out_mm_data):
        replacement = original(self, mm_items, hf_processor, out_mm_data)
        videos = mm_items.get("video")
        if "video_num_patches" in out_mm_data or not isinstance(videos, VideoEmbeddingItems):
            return replacement

        def frames_from_rows(item_idx: int):
            return hf_processor.get_video_repl(videos.get_feature_size(item_idx) // hf_processor.image_seq_length)

        return PromptReplacement(modality="video", target=replacement.target, replacement=frames_from_rows)

    original_fields = InternVLMultiModalProcessor._get_video_fields_config

    def video_fields(self, hf_inputs):
        return {**original_fields(self, hf_inputs), "video_embeds": MultiModalFieldConfig.batched("video")}

    original_inputs = InternVLChatModel._parse_and_validate_multimodal_inputs

    def model_inputs(self, **kwargs):
        modalities = original_inputs(self, **kwargs)
        if "video_embeds" in kwargs and "videos" not in modalities:  # the engine embeds one modality per call
            modalities["videos"] = self._parse_and_validate_video_input(**kwargs)
        return modalities

    repl_video._frames_from_rows = True
    InternVLChatModel._parse_and_validate_multimodal_inputs = model_inputs
    InternVLMultiModalProcessor._get_prompt_repl_video = repl_video
    InternVLMultiModalProcessor._get_video_fields_config = video_fields


def image_options_with_videos() -> None:
    """For a checkpoint whose tokenizer has the video context token (InternVL3.5's have it), vLLM builds its
    processor's video half with the request's processor options too, and the image-only ones
    (`max_dynamic_patch`, ...) make it fail with a TypeError: a request that limits its images' tiles could not be
    served. The video processor is given only the options it takes (frames are single tiles, the options do not
    apply to them)."""
    try:
        from vllm.model_executor.models import internvl
    except ImportError:
        return
    processor_class = getattr(internvl, "InternVLVideoProcessor", None)
    info_class = getattr(internvl, "InternVLProcessingInfo", None)
    if processor_class is None or info_class is None:
        logger.warning("vLLM's InternVL processors are not as expected: image options may fail with videos")
        return

    def video_processor(self, **kwargs):  # vLLM's own, but for the options the video processor does not take
        options = self.ctx.get_merged_mm_kwargs(kwargs)  # the request's over the server's --mm-processor-kwargs
        if "image_size" not in options:
            options["image_size"] = self.get_hf_config().vision_config.image_size
        return processor_class(image_size=options["image_size"])

    info_class.get_video_processor = video_processor


def keep_enabled(environ=os.environ) -> None:
    """`VLLM_PLUGINS` restricts which plugins vLLM loads; one that names others but not this one gets it added
    (the engine's processes inherit the environment)."""
    allowed = environ.get("VLLM_PLUGINS")
    if allowed is not None and NAME not in allowed.split(","):
        environ["VLLM_PLUGINS"] = ",".join(filter(None, [*allowed.split(","), NAME]))


def installed() -> bool:
    from importlib.metadata import entry_points

    return any(entry.name == NAME for entry in entry_points(group="vllm.general_plugins"))


def _data_shape(schema: type):
    """The `TensorShape` in the annotation of `schema.data` (the object vLLM validates against)."""
    from vllm.utils.tensor_schema import TensorShape

    annotation = typing.get_type_hints(schema, include_extras=True).get("data")
    return next((arg for arg in typing.get_args(annotation) if isinstance(arg, TensorShape)), None)
