"""EncoderRunner's batching: a lone image runs at once; a batch waits only for images on their way."""

import asyncio

import torch

from vision_svc.encoder_runner import EncoderRunner


class RecordingEncoder:
    """[tiles, 3, H, W] -> [tiles, 1, 2]; records each pass's size and pixels."""

    def __init__(self):
        self.passes: list[int] = []
        self.pixels: list[torch.Tensor] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.passes.append(len(pixels))
        self.pixels.append(pixels)
        return pixels.mean(dim=(1, 2, 3)).reshape(-1, 1, 1).expand(-1, 1, 2).clone()


def runner(encoder: RecordingEncoder, batch_wait_s: float) -> EncoderRunner:
    return EncoderRunner(encoder, torch.device("cpu"), torch.float32, max_batch_tiles=8, batch_wait_s=batch_wait_s,
                         max_queue_tiles=64)


async def test_a_lone_image_does_not_wait_for_a_batch_that_nobody_fills():
    encoder = RecordingEncoder()
    work = runner(encoder, batch_wait_s=600)
    try:
        # With the full wait it would take ten minutes; the bound only catches that.
        out = await asyncio.wait_for(work.encode(torch.ones(2, 3, 4, 4)), 30)
    finally:
        work.stop()
    assert out.shape == (2, 2) and encoder.passes == [2]


async def test_a_batch_waits_for_an_image_being_prepared_and_takes_it():
    encoder = RecordingEncoder()
    work = runner(encoder, batch_wait_s=600)
    try:
        with work.expecting() as expected:
            first = asyncio.ensure_future(work.encode(torch.ones(2, 3, 4, 4)))
            await asyncio.sleep(0.2)
            assert not first.done() and encoder.passes == []
            second = await asyncio.wait_for(work.encode(torch.zeros(3, 3, 4, 4), expected), 30)
        await asyncio.wait_for(first, 30)
    finally:
        work.stop()
    assert second.shape == (3, 2) and encoder.passes == [5]


async def test_an_image_that_never_comes_stops_holding_the_batch_when_its_preparation_ends():
    encoder = RecordingEncoder()
    work = runner(encoder, batch_wait_s=600)
    try:
        with work.expecting():  # its preparation fails: no encode
            first = asyncio.ensure_future(work.encode(torch.ones(2, 3, 4, 4)))
            await asyncio.sleep(0.2)
            assert not first.done()
        await asyncio.wait_for(first, 30)
    finally:
        work.stop()
    assert encoder.passes == [2]


async def in_one_batch(work: EncoderRunner, first: torch.Tensor, second: torch.Tensor) -> None:
    """Encodes both in one pass: the first waits for the second, announced before it."""
    with work.expecting() as expected:
        batched = asyncio.ensure_future(work.encode(first))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(work.encode(second, expected), 30)
    await asyncio.wait_for(batched, 30)


async def test_one_image_goes_to_the_encoder_uncopied_and_a_batch_in_the_encoders_dtype():
    encoder = RecordingEncoder()
    lone = torch.rand(2, 3, 4, 4)
    first, second = torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4)
    for dtype in (torch.float32, torch.bfloat16):
        work = EncoderRunner(encoder, torch.device("cpu"), dtype, max_batch_tiles=8, batch_wait_s=600,
                             max_queue_tiles=64)
        try:
            await asyncio.wait_for(work.encode(lone), 30)
            await in_one_batch(work, first, second)
        finally:
            work.stop()
    assert encoder.passes == [2, 5, 2, 5]
    assert encoder.pixels[0].data_ptr() == lone.data_ptr()  # float32 on the CPU already: no copy
    assert torch.equal(encoder.pixels[1], torch.cat([first, second]))
    assert torch.equal(encoder.pixels[2], lone.to(torch.bfloat16))
    assert torch.equal(encoder.pixels[3], torch.cat([first, second]).to(torch.bfloat16))
