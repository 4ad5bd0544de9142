"""`ClientWatch`: a client's disconnect cancels what its request awaits under the watch, and nothing else."""

import asyncio

import pytest

from gateway.client_watch import ClientWatch
from protos.errors import Cancelled


class Client:
    """An ASGI `receive` channel whose client disconnects when told to."""

    def __init__(self):
        self.left = asyncio.Event()
        self.reads = 0

    async def receive(self) -> dict:
        self.reads += 1
        await self.left.wait()
        return {"type": "http.disconnect"}


async def test_a_disconnect_cancels_the_awaited_work_as_cancelled():
    client, work_cancelled = Client(), asyncio.Event()
    watch = ClientWatch(client.receive)

    async def work():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            work_cancelled.set()
            raise

    async def serve():
        with watch.guarded():
            await work()

    served = asyncio.create_task(serve())
    await asyncio.sleep(0.01)
    client.left.set()
    with pytest.raises(Cancelled, match="client disconnected"):
        await served
    assert work_cancelled.is_set() and asyncio.current_task().cancelling() == 0
    watch.close()


async def test_a_disconnect_between_guarded_steps_stops_the_next_one_and_only_it():
    client = Client()
    watch = ClientWatch(client.receive)
    with watch.guarded():
        await asyncio.sleep(0)
    client.left.set()
    await asyncio.sleep(0.01)  # the client leaves while nothing is guarded: nothing is cancelled then
    assert watch.gone
    with pytest.raises(Cancelled):
        with watch.guarded():
            pytest.fail("a step guarded after the client left must not run")
    watch.close()


async def test_work_that_ends_first_is_untouched_and_close_stops_the_watcher():
    client = Client()
    watch = ClientWatch(client.receive)
    assert client.reads == 0  # no watching before the first guarded step: the body is read from `receive`
    with watch.guarded():
        await asyncio.sleep(0.01)
    assert client.reads == 1
    watch.close()
    await asyncio.sleep(0)
    client.left.set()
    await asyncio.sleep(0.01)
    assert not watch.gone


async def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    client = Client()
    watch = ClientWatch(client.receive)

    async def serve():
        with watch.guarded():
            await asyncio.sleep(60)

    served = asyncio.create_task(serve())
    await asyncio.sleep(0.01)
    client.left.set()
    await asyncio.sleep(0)  # the watcher's turn: it cancels `serve` for the client
    served.cancel()  # and a server shutting down, say, too
    with pytest.raises(asyncio.CancelledError):
        await served
    watch.close()
