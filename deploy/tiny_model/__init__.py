"""Tiny InternVL3.5-architecture checkpoints built locally (random weights, locally trained tokenizer).

`deploy.tiny_model.build.build(out_dir, layout, llm, vision, seed)` writes one; `python -m deploy.tiny_model --help`
documents the CLI. Nothing is imported here: the tokenizer's constants are read by benches that must not pay for
importing transformers.
"""
