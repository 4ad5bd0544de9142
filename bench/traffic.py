"""Mixed chat traffic for the fault and soak benches, and what became of each request.

A fixed number of clients send chat completions to the gateway in a closed loop (each sends its next request
when its previous one ended) until told to stop: text and image requests (a new image, or one of a few that
come again), streamed and not, in a fixed rotation. Every request gets an outcome: completed; failed cleanly
(an HTTP error with an OpenAI error body, or an SSE `error` event followed by `data: [DONE]`); failed
uncleanly (a stream cut short, a broken connection, an answer that does not parse); or hung (still open past
its deadline plus a margin: the client gives up on it and says so). The traffic runs on an event loop of its
own thread, so that the bench's main thread can kill and restart stages meanwhile.
"""

import asyncio
import dataclasses
import json
import random
import threading
import time

import httpx

from bench.common import jpeg_data_url, percentile, photo_like_jpeg

COMPLETED = "completed"
HUNG = "hung"
STREAM_CUT = "stream cut short"
CONNECTION_ERROR = "connection error"
MALFORMED = "malformed answer"
# Starts the message of an error that came without one of its own (a bare 502 page, an error event without text).
NO_MESSAGE = "(no error message)"
# Two sizes, so that engine steps batch embeddings of different lengths: 1 tile (256 image tokens), and 2 tiles +
# thumbnail (768).
IMAGE_SIZES = ((448, 448), (896, 448))
WORDS = ("river", "stone", "lantern", "orbit", "meadow", "copper", "signal", "harbor", "violet", "engine",
         "winter", "mosaic", "thunder", "quartz", "pepper", "canyon")


@dataclasses.dataclass(frozen=True)
class Outcome:
    seq: int
    request_id: str
    workload: str
    stream: bool
    started: float  # seconds since the traffic started
    ended: float
    result: str  # COMPLETED, "HTTP 503", "SSE error 503", STREAM_CUT, CONNECTION_ERROR, MALFORMED or HUNG
    message: str = ""  # the error's message, as the client saw it

    @property
    def ok(self) -> bool:
        return self.result == COMPLETED

    @property
    def clean(self) -> bool:
        """Completed, or failed with an error a client can read: a status or an error event, with a message."""
        return self.ok or (self.result.startswith(("HTTP ", "SSE error")) and bool(self.message)
                           and not self.message.startswith(NO_MESSAGE))

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class RequestMix:
    """Request bodies in a fixed rotation: (text, new image, repeated image) x (streamed, not)."""

    WORKLOADS = ("text", "image, new", "image, repeated")

    def __init__(self, model: str, max_tokens: int, repeated_images: int = 4, seed: int = 0):
        self.model, self.max_tokens, self.seed = model, max_tokens, seed
        self._repeated = [photo_like_jpeg(*IMAGE_SIZES[n % 2], seed=seed * 1000 + n) for n in range(repeated_images)]

    def workload(self, seq: int) -> tuple[str, bool]:
        return self.WORKLOADS[seq % 3], seq % 6 >= 3

    def body(self, seq: int) -> dict:
        """The body of request `seq`; a new image is made here (tens of ms: call it off the event loop)."""
        workload, stream = self.workload(seq)
        rng = random.Random(self.seed * 1_000_003 + seq)
        text = f"Request {seq}: " + " ".join(rng.choice(WORDS) for _ in range(24))
        content: str | list = text
        if workload != "text":
            size = IMAGE_SIZES[seq // 3 % 2]
            image = (photo_like_jpeg(*size, seed=self.seed * 1_000_003 + seq) if workload == "image, new"
                     else self._repeated[seq % len(self._repeated)])
            content = [{"type": "image_url", "image_url": {"url": jpeg_data_url(image)}},
                       {"type": "text", "text": text}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


def _error_message(payload) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error.get("message") or "") if isinstance(error, dict) else ""


async def _http_failure(response: httpx.Response) -> tuple[str, str]:
    body = await response.aread()
    try:
        message = _error_message(json.loads(body))
    except ValueError:
        message = ""
    return f"HTTP {response.status_code}", message or f"{NO_MESSAGE} {body[:200]!r}"


async def send_chat(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[str, str]:
    """(result, message) of one request."""
    if not body["stream"]:
        response = await client.post(url, json=body, headers=headers)
        if response.status_code != 200:
            return await _http_failure(response)
        try:
            finish = response.json()["choices"][0]["finish_reason"]
        except (ValueError, KeyError, IndexError, TypeError):
            return MALFORMED, response.text[:200]
        return (COMPLETED, "") if finish else (MALFORMED, "no finish_reason")
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            return await _http_failure(response)
        error, finished, done = None, False, False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    error = event["error"]
                finished |= any(c.get("finish_reason") for c in event.get("choices") or ())
    if error is not None:
        return f"SSE error {error.get('code')}", _error_message({"error": error}) or f"{NO_MESSAGE} {error}"
    if not done:
        return STREAM_CUT, "the stream ended without data: [DONE]"
    return (COMPLETED, "") if finished else (MALFORMED, "the stream had no finish_reason")


class Traffic:
    """`concurrency` clients in a closed loop against the gateway at `base_url`, on a thread of its own.

    Times are seconds since `start()`, from `now()`, so that the bench can mark its own events on the same clock.
    A request open `hang_after_s` after it was sent is recorded as HUNG and abandoned.
    """

    def __init__(self, base_url: str, mix: RequestMix, concurrency: int, hang_after_s: float, id_prefix: str):
        self.url = base_url + "/v1/chat/completions"
        self.mix, self.concurrency, self.hang_after_s, self.id_prefix = mix, concurrency, hang_after_s, id_prefix
        self.outcomes: list[Outcome] = []
        self.open: dict[int, float] = {}  # seq -> when it was sent, for requests in flight
        self._stop = threading.Event()
        self._next_seq = 0
        self._t0 = 0.0
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # an error of the traffic thread itself

    def now(self) -> float:
        return time.monotonic() - self._t0

    def start(self) -> "Traffic":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """No new requests; with `wait`, waits for those in flight (each ends by its hang limit at the latest)."""
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join(self.hang_after_s + 30)
            if self._thread.is_alive():
                raise RuntimeError("the traffic thread did not end: its event loop is stuck")
        if wait and self.failure is not None:
            raise RuntimeError("the traffic thread failed") from self.failure

    def request_id(self, seq: int) -> str:
        return f"{self.id_prefix}-{seq:06d}"

    def _run(self) -> None:
        try:
            asyncio.run(self._clients())
        except BaseException as error:  # reported by stop()
            self.failure = error

    async def _clients(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        # No timeout of httpx's own: the hang limit below is the one that counts, and names the request.
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            await asyncio.gather(*(self._client_loop(client) for _ in range(self.concurrency)))

    async def _client_loop(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            seq = self._next_seq
            self._next_seq += 1
            body = await asyncio.to_thread(self.mix.body, seq)
            await self._one(client, seq, body)

    async def _one(self, client: httpx.AsyncClient, seq: int, body: dict) -> None:
        workload, stream = self.mix.workload(seq)
        request_id = self.request_id(seq)
        started = self.now()
        self.open[seq] = started
        try:
            result, message = await asyncio.wait_for(send_chat(client, self.url, body, {"x-request-id": request_id}),
                                                     self.hang_after_s)
        except asyncio.TimeoutError:
            result, message = HUNG, f"still open {self.hang_after_s:.0f} s after it was sent"
        except httpx.TransportError as error:
            result, message = CONNECTION_ERROR, f"{type(error).__name__}: {error}"
        except ValueError as error:  # an SSE event that is not JSON
            result, message = MALFORMED, str(error)[:200]
        del self.open[seq]
        self.outcomes.append(Outcome(seq, request_id, workload, stream, started, self.now(), result, message))


def latency_summary(outcomes: list[Outcome]) -> tuple[float, float]:
    """Median and longest seconds from send to end, over `outcomes`."""
    seconds = [o.seconds for o in outcomes]
    return percentile(seconds, 50), max(seconds, default=float("nan"))
