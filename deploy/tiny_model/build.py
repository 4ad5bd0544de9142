"""Builds a tiny InternVL3.5-architecture checkpoint directory, in the original or the hf layout.

A build is deterministic (same arguments -> byte-identical files) and atomic: it is written into a
sibling temporary directory and renamed into place, and `BUILD_STAMP` (written last) records the
arguments, so a directory that holds the stamp of the same arguments is complete and is returned at once.
"""

import json
import os
import pathlib
import shutil
import tempfile

from deploy.tiny_model import configs, weights
from deploy.tiny_model.chat_template import chat_template
from deploy.tiny_model.processor import write_processor
from deploy.tiny_model.tokenizer import CONTEXT_VIDEO_TOKEN, write_tokenizer

LAYOUTS = ("original", "hf")
BUILD_STAMP = "tiny_model_build.json"
# Bumped when what a build writes changes (3: the video context token, other weights as before), so cached
# older builds are rebuilt.
BUILD_VERSION = 3
_REMOTE_CODE = pathlib.Path(__file__).parent / "remote_code"
_REMOTE_CODE_FILES = ("configuration_internvl_chat.py", "configuration_intern_vit.py")


def build(out_dir: str | os.PathLike, layout: str = "original", llm: str = "dense", vision: str = "300m",
          seed: int = 0) -> pathlib.Path:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out_dir = pathlib.Path(out_dir).absolute()
    stamp = {"layout": layout, "llm": llm, "vision": vision, "seed": seed, "version": BUILD_VERSION}
    if _stamp_of(out_dir) == stamp:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_checkpoint(tmp, layout, llm, vision, seed)
        (tmp / BUILD_STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        _make_readable(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if _stamp_of(out_dir) == stamp:  # a concurrent build of the same arguments won the rename
            return out_dir
        raise
    return out_dir


def _make_readable(directory: pathlib.Path) -> None:
    # mkdtemp makes the directory private and safetensors writes private files; a checkpoint is shared.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _stamp_of(out_dir: pathlib.Path) -> dict | None:
    try:
        return json.loads((out_dir / BUILD_STAMP).read_text())
    except (OSError, ValueError):
        return None


def _write_checkpoint(out: pathlib.Path, layout: str, llm: str, vision: str, seed: int) -> None:
    special_ids = write_tokenizer(out, chat_template(layout))
    # The weights are drawn for the vocabulary before the video context token, whose rows are added after, so
    # that every other weight keeps its value (and the model writes what it wrote before the token came).
    first_vocab_size = special_ids[CONTEXT_VIDEO_TOKEN]
    model = weights.random_model(configs.hf_config(llm, vision, first_vocab_size, special_ids), seed)
    weights.add_token_rows(model, max(special_ids.values()) + 1, seed)
    if layout == "hf":
        _write_hf(out, model)
    else:
        _write_original(out, model, model.config)


def _write_hf(out: pathlib.Path, model) -> None:
    model.save_pretrained(out)
    weights.reshard_saved(out)
    write_processor(out)


def _write_original(out: pathlib.Path, model, config) -> None:
    weights.write_shards(weights.original_state_dict(model), out)
    (out / "config.json").write_text(json.dumps(configs.original_config(config), indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)
    for name in _REMOTE_CODE_FILES:
        shutil.copyfile(_REMOTE_CODE / name, out / name)
