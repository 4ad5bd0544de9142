"""A vLLM general plugin (entry point `vllm.general_plugins`, see pyproject.toml): vLLM loads it in every
process it starts (front, engine core, each worker), before any model runs.

It lets one engine step hold images of different sizes given as embeddings. InternVL's embedding-input
schemas declare every image of a step with the same number of rows, so two concurrent requests whose images
have different tile counts (a 448x448 and an 896x448 image: 256 and 768 rows) fail the schema's check in the
worker, which kills the engine. The models themselves take the embeddings as a list of tensors, one per
image, and never need them to agree; only the check is wrong. The plugin marks that one dimension dynamic,
as vLLM already does for the pixel inputs.
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
