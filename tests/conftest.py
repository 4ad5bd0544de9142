"""Session-wide fixtures shared by every test package.

Sections: tiny checkpoints (built once, cached on disk across runs), in-process vLLM engines (one alive at
a time: each holds its KV cache and weights).
"""

from deploy import fork_safe_grpc  # noqa: F401,I001  (first: tests start stages after gRPC calls)

import gc
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKPOINT_CACHE = REPO_ROOT / ".cache" / "test-checkpoints"


# ---- tiny checkpoints ------------------------------------------------------------------------------------

def tiny_checkpoint_dir(layout: str = "original", llm: str = "dense", vision: str = "300m",
                        seed: int = 0) -> pathlib.Path:
    """Builds (or reuses: builds are deterministic) a tiny checkpoint under the repository's cache."""
    from deploy.tiny_model.build import build

    return build(CHECKPOINT_CACHE / f"{layout}-{llm}-{vision}-s{seed}", layout=layout, llm=llm, vision=vision,
                 seed=seed)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """`tiny_checkpoint(layout="original", llm="dense", vision="300m", seed=0)` -> checkpoint directory."""
    return tiny_checkpoint_dir


# ---- vLLM engines ----------------------------------------------------------------------------------------

VLLM_KV_CACHE_BYTES = 256 << 20


class VllmEngines:
    """Keeps at most one in-process `vllm.LLM` alive; asking for another shuts the previous one down."""

    def __init__(self):
        self.key = None
        self.engine = None

    def get(self, checkpoint: pathlib.Path, **engine_args):
        key = (str(checkpoint), tuple(sorted(engine_args.items())))
        if key != self.key:
            self.close()
            # In-process engine core: starts in seconds, and tests can read its state.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from vllm import LLM

            args = dict(trust_remote_code=True, enforce_eager=True, dtype="float32", max_model_len=8192,
                        kv_cache_memory_bytes=VLLM_KV_CACHE_BYTES, seed=0)
            self.engine = LLM(model=str(checkpoint), **{**args, **engine_args})
            self.key = key
        return self.engine

    def close(self):
        if self.engine is None:
            return
        from vllm.distributed import cleanup_dist_env_and_memory

        self.engine.llm_engine.engine_core.shutdown()
        self.engine = self.key = None
        gc.collect()
        cleanup_dist_env_and_memory()


@pytest.fixture(scope="session")
def vllm_engines():
    engines = VllmEngines()
    yield engines
    engines.close()


@pytest.fixture(scope="session")
def vllm_engine(tiny_checkpoint, vllm_engines):
    """`vllm_engine(layout, llm, vision="300m", **engine_args)` -> `vllm.LLM` on that tiny checkpoint.

    fp32, eager, in-process, image embeddings accepted (`enable_mm_embeds`).
    """
    def get(layout: str = "original", llm: str = "dense", vision: str = "300m", **engine_args):
        engine_args = {"enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 2}, **engine_args}
        return vllm_engines.get(tiny_checkpoint(layout=layout, llm=llm, vision=vision), **engine_args)

    return get


@pytest.fixture
def recorded():
    """Spans made while the test runs, kept in memory: tracing on for this process, off again after."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from protos import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()
