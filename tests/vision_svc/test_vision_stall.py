"""A vision_svc whose preprocessing worker is stuck (stopped, as a hung worker or device would be) still answers
pings and health checks; past --stall-timeout-s it says NOT_SERVING, so that the callers' channels send no more
images to it, sends the images in hand back to their callers (UNAVAILABLE, for them to retry elsewhere), and is
SERVING again once the worker moves."""

import asyncio
import signal
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import vision_pb2, vision_pb2_grpc
from protos.server import channel_options
from tests.llm_svc.llm_helpers import image, png_bytes
from tests.stack import start_vision

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def preprocessing_worker(pid: int) -> psutil.Process:
    workers = [p for p in psutil.Process(pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    return workers[0]


async def wait_for_health(channel: grpc.aio.Channel, status, timeout_s: float) -> float:
    """Seconds until Check answers `status`."""
    started = time.monotonic()
    stub = health_pb2_grpc.HealthStub(channel)
    while (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != status:
        assert time.monotonic() - started < timeout_s, f"health did not turn {status} in {timeout_s} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def encode(stub, seed: int, timeout_s: float):
    request = vision_pb2.EncodeRequest(images=[vision_pb2.ImageInput(data=png_bytes(image(600, 400, seed)))])
    return stub.Encode(request, timeout=timeout_s)


def test_a_stuck_worker_turns_health_not_serving_until_it_moves(tiny_checkpoint, tmp_path):
    vision = start_vision(tiny_checkpoint(), tmp_path, "--preprocess-workers", "1", "--preprocess-pool", "processes",
                          "--stall-timeout-s", "2").wait_ready()
    worker = preprocessing_worker(vision.proc.pid)

    async def scenario():
        async with grpc.aio.insecure_channel(vision.address) as probe, \
                grpc.aio.insecure_channel(vision.address, options=channel_options(64 << 20)) as client:
            stub = vision_pb2_grpc.VisionEncoderStub(client)
            assert len([m async for m in encode(stub, 1, 60)]) >= 1  # moving: SERVING, and the channel READY
            worker.send_signal(signal.SIGSTOP)
            try:
                stuck = encode(stub, 2, 120)  # waits on the stopped worker
                waited = await wait_for_health(probe, NOT_SERVING, 30)
                with pytest.raises(grpc.aio.AioRpcError) as sent_back:  # in hand: sent back, not left to wait
                    await asyncio.wait_for(stuck.read(), 5)
                assert sent_back.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "image work is stuck (no progress for" in sent_back.value.details()
                if client.get_state() == grpc.ChannelConnectivity.READY:  # its health watch may lag the probe
                    await asyncio.wait_for(client.wait_for_state_change(grpc.ChannelConnectivity.READY), 5)
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as refused:  # refused at once, for a caller to go elsewhere
                    [m async for m in encode(stub, 3, 30)]
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 5
                # A caller that does not check health reaches the replica, which refuses new images while stuck.
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    [m async for m in encode(vision_pb2_grpc.VisionEncoderStub(probe), 4, 30)]
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "image work is stuck" in refused.value.details()
            finally:
                worker.send_signal(signal.SIGCONT)
            await wait_for_health(probe, SERVING, 10)
            assert (await anext(aiter(encode(stub, 5, 60)))).image_index == 0  # takes images again
            return waited

    waited = asyncio.run(scenario())
    assert waited < 15
    vision.stop()
    log = vision.logs()
    assert "health: NOT_SERVING: no progress for" in log and "in preprocessing (--stall-timeout-s 2)" in log, log
    assert "1 images and videos in hand sent back to their callers" in log, log
    assert "image work is moving again" in log, log
