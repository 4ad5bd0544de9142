"""PreprocessPool: the same tiles as the direct call, inline, on worker threads or in spawned worker processes."""

import asyncio
import io
import os
import signal
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from protos import tracing, vision_pb2
from tests.vision_svc.vision_helpers import encode, running_vision
from vision_svc.config import parse_config
from vision_svc.image_decode import ImageError, ImageLimits
from vision_svc.preprocess import PreprocessPool, PreprocessWorkerDied, preprocess_image
from vision_svc.server import preprocess_in_threads
from vision_svc.tiling import TileOptions

OPTIONS = TileOptions(max_tiles=6, use_thumbnail=True)


def jpeg_bytes(width, height, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
async def process_pool():
    with PreprocessPool(workers=2, limits=ImageLimits(max_image_pixels=1_000_000)) as pool:
        await pool.warm_up()
        yield pool


async def assert_tiles_equal_the_direct_call(pool, limits):
    images = [jpeg_bytes(w, h, seed) for seed, (w, h) in enumerate([(900, 500), (300, 800), (448, 448)])]
    results = await asyncio.gather(*(pool.tiles(data, OPTIONS) for data in images))
    for data, got in zip(images, results):
        expected = preprocess_image(data, limits, OPTIONS)
        assert got.dtype == torch.float32 and got.shape[1:] == (3, 448, 448)
        assert torch.equal(got, expected)


async def test_process_pool_tiles_equal_the_direct_call(process_pool):
    await assert_tiles_equal_the_direct_call(process_pool, process_pool.limits)


async def test_inline_pool_tiles_equal_the_direct_call():
    with PreprocessPool(0) as pool:
        await assert_tiles_equal_the_direct_call(pool, pool.limits)


async def test_thread_pool_tiles_equal_the_direct_call_on_workers_that_run_at_once():
    with PreprocessPool(workers=2, threads=True) as pool:
        await assert_tiles_equal_the_direct_call(pool, pool.limits)
        # Each waits for the other: one thread alone would break the barrier at its timeout.
        both = threading.Barrier(2, timeout=30)
        assert await asyncio.gather(pool.in_worker(both.wait), pool.in_worker(both.wait)) in ([0, 1], [1, 0])
        with pytest.raises(ImageError, match="empty"):
            await pool.tiles(b"", OPTIONS)


@pytest.mark.parametrize("choice,device_type,threads", [
    ("auto", "cpu", True), ("auto", "cuda", False), ("auto", "npu", False),
    ("threads", "cuda", True), ("processes", "cpu", False)])
def test_the_pool_is_threads_where_the_encoder_shares_the_cpu(choice, device_type, threads):
    assert preprocess_in_threads(choice, device_type) is threads


async def test_a_cpu_server_preprocesses_on_threads_by_default(tiny_checkpoint):
    async with running_vision(tiny_checkpoint(), preprocess_workers=2) as (stub, server):
        assert server.pool.in_threads and server.pool.workers == 2
        images = [vision_pb2.ImageInput(data=jpeg_bytes(900, 500, seed)) for seed in range(3)]
        got = await encode(stub, images, max_tiles=6)
    assert [header.num_tiles for header, _ in got.values()] == [3, 3, 3]


def test_cli_chooses_the_pool_and_refuses_others(capsys):
    assert parse_config(["--model", "m"]).preprocess_pool == "auto"
    assert parse_config(["--model", "m", "--preprocess-pool", "processes"]).preprocess_pool == "processes"
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--preprocess-pool", "fork"])
    assert "invalid choice: 'fork'" in capsys.readouterr().err


async def test_refusals_from_workers_are_image_errors(process_pool):
    with pytest.raises(ImageError, match="not an image in a supported format"):
        await process_pool.tiles(b"definitely not an image", OPTIONS)
    # The pool's limits are enforced inside the worker.
    with pytest.raises(ImageError, match="1200x1000 = 1200000 pixels, over the limit of 1000000 pixels"):
        await process_pool.tiles(jpeg_bytes(1200, 1000, 0), OPTIONS)
    # A refusal does not hurt the workers.
    assert (await process_pool.tiles(jpeg_bytes(100, 100, 1), OPTIONS)).shape == (1, 3, 448, 448)


async def test_inline_pool_raises_image_errors():
    with PreprocessPool(0) as pool:
        with pytest.raises(ImageError, match="empty"):
            await pool.tiles(b"", OPTIONS)


async def test_pool_replaces_itself_after_a_worker_dies():
    with PreprocessPool(workers=1) as pool:
        await pool.warm_up()
        # The executor's process table is private; killing a worker is the only honest way to test this.
        (pid,) = pool._executor._processes
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PreprocessWorkerDied):
            for _ in range(50):  # the executor notices the death asynchronously
                await pool.tiles(jpeg_bytes(64, 64, 2), OPTIONS)
                await asyncio.sleep(0.05)
        assert (await pool.tiles(jpeg_bytes(64, 64, 3), OPTIONS)).shape == (1, 3, 448, 448)


async def test_workers_do_not_import_torch_with_tracing_on(recorded):
    # Torch in a worker is a second of start-up on its first image and ~200 MB that it never uses; with
    # tracing on, the workers run the timed decode, which must come from a module as light as the untimed one.
    with PreprocessPool(workers=1) as pool:
        await pool.warm_up()
        with tracing.span("test"):
            await pool.tiles(jpeg_bytes(64, 64, 4), OPTIONS)
        assert [span.name for span in recorded.get_finished_spans()] == ["image_decode", "test"]
        # A builtin travels by name: the worker answers from its own modules.
        assert await pool.in_worker(eval, "'torch' in __import__('sys').modules") is False


def test_pool_refuses_negative_workers():
    with pytest.raises(ValueError):
        PreprocessPool(-1)
