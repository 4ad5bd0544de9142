"""The gateway's command line: every flag explained, parsed into one validated config."""

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import pytest

from deploy.local import free_port
from gateway.config import MIB, build_parser, config_from_args


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_flags_parse_into_the_config(tmp_path: pathlib.Path):
    config = config_from_args(["--llm", "a:1, b:2", "--port", "9000", "--api-key", "k", "--served-model-name", "m",
                               "--allowed-local-media-path", str(tmp_path), "--allow-private-image-urls",
                               "--max-image-bytes", "1000", "--max-images-per-request", "3",
                               "--max-video-bytes", "700", "--max-videos-per-request", "1",
                               "--image-fetch-timeout-s", "2.5", "--max-redirects", "0",
                               "--request-timeout-s", "30", "--max-request-bytes", "5000", "--max-tokens-limit", "64"])
    assert config.llm_targets == ("a:1", "b:2") and config.port == 9000 and config.api_key == "k"
    assert config.served_model_name == "m" and config.allowed_local_media_path == tmp_path
    assert config.allow_private_image_urls and config.max_redirects == 0 and config.max_tokens_limit == 64
    assert (config.max_image_bytes, config.max_images_per_request, config.max_request_bytes) == (1000, 3, 5000)
    assert (config.max_video_bytes, config.max_videos_per_request) == (700, 1)
    assert config.grpc_max_message_bytes == 3 * 1000 + 700 + 5000


def test_defaults_are_safe(monkeypatch):
    monkeypatch.delenv("GATEWAY_API_KEY", raising=False)
    config = config_from_args(["--llm", "localhost:50051"])
    assert not config.allow_private_image_urls and config.allowed_local_media_path is None
    assert config.api_key is None and config.max_image_bytes == 20 * MIB


@pytest.mark.parametrize("argv, words", [
    (["--llm", "no-port"], "HOST:PORT"),
    (["--llm", "a:1", "--max-image-bytes", "0"], "max_image_bytes"),
    (["--llm", "a:1", "--request-timeout-s", "0"], "request_timeout_s"),
    (["--llm", "a:1", "--keep-alive-timeout-s", "0"], "keep_alive_timeout_s"),
    (["--llm", "a:1", "--allowed-local-media-path", "/nonexistent-dir"], "not a directory"),
    (["--llm", "a:1", "--max-images-per-request", "1000", "--max-image-bytes", str(100 * MIB)], "2 GiB"),
])
def test_invalid_configs_are_refused(argv, words):
    with pytest.raises(ValueError, match=words):
        config_from_args(argv)


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=60)
    assert result.returncode == 0 and "--allow-private-image-urls" in result.stdout


async def start_gateway(backend, processes: list, *flags: str, stderr=subprocess.DEVNULL) -> int:
    """A gateway process (added to `processes` at once, for the caller to stop) in front of the fake backend; its port
    once it answers."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--llm", backend.target, "--host", "127.0.0.1", "--port", str(port), *flags,
        env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=stderr)
    processes.append(process)
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            assert process.returncode is None and time.monotonic() < deadline, "gateway did not start"
            try:
                await http.get(f"http://127.0.0.1:{port}/metrics")
                return port
            except httpx.ConnectError:
                await asyncio.sleep(0.1)


async def stop_gateways(processes: list) -> list[bytes]:
    """SIGTERM to each, and what each wrote to a piped stderr once it has exited."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    return [(await asyncio.wait_for(process.communicate(), timeout=30))[1] or b"" for process in processes]


async def test_cli_serves_with_uvloop_and_exits_cleanly_on_sigterm(backend, monkeypatch):
    # Async, so the fake backend in this event loop keeps answering while the gateway process calls it.
    monkeypatch.delenv("GATEWAY_API_KEY", raising=False)  # the child inherits os.environ; /v1/models stays open
    processes = []
    try:
        port = await start_gateway(backend, processes, "--shutdown-grace-s", "1", stderr=subprocess.PIPE)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            assert (await http.get("/v1/models")).json()["data"][0]["id"] == "tiny-internvl"
            assert (await http.get("/health")).status_code == 200
    finally:
        stderr = (await stop_gateways(processes))[0].decode()
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM.
    assert processes[0].returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr


async def get_metrics(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET /metrics on an open connection; its status line, or b"" when the gateway had closed it."""
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
    try:
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (ConnectionError, asyncio.IncompleteReadError):
        return b""
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return head.split(b"\r\n")[0]


async def test_an_idle_connection_outlives_the_clients_pool_timeout(backend):
    """httpx, the openai SDK (5 s) and aiohttp (15 s) reuse a connection idle for up to their pool's timeout; one the
    gateway closed at that moment (uvicorn's own default is 5 s) would cost the client a reset. --keep-alive-timeout-s
    sets how long an idle connection is kept."""
    processes = []
    try:
        kept = await asyncio.open_connection("127.0.0.1", await start_gateway(backend, processes))
        dropped = await asyncio.open_connection(
            "127.0.0.1", await start_gateway(backend, processes, "--keep-alive-timeout-s", "0.5"))
        assert await get_metrics(*kept) == await get_metrics(*dropped) == b"HTTP/1.1 200 OK"
        await asyncio.sleep(6)  # past httpx's pool timeout, and uvicorn's default
        assert await get_metrics(*kept) == b"HTTP/1.1 200 OK"
        assert await dropped[0].read() == b""  # closed by the gateway
        for _, writer in (kept, dropped):
            writer.close()
    finally:
        await stop_gateways(processes)
