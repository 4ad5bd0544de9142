"""The project's vLLM plugin: installed, and what it changes in vLLM's InternVL schemas."""

import pytest
import torch

from llm_svc import vllm_plugin


def test_the_plugin_is_installed_where_vllm_looks_for_it():
    assert vllm_plugin.installed()


@pytest.mark.parametrize("module, schema", [
    ("internvl", "InternVLImageEmbeddingInputs"), ("internvl", "InternVLVideoEmbeddingInputs"),
    ("interns1", "InternS1ImageEmbeddingInputs"), ("interns1", "InternS1VideoEmbeddingInputs"),
])
def test_embeddings_of_different_sizes_pass_the_schema(module, schema):
    import importlib

    vllm_plugin.register()
    schema = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), schema)
    kind = "image_embeds" if "Image" in schema.__name__ else "video_embeds"
    schema(type=kind, data=[torch.zeros(768, 64), torch.zeros(256, 64)])  # 3 tiles and 1 tile
    with pytest.raises(ValueError, match="inconsistent"):  # the width must still agree
        schema(type=kind, data=[torch.zeros(768, 64), torch.zeros(256, 32)])


@pytest.mark.parametrize("before, after", [
    (None, None), ("", "internvl_dvd"), ("other", "other,internvl_dvd"), ("other,internvl_dvd", "other,internvl_dvd"),
])
def test_a_restricted_plugin_list_keeps_this_plugin(before, after):
    environ = {} if before is None else {"VLLM_PLUGINS": before}
    vllm_plugin.keep_enabled(environ)
    assert environ.get("VLLM_PLUGINS") == after


def test_image_tiling_options_build_the_processor_of_a_checkpoint_that_serves_videos():
    from vllm.model_executor.models.internvl import InternVLProcessingInfo

    vllm_plugin.register()

    class Context:
        def get_merged_mm_kwargs(self, kwargs):
            return {"max_dynamic_patch": 12, **kwargs}  # as if the server was started with it too

    class Info:
        ctx = Context()

        def get_hf_config(self):
            raise AssertionError("the request's image size is used")

    processor = InternVLProcessingInfo.get_video_processor(Info(), max_dynamic_patch=6, image_size=448)
    assert processor.image_size == 448
