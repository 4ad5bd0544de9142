"""The shared server bootstrap against a real server on a loopback port."""

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import vision_pb2, vision_pb2_grpc
from protos.server import KEEPALIVE_S, channel_options, channel_state
from tests.protos.fake_vision_server import SERVICE, make_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel, service=""):
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return response.status


async def test_health_turns_serving_only_when_told_and_reflection_lists_services():
    server = make_server()
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert await health_status(channel) == NOT_SERVING
        await server.set_serving()
        assert await health_status(channel) == SERVING
        assert await health_status(channel, SERVICE) == SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert SERVICE in names and "grpc.health.v1.Health" in names
    await server.drain()


async def test_health_watch_streams_each_change():
    """Watch streams with `context.write` rather than yielding: the error interceptor passes it through."""
    server = make_server()
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await call.read()).status == NOT_SERVING
        await server.set_serving()
        assert (await call.read()).status == SERVING
        call.cancel()
    await server.drain()


async def test_a_client_channel_takes_no_calls_while_its_server_is_not_serving():
    """The channels check health: a call to a replica that says NOT_SERVING fails UNAVAILABLE at once (for its
    caller to retry elsewhere) rather than reaching it, and the channel leaves READY until it says SERVING."""
    server = make_server()
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(8 << 20)) as channel:
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetInfo(vision_pb2.GetInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "unhealthy" in refused.value.details()
        assert time.monotonic() - started < 5  # refused, not left to its deadline
        assert channel_state(channel) == grpc.ChannelConnectivity.TRANSIENT_FAILURE

        await server.set_serving()
        await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.TRANSIENT_FAILURE), 10)
        assert (await stub.GetInfo(vision_pb2.GetInfoRequest(), wait_for_ready=True, timeout=10)).model == "fake"
        assert channel_state(channel) == grpc.ChannelConnectivity.READY

        await server.set_not_serving("a test")
        await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 10)
        assert channel_state(channel) == grpc.ChannelConnectivity.TRANSIENT_FAILURE
    await server.drain()


async def test_typed_errors_map_to_status_codes_with_metadata():
    server = make_server()
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            [r async for r in stub.Encode(vision_pb2.EncodeRequest(request_id="bad"))]
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.details() == "image 1: too big (limit 10)"
        assert ("missing", "1") in tuple(bad.value.trailing_metadata())

        received = []
        with pytest.raises(grpc.aio.AioRpcError) as crash:
            async for r in stub.Encode(vision_pb2.EncodeRequest(request_id="crash")):
                received.append(r)
        assert crash.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError: boom" in crash.value.details()
        assert len(received) == 1  # what was streamed before the failure still arrived
        assert (await stub.GetInfo(vision_pb2.GetInfoRequest())).model == "fake"
    await server.drain()


def start_fake_server(port_file: pathlib.Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).parent / "fake_vision_server.py"),
                             str(port_file)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
        time.sleep(0.05)
    return proc


def test_sigterm_drains_in_flight_stream_then_exits(tmp_path):
    port_file = tmp_path / "port"
    proc = start_fake_server(port_file)
    try:
        target = f"127.0.0.1:{port_file.read_text()}"

        async def stream_while_terminating():
            async with grpc.aio.insecure_channel(target) as channel:
                stub = vision_pb2_grpc.VisionEncoderStub(channel)
                call = stub.Encode(vision_pb2.EncodeRequest(request_id="slow"))
                chunks = [await call.read()]
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
                async with grpc.aio.insecure_channel(target) as probe:
                    status_during_drain = await health_status(probe)
                while (chunk := await call.read()) is not grpc.aio.EOF:
                    chunks.append(chunk)
                return chunks, status_during_drain

        chunks, status_during_drain = asyncio.run(stream_while_terminating())
        assert len(chunks) == 5 and chunks[-1].last
        assert status_during_drain == NOT_SERVING
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_a_quiet_call_lives_through_pings_and_a_silent_server_fails_it_unavailable(tmp_path):
    """Keepalive: a live server answers the pings on a call that carries nothing for longer than the ping
    interval; once the server stops answering (SIGSTOP, as a partition or a hung host would), the call fails
    UNAVAILABLE within the ping interval and timeout (20 s), which a caller retries elsewhere, and not
    DEADLINE_EXCEEDED at its deadline."""
    port_file = tmp_path / "port"
    proc = start_fake_server(port_file)
    try:
        async def watch() -> grpc.StatusCode:
            options = channel_options(8 << 20)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port_file.read_text()}", options=options) as channel:
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
                await call.read()
                await asyncio.sleep(KEEPALIVE_S + 1)
                assert await health_status(channel) == SERVING  # the connection outlived a ping
                proc.send_signal(signal.SIGSTOP)
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await call.read()
                return failure.value.code()

        assert asyncio.run(watch()) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.kill()
