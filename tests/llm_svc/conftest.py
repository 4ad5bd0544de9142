"""The pipeline several llm_svc modules test against: vision_svc (metrics on a port) and llm_svc with the test
engine flags and nothing else, on one tiny checkpoint. Starting llm_svc is the slow part of those modules, so the
pipeline last asked for stays up for the next module that asks for the same checkpoint (test_llm_admission's
and the first of test_llm_parity's are one; the last of test_llm_parity's is test_llm_tensor_parallel's single
rank). One is kept at a time: each holds its engine's weights and KV cache."""

import dataclasses

import pytest

from deploy.local import Stage, free_port
from tests.llm_svc.llm_helpers import LlmClient
from tests.stack import start_llm, start_vision, stop_all


@dataclasses.dataclass
class Pipeline:
    vision: Stage
    llm: Stage
    vision_metrics: int  # vision_svc's --metrics-port
    client: LlmClient

    def close(self) -> None:
        self.client.close()
        stop_all([self.llm, self.vision])


class Pipelines:
    def __init__(self, tiny_checkpoint, tmp_path_factory):
        self.tiny_checkpoint = tiny_checkpoint
        self.tmp_path_factory = tmp_path_factory
        self.key = None
        self.pipeline: Pipeline | None = None

    def get(self, layout: str, llm: str) -> Pipeline:
        if (layout, llm) != self.key:
            self.close()
            model = self.tiny_checkpoint(layout=layout, llm=llm)
            logs = self.tmp_path_factory.mktemp(f"pipeline-{layout}-{llm}")
            vision_metrics = free_port()
            vision = start_vision(model, logs, "--metrics-port", str(vision_metrics))
            llm_stage = start_llm(model, [vision], logs)  # it waits for vision_svc by itself
            try:
                vision.wait_ready()
                llm_stage.wait_ready()
            except BaseException:
                stop_all([llm_stage, vision])
                raise
            self.pipeline = Pipeline(vision, llm_stage, vision_metrics, LlmClient(llm_stage.address))
            self.key = (layout, llm)
        return self.pipeline

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        self.pipeline = self.key = None


@pytest.fixture(scope="package")
def pipelines(tiny_checkpoint, tmp_path_factory):
    """`pipelines(layout, llm)` -> the running Pipeline on that tiny checkpoint (started, or the one still up)."""
    pipelines = Pipelines(tiny_checkpoint, tmp_path_factory)
    yield pipelines.get
    pipelines.close()
