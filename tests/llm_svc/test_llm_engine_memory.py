"""The language engine llm_svc configures holds no vision weights (vLLM skips InternVL's tower only when
the limit is 0 for every modality)."""

import pytest

from llm_svc.config import NO_VISION_TOWER

VISION_PREFIXES = ("vision_model", "mlp1", "vision_tower", "multi_modal_projector")


def parameter_bytes(model) -> tuple[int, int]:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    vision = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(VISION_PREFIXES))
    return total, vision


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_llm_svc_engine_has_no_vision_tower_and_image_only_limit_would(vllm_engines, tiny_checkpoint, layout):
    checkpoint = tiny_checkpoint(layout=layout, llm="dense", vision="6b")
    ours = vllm_engines.get(checkpoint, enable_mm_embeds=True, limit_mm_per_prompt=NO_VISION_TOWER)
    (total, vision), = ours.apply_model(parameter_bytes)
    assert vision == 0 and total > 0
    image_only = vllm_engines.get(checkpoint, enable_mm_embeds=True, limit_mm_per_prompt={"image": 0})
    (total_image_only, vision_image_only), = image_only.apply_model(parameter_bytes)
    assert vision_image_only > 0 and total_image_only == total + vision_image_only
