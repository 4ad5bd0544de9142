"""Tiny InternVL3.5-architecture checkpoints built locally (random weights, locally trained tokenizer).

`build(out_dir, layout, llm, vision, seed)` writes one; `python -m deploy.tiny_model --help` documents the CLI.
"""

from deploy.tiny_model.build import BUILD_STAMP, LAYOUTS, build

__all__ = ["BUILD_STAMP", "LAYOUTS", "build"]
