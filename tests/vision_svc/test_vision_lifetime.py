"""However vision_svc ends, its preprocessing workers and multiprocessing's helpers end with it, and the
semaphores they made are gone."""

import os
import signal

import grpc
import pytest

from protos import vision_pb2, vision_pb2_grpc
from tests.llm_svc.llm_helpers import image, png_bytes
from tests.stack import StageProcesses, start_vision


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_nothing_of_vision_svc_outlives_it(tiny_checkpoint, tmp_path, sig):
    vision = start_vision(tiny_checkpoint(), tmp_path, "--preprocess-workers", "2",
                          "--preprocess-pool", "processes").wait_ready()
    with grpc.insecure_channel(vision.address) as channel:
        request = vision_pb2.EncodeRequest(images=[vision_pb2.ImageInput(data=png_bytes(image(900, 600, s)))
                                                   for s in range(3)])
        assert sum(r.last for r in vision_pb2_grpc.VisionEncoderStub(channel).Encode(request, timeout=60)) == 3
    processes = StageProcesses().add(vision)
    # The stage, its orphan guard, two workers and multiprocessing's resource tracker; their semaphores and
    # the stage's temporary directory.
    assert len(processes.processes) == 5 and len(processes.files) > 1
    # As a terminal does, SIGINT goes to the stage's whole process group (the stage leads it).
    os.killpg(vision.proc.pid, sig) if sig == signal.SIGINT else vision.proc.send_signal(sig)
    assert vision.proc.wait(30) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    processes.assert_all_gone()
    log = vision.logs()
    assert "Traceback" not in log, log
    if sig != signal.SIGKILL:  # after a kill, multiprocessing's tracker rightly reports what it cleaned up
        assert "leaked" not in log, log
