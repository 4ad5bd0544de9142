"""`--compile`: batches padded up to buckets give the eager encoder's output, and only the buckets compile.

Compiling the tiny encoder on CPU with a cold inductor cache costs 30-60 s per bucket on a 2-core machine
(seconds once cached), so the tests that compile run only with VISION_SVC_TEST_COMPILE=1. Always run: the
bucket sizes, and the padding and slicing for every batch size on the eager encoder (compile=False), and
the server's wiring of the flag.
"""

import io
import os
import sys
import types

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from protos import vision_pb2, vision_pb2_grpc
from tests.vision_svc.vision_helpers import encode
from vision_svc.config import VisionConfig
from vision_svc.encoder import load_encoder
from vision_svc.encoder_compile import GRAPH_MAX_TILES, BucketedEncoder, batch_buckets
from vision_svc.server import VisionServer
from vision_svc.tiling import TileOptions, image_to_tile_array

CPU = torch.device("cpu")
compiles = pytest.mark.skipif(os.environ.get("VISION_SVC_TEST_COMPILE") != "1",
                              reason="compiles the encoder (a minute or more cold); set VISION_SVC_TEST_COMPILE=1")


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    encoder, _ = load_encoder(tiny_checkpoint(layout="original", llm="dense", vision="300m"), CPU, torch.float32)
    return encoder


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))  # [n, 3, S, S]


@pytest.mark.parametrize("max_batch_tiles,expected", [
    (1, (1,)), (2, (1, 2)), (5, (1, 2, 4, 5)), (13, (1, 2, 4, 8, 13)), (32, (1, 2, 4, 8, 13, 16, 32)),
    (48, (1, 2, 4, 8, 13, 16, 32, 48)), (128, (1, 2, 4, 8, 13, 16, 32, 64, 128)),
    (200, (1, 2, 4, 8, 13, 16, 32, 64, 128, 200)),
])
def test_buckets_are_the_fixed_sizes_below_the_batch_limit_then_the_limit(max_batch_tiles, expected):
    assert batch_buckets(max_batch_tiles) == expected


def test_each_batch_goes_to_the_smallest_bucket_that_holds_it(encoder):
    bucketed = BucketedEncoder(encoder, (1, 2, 4, 8, 13), CPU, compile=False)
    assert [bucketed.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 12, 13)] == [1, 2, 4, 4, 8, 8, 13, 13, 13]


@pytest.mark.parametrize("bad", [(), (2, 1), (1, 1, 2), (0, 4)])
def test_refuses_buckets_that_are_not_increasing_positive_sizes(encoder, bad):
    with pytest.raises(ValueError, match="increasing positive"):
        BucketedEncoder(encoder, bad, CPU, compile=False)


def test_padded_batches_give_each_real_tile_its_own_output(encoder):
    bucketed = BucketedEncoder(encoder, (1, 2, 4), CPU, compile=False)
    pixels = tiles(7)
    with torch.inference_mode():
        expected = torch.cat([encoder(tile[None]) for tile in pixels])  # [7, tokens, hidden], one by one
        for count in (1, 3, 4, 7):  # 3 pads to 4; 7 is over the largest bucket: split into 4 + 3 (padded)
            got = bucketed(pixels[:count])
            assert got.shape == (count, *expected.shape[1:])
            torch.testing.assert_close(got, expected[:count], rtol=1e-5, atol=1e-5)


@compiles
def test_compiled_buckets_equal_eager_and_nothing_compiles_after_warm_up(encoder):
    from torch._dynamo.utils import counters

    bucketed = BucketedEncoder(encoder, (2, 4), CPU)
    pixels = tiles(4, seed=1)
    with torch.inference_mode():
        for bucket in bucketed.buckets:  # the server's warm-up
            bucketed(torch.zeros(bucket, 3, 448, 448))
        graphs = counters["stats"]["unique_graphs"]
        expected = encoder(pixels)
        for count in (1, 2, 3, 4):
            torch.testing.assert_close(bucketed(pixels[:count]), expected[:count], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs, "a batch size compiled after the warm-up"


@pytest.mark.parametrize("compile,warm_up_batches", [(True, (1, 2, 4, 8, 13, 16, 20)), (False, (1, 20))])
async def test_server_warms_every_bucket_only_when_compiled(tiny_checkpoint, compile, warm_up_batches):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    # Built, not started: torch.compile is lazy, so nothing compiles before the warm-up runs. (async: the gRPC
    # server it builds needs a running event loop.)
    server = VisionServer(VisionConfig(model=model, port=0, preprocess_workers=0, compile=compile,
                                       max_batch_tiles=20))
    try:
        assert server.warm_up_batches == warm_up_batches
    finally:
        server.runner.stop()
        server.pool.close()


@compiles
async def test_server_with_compile_warms_every_bucket_and_encodes_as_eager(tiny_checkpoint, encoder):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    # A 3-tile image over batches of at most 2 tiles: one full bucket of 2, then 1 tile in the bucket of 1.
    config = VisionConfig(model=model, host="127.0.0.1", port=0, preprocess_workers=0, compile=True,
                          max_batch_tiles=2, max_queue_tiles=8, batch_wait_ms=0, grace_s=0)
    server = VisionServer(config)
    assert server.warm_up_batches == (1, 2)
    port = await server.start()
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (500, 900, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            (header, got), = (await encode(vision_pb2_grpc.VisionEncoderStub(channel),
                                           [vision_pb2.ImageInput(data=buffer.getvalue())])).values()
    finally:
        await server.stop()
    pixels = torch.from_numpy(image_to_tile_array(image, TileOptions(max_tiles=12)))  # [3, 3, S, S]
    with torch.inference_mode():
        expected = encoder(pixels).reshape(-1, got.shape[-1])
    assert header.num_tiles == 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class FakeTorchAir(types.ModuleType):
    """TorchAir's documented entry points (`CompilerConfig`, `get_npu_backend(compiler_config=...)`); its
    backend runs the captured graph as is, so the compiled encoder can run on a CPU."""

    def __init__(self):
        super().__init__("torchair")
        self.modes, self.graphs = [], 0

    class CompilerConfig:
        mode = "max-autotune"

    def get_npu_backend(self, *, compiler_config):
        self.modes.append(compiler_config.mode)

        def backend(graph_module, example_inputs):
            self.graphs += 1
            return graph_module.forward
        return backend


def test_npu_small_buckets_replay_as_aclgraph_and_large_ones_run_eagerly(encoder, monkeypatch):
    torchair = FakeTorchAir()
    monkeypatch.setitem(sys.modules, "torchair", torchair)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    torch._dynamo.reset()
    npu = types.SimpleNamespace(type="npu")  # a device of that kind, as far as the bucketing cares
    bucketed = BucketedEncoder(encoder, (1, 2, GRAPH_MAX_TILES + 1), npu)
    pixels = tiles(GRAPH_MAX_TILES + 1)
    with torch.inference_mode():
        expected = encoder(pixels)
        for count in (1, 2):
            torch.testing.assert_close(bucketed(pixels[:count]), expected[:count], rtol=1e-5, atol=1e-5)
        graphs_after_small = torchair.graphs
        torch.testing.assert_close(bucketed(pixels), expected, rtol=1e-5, atol=1e-5)
    assert torchair.modes == ["reduce-overhead"]
    assert graphs_after_small >= 2 and torchair.graphs == graphs_after_small  # the large bucket ran eagerly
