"""The shape of an InternVL vision stage (InternViT + pixel shuffle + projector), read from either layout's config.

Everything downstream (the encoder module, tiling, the service's GetInfo) reads this one object, never the raw
config.json, so the two layouts differ only here.
"""

import dataclasses
import json
import pathlib

from vision_svc.checkpoint import CheckpointError, detect_layout, read_config

_NORMS = {"rms_norm": "rms", "layer_norm": "layer"}
# transformers' InternVLVisionRMSNorm for q/k is built without an eps argument: its default applies.
_HF_QK_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    hidden: int
    heads: int
    layers: int
    mlp: int
    norm: str  # "rms" | "layer"
    eps: float
    qk_norm: bool
    qk_norm_eps: float
    qkv_bias: bool
    llm_hidden: int
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    select_layer: int = -1
    use_thumbnail: bool = True
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1

    def __post_init__(self):
        if self.norm not in ("rms", "layer"):
            raise CheckpointError(f"vision norm {self.norm!r}: expected 'rms' or 'layer'")
        if self.hidden % self.heads:
            raise CheckpointError(f"vision hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.image_size % self.patch_size:
            raise CheckpointError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")
        side = self.image_size // self.patch_size
        if (side * self.downsample_ratio) % 1 or (1 / self.downsample_ratio) % 1:
            raise CheckpointError(f"downsample ratio {self.downsample_ratio} does not divide the {side}-patch grid")
        if not -self.layers - 1 <= self.select_layer < 0:
            raise CheckpointError(f"select_layer {self.select_layer}: expected -1 .. -{self.layers + 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.patches_per_side * self.downsample_ratio) ** 2

    @property
    def layers_used(self) -> int:
        """Encoder layers that run: hidden state -1 is the last layer's output, -(layers + 1) the embeddings."""
        return self.layers + 1 + self.select_layer

    @property
    def projector_in(self) -> int:
        return self.hidden * int(1 / self.downsample_ratio) ** 2

    @classmethod
    def from_config(cls, config: dict, processor_config: dict | None = None) -> "VisionSpec":
        """`processor_config`: the hf layout's image processor options (tiling); ignored for the original layout."""
        if detect_layout(config) == "original":
            return cls._from_original(config)
        return cls._from_hf(config, processor_config or {})

    @classmethod
    def from_model_dir(cls, model_dir: pathlib.Path | str) -> "VisionSpec":
        model_dir = pathlib.Path(model_dir)
        return cls.from_config(read_config(model_dir), _read_processor_config(model_dir))

    @classmethod
    def _from_original(cls, config: dict) -> "VisionSpec":
        vision = config["vision_config"]
        _check_activation(vision.get("hidden_act", "gelu"), "vision_config.hidden_act")
        if config.get("ps_version", "v2") != "v2":
            raise CheckpointError(f"ps_version {config['ps_version']!r}: only the v2 pixel shuffle is served")
        eps = vision.get("layer_norm_eps", 1e-6)
        return cls(
            hidden=vision["hidden_size"], heads=vision["num_attention_heads"],
            layers=vision["num_hidden_layers"], mlp=vision["intermediate_size"],
            norm=_norm(vision.get("norm_type", "layer_norm")), eps=eps,
            qk_norm=vision.get("qk_normalization", False), qk_norm_eps=eps,
            qkv_bias=vision.get("qkv_bias", True), llm_hidden=config["llm_config"]["hidden_size"],
            image_size=config.get("force_image_size") or vision.get("image_size", 448),
            patch_size=vision.get("patch_size", 14),
            downsample_ratio=config.get("downsample_ratio", 0.5),
            select_layer=config.get("select_layer", -1),
            use_thumbnail=config.get("use_thumbnail", True),
            max_dynamic_patch=config.get("max_dynamic_patch", 12),
            min_dynamic_patch=config.get("min_dynamic_patch", 1),
        )

    @classmethod
    def _from_hf(cls, config: dict, processor: dict) -> "VisionSpec":
        vision = config["vision_config"]
        _check_activation(vision.get("hidden_act", "gelu"), "vision_config.hidden_act")
        _check_activation(config.get("projector_hidden_act", "gelu"), "projector_hidden_act")
        if not vision.get("use_mean_pooling", True):
            raise CheckpointError("vision_config.use_mean_pooling is false: a final vision LayerNorm is not served")
        feature_layer = config.get("vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise CheckpointError(f"vision_feature_layer {feature_layer!r}: only a single layer is served")
        tiled = processor.get("crop_to_patches", True)
        return cls(
            hidden=vision["hidden_size"], heads=vision["num_attention_heads"],
            layers=vision["num_hidden_layers"], mlp=vision["intermediate_size"],
            norm=_norm(vision.get("norm_type", "layer_norm")), eps=vision.get("layer_norm_eps", 1e-6),
            qk_norm=vision.get("use_qk_norm", False), qk_norm_eps=_HF_QK_NORM_EPS,
            qkv_bias=vision.get("attention_bias", False), llm_hidden=config["text_config"]["hidden_size"],
            image_size=_square(vision.get("image_size", 448), "image_size"),
            patch_size=_square(vision.get("patch_size", 14), "patch_size"),
            downsample_ratio=config.get("downsample_ratio", 0.5),
            select_layer=feature_layer,
            # transformers' processor always adds the thumbnail to a multi-tile image; without
            # `crop_to_patches` an image is one resized tile.
            use_thumbnail=True,
            max_dynamic_patch=processor.get("max_patches", 12) if tiled else 1,
            min_dynamic_patch=processor.get("min_patches", 1) if tiled else 1,
        )


def _norm(norm_type: str) -> str:
    if norm_type not in _NORMS:
        raise CheckpointError(f"vision norm_type {norm_type!r}: expected one of {sorted(_NORMS)}")
    return _NORMS[norm_type]


def _check_activation(name: str, key: str) -> None:
    if name != "gelu":
        raise CheckpointError(f"{key} {name!r}: InternViT and its projector use the exact 'gelu'")


def _square(size: int | list[int], name: str) -> int:
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise CheckpointError(f"vision {name} {size}: only square sizes are served")
    return size[0]


def _read_processor_config(model_dir: pathlib.Path) -> dict:
    """The image processor options: `preprocessor_config.json`, or the `image_processor` section of
    `processor_config.json` (transformers 5 writes the processor as one file)."""
    preprocessor = model_dir / "preprocessor_config.json"
    if preprocessor.exists():
        return json.loads(preprocessor.read_text())
    processor = model_dir / "processor_config.json"
    if processor.exists():
        return json.loads(processor.read_text()).get("image_processor", {})
    return {}
