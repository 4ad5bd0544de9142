"""An LRU cache of image embeddings, bounded in bytes, keyed by image content and preprocessing options.

Multi-turn chats resend every earlier image; with this cache those images cost one hash lookup. Images
being encoded right now are shared too, so two concurrent requests for one image run the encoder once.
"""

import asyncio
import collections
import dataclasses
import hashlib

import torch


@dataclasses.dataclass(frozen=True)
class CacheKey:
    content_hash: str
    max_tiles: int
    use_thumbnail: bool


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._entries: collections.OrderedDict[CacheKey, torch.Tensor] = collections.OrderedDict()
        self._in_flight: dict[CacheKey, asyncio.Future] = {}

    def get(self, key: CacheKey) -> torch.Tensor | None:
        embeddings = self._entries.get(key)
        if embeddings is not None:
            self._entries.move_to_end(key)
        return embeddings

    def put(self, key: CacheKey, embeddings: torch.Tensor) -> None:
        size = embeddings.numel() * embeddings.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = embeddings
        self.bytes_used += size
        while self.bytes_used > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes_used -= evicted.numel() * evicted.element_size()

    def in_flight(self, key: CacheKey) -> asyncio.Future | None:
        return self._in_flight.get(key)

    def track(self, key: CacheKey, future: asyncio.Future) -> None:
        """Lets concurrent requests for `key` await `future` instead of encoding the image again."""
        self._in_flight[key] = future
        future.add_done_callback(lambda done: self._forget(key, done))

    def _forget(self, key: CacheKey, done: asyncio.Future) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled():
            done.exception()  # its waiters re-raise a failure; nobody else should report it as unretrieved

    def __len__(self) -> int:
        return len(self._entries)
