"""`--preprocess-on device`: decode on the pool, tile on the encoder's device; same tiles, same greedy tokens.
`--decode-on device`: JPEGs decoded by torchvision on the device (libjpeg-turbo on a CPU, bit-equal to Pillow).

The pixel tolerance against the host path is stated and tested in tests/kernels/test_kernels_preprocess.py;
here: the pool and the server give the device path's tiles, refusals are unchanged, and the tiny model's
greedy tokens are the same with either path's embeddings.
"""

import asyncio
import contextlib
import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY

from protos import vision_pb2, vision_pb2_grpc
from tests.vision_svc.vision_helpers import encode
from vision_svc.config import VisionConfig, parse_config
from vision_svc.device_preprocess import (DevicePreprocessPool, PreprocessStream, decode_jpeg_on_device,
                                          image_tiles_on_device)
from vision_svc.encoder import load_encoder
from vision_svc.image_decode import ImageError, ImageLimits, decode_image
from vision_svc.server import VisionServer
from vision_svc.tiling import TileOptions, image_to_tile_array

OPTIONS = TileOptions(max_tiles=6, use_thumbnail=True)
CPU = torch.device("cpu")
# Two 8-bit levels of the channel with the smallest std, the kernel's stated bound.
TWO_LEVELS = 2 / 255 / 0.224 + 1e-6


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG", **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def host_tiles(data: bytes, options: TileOptions = OPTIONS) -> torch.Tensor:
    return torch.from_numpy(image_to_tile_array(decode_image(data, ImageLimits()), options))


def test_tiles_come_in_the_asked_dtype_within_two_levels_of_the_host():
    image = noise_image(900, 500, seed=0)
    got = image_tiles_on_device(image, OPTIONS, CPU, torch.bfloat16)
    expected = torch.from_numpy(image_to_tile_array(image, OPTIONS))
    assert got.dtype == torch.bfloat16 and got.device == CPU and got.shape == expected.shape == (3, 3, 448, 448)
    fp32 = image_tiles_on_device(image, OPTIONS, CPU, torch.float32)
    assert (fp32 - expected).abs().max() <= TWO_LEVELS
    torch.testing.assert_close(got, fp32.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 1], ids=["thread", "process"])
async def test_pool_decodes_then_tiles_on_the_device(workers):
    images = [encoded(noise_image(w, h, seed), fmt) for seed, (w, h, fmt) in
              enumerate([(900, 500, "PNG"), (300, 800, "JPEG"), (448, 448, "WEBP")])]
    with DevicePreprocessPool(workers, ImageLimits(), CPU, torch.float32) as pool:
        await pool.warm_up()
        results = await asyncio.gather(*(pool.tiles(data, OPTIONS) for data in images))
    for data, got in zip(images, results):
        expected = image_tiles_on_device(decode_image(data, ImageLimits()), OPTIONS, CPU, torch.float32)
        assert torch.equal(got, expected)
        assert (got - host_tiles(data)).abs().max() <= TWO_LEVELS


@pytest.mark.parametrize("data,message", [(b"not an image", "not an image"),
                                          (encoded(noise_image(1200, 1000, 0)), "over the limit of 1000000")])
async def test_pool_refuses_what_the_host_path_refuses(data, message):
    with DevicePreprocessPool(0, ImageLimits(max_image_pixels=1_000_000), CPU, torch.float32) as pool:
        with pytest.raises(ImageError, match=message):
            await pool.tiles(data, OPTIONS)


class FakeStreams:
    """A device module's stream API (`torch.cuda`'s names), recording what is asked of it, in order."""

    def __init__(self):
        self.calls, self.current = [], "encoder's stream"

    def Stream(self, device):  # noqa: N802 - torch's name
        return FakeStream(self)

    def current_stream(self, device):
        return self.current

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        self.calls.append("enter")
        try:
            yield
        finally:
            self.calls.append("exit")
            self.current = previous


class FakeStream:
    def __init__(self, streams: FakeStreams):
        self.streams = streams

    def synchronize(self):
        self.streams.calls.append("synchronize")


class FakeTiles:
    def __init__(self):
        self.recorded_on = []

    def record_stream(self, stream):
        self.recorded_on.append(stream)


def test_preprocessing_runs_on_its_own_stream_and_hands_over_finished_tiles():
    streams = FakeStreams()
    preprocess = PreprocessStream(torch.device("cuda"), module=streams)
    tiles = FakeTiles()

    def make_tiles():
        streams.calls.append("work on its own stream" if isinstance(streams.current, FakeStream) else "work elsewhere")
        return tiles

    assert preprocess.run(make_tiles) is tiles
    assert streams.calls == ["enter", "work on its own stream", "synchronize", "exit"]
    assert tiles.recorded_on == ["encoder's stream"]  # reuse of its memory waits for the encoder's reads
    assert preprocess.run(lambda: None) is None  # a refused device decode: nothing to hand over


def test_on_a_cpu_preprocessing_runs_as_called():
    assert PreprocessStream(CPU).run(lambda x: x + 1, 1) == 2


JPEGS = {
    "4:2:0": encoded(noise_image(900, 500, 10), "JPEG", quality=75, subsampling=2),
    "4:4:4 q95": encoded(noise_image(333, 517, 11), "JPEG", quality=95, subsampling=0),
    "progressive": encoded(noise_image(640, 360, 12), "JPEG", progressive=True),
    "greyscale": encoded(noise_image(500, 400, 13).convert("L"), "JPEG"),
}
TRUNCATED_JPEG = JPEGS["4:4:4 q95"][:len(JPEGS["4:4:4 q95"]) // 2]


@pytest.mark.parametrize("name", JPEGS)
def test_device_jpeg_decode_equals_pillows(name):
    data = JPEGS[name]
    pixels = decode_jpeg_on_device(data, ImageLimits(), CPU)
    expected = torch.from_numpy(np.array(decode_image(data, ImageLimits()))).permute(2, 0, 1)
    assert pixels is not None and pixels.dtype == torch.uint8
    assert torch.equal(pixels, expected)


@pytest.mark.parametrize("data", [encoded(noise_image(64, 48, 0)),  # PNG
                                  encoded(noise_image(64, 48, 0).convert("CMYK"), "JPEG"),
                                  TRUNCATED_JPEG],  # the host's decoder names what is wrong
                         ids=["png", "cmyk-jpeg", "truncated-jpeg"])
def test_device_decode_leaves_other_images_to_the_host(data):
    assert decode_jpeg_on_device(data, ImageLimits(), CPU) is None


@pytest.mark.parametrize("data,message", [(b"not an image", "not an image"),
                                          (JPEGS["4:2:0"], "over the limit of 400000 pixels"),
                                          (TRUNCATED_JPEG, "truncated")])
async def test_device_decode_refuses_as_the_host_does_before_decoding(data, message):
    # 900x500 = 450000 pixels: refused from the header, before any decoder runs
    with DevicePreprocessPool(0, ImageLimits(max_image_pixels=400_000), CPU, torch.float32,
                              decode_on_device=True) as pool:
        with pytest.raises(ImageError, match=message):
            await pool.tiles(data, OPTIONS)


async def test_pool_with_device_decode_gives_the_tiles_of_device_preprocessing():
    images = [*JPEGS.values(), encoded(noise_image(700, 300, 14)),
              encoded(noise_image(300, 200, 15).convert("CMYK"), "JPEG")]
    before = {on: decoded_count(on) for on in ("device", "host")}
    with DevicePreprocessPool(1, ImageLimits(), CPU, torch.float32, decode_on_device=True) as pool:
        results = await asyncio.gather(*(pool.tiles(data, OPTIONS) for data in images))
    for data, got in zip(images, results):
        assert torch.equal(got, image_tiles_on_device(decode_image(data, ImageLimits()), OPTIONS, CPU, torch.float32))
    # the four JPEGs on the device; the PNG and the CMYK JPEG on the host
    assert {on: decoded_count(on) - before[on] for on in before} == {"device": 4, "host": 2}


def decoded_count(on: str) -> float:
    return REGISTRY.get_sample_value("vision_images_decoded_total", {"on": on}) or 0.0


def test_cli_flags_choose_where_preprocessing_runs_and_compilation():
    config = parse_config(["--model", "m", "--preprocess-on", "device", "--compile"])
    assert (config.preprocess_on, config.compile) == ("device", True)
    defaults = parse_config(["--model", "m"])
    assert (defaults.preprocess_on, defaults.compile) == ("host", False)
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--preprocess-on", "gpu"])
    assert parse_config(["--model", "m", "--preprocess-on", "device", "--decode-on", "device"]).decode_on == "device"
    assert defaults.decode_on == "host"


@pytest.mark.parametrize("argv,message", [
    (["--decode-on", "device"], "needs --preprocess-on device"),
    (["--decode-on", "device", "--preprocess-on", "device", "--device", "npu:0"], "not on npu:0"),
])
def test_cli_refuses_device_decode_where_it_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", *argv])
    assert message in capsys.readouterr().err


async def test_server_with_device_preprocessing_and_decode_streams_the_device_paths_embeddings(tiny_checkpoint):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    config = VisionConfig(model=model, host="127.0.0.1", port=0, preprocess_workers=0, preprocess_on="device",
                          decode_on="device", max_batch_tiles=8, batch_wait_ms=20, max_tiles=6, grace_s=0)
    server = VisionServer(config)
    assert isinstance(server.pool, DevicePreprocessPool) and server.pool.decode_on_device
    port = await server.start()
    data = encoded(noise_image(900, 500, seed=3), "JPEG")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            (header, got), = (await encode(vision_pb2_grpc.VisionEncoderStub(channel),
                                           [vision_pb2.ImageInput(data=data)])).values()
    finally:
        await server.stop()
    encoder, spec = load_encoder(model, CPU, torch.float32)
    with torch.inference_mode():
        expected = encoder(image_tiles_on_device(decode_image(data, ImageLimits()), OPTIONS, CPU, torch.float32))
    assert header.num_tiles == 3
    torch.testing.assert_close(got, expected.reshape(-1, spec.llm_hidden), rtol=1e-5, atol=1e-5)


def test_tiny_models_greedy_tokens_are_the_same_with_either_paths_embeddings(tiny_checkpoint, vllm_engine):
    from vllm import SamplingParams

    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    encoder, spec = load_encoder(model, CPU, torch.float32)
    image = noise_image(900, 500, seed=7)  # a 2x1 grid + thumbnail: both passes resize it
    options = TileOptions(max_tiles=12, use_thumbnail=True)
    host = torch.from_numpy(image_to_tile_array(image, options))
    device = image_tiles_on_device(image, options, CPU, torch.float32)
    assert not torch.equal(host, device), "the paths agree bit for bit: the check below would be blind"
    other = torch.from_numpy(image_to_tile_array(noise_image(900, 500, seed=8), options))
    with torch.inference_mode():
        embeddings = [encoder(t).reshape(-1, spec.llm_hidden) for t in (host, device, other)]

    engine = vllm_engine("original", "dense")
    prompt = engine.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is in the image?"}], tokenize=False, add_generation_prompt=True)
    outputs = engine.generate([{"prompt": prompt, "multi_modal_data": {"image": [e]}} for e in embeddings],
                              SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    host_tokens, device_tokens, other_tokens = (list(o.outputs[0].token_ids) for o in outputs)
    assert device_tokens == host_tokens and len(host_tokens) == 12
    assert other_tokens != host_tokens, "another image gives the same tokens: the check above would be blind"
