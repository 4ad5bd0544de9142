"""`--compile`: the encoder under torch.compile, its batches padded up to a few sizes so that only those compile.

A compiled graph is specialized to its input shape, and the runner's batches take every size from 1 to
--max-batch-tiles: compiling each would cost minutes at the first request of each size. Padding a batch with
blank tiles up to the next bucket bounds the graphs to one per bucket, all compiled at start by the server's
warm-up (`buckets` tells it which sizes to run). Tiles never attend across each other, so padding changes
no real tile's output; the padded rows are sliced off.

Small buckets run as device graphs, captured once and replayed: there a forward pass is short and kernel
launches are a large share of it. On CUDA that is inductor's CUDA graphs (mode="reduce-overhead"); on Ascend,
TorchAir's aclgraph (its npu backend in mode "reduce-overhead"). Large buckets are compute-bound, and a graph
per large shape would hold its activation memory for good: on CUDA (and CPU) they compile without graphs;
on Ascend they run eagerly (inductor does not target NPUs, and TorchAir's other mode needs every operator
registered in its graph IR).
"""

import importlib

from collections.abc import Callable

import torch
from torch import nn

# 13 = 12 tiles + thumbnail: one full image at InternVL's default max_dynamic_patch, the commonest batch.
_BASE_BUCKETS = (1, 2, 4, 8, 13, 16, 32)
# Largest bucket that runs as a device graph.
GRAPH_MAX_TILES = 16
GRAPH_DEVICES = ("cuda", "npu")


def batch_buckets(max_batch_tiles: int) -> tuple[int, ...]:
    """Padded batch sizes: 1, 2, 4, 8, 13, 16, 32, 64, ... below max_batch_tiles, then max_batch_tiles itself."""
    if max_batch_tiles < 1:
        raise ValueError(f"max_batch_tiles must be positive, got {max_batch_tiles}")
    sizes, doubling = list(_BASE_BUCKETS), _BASE_BUCKETS[-1]
    while doubling < max_batch_tiles:
        doubling *= 2
        sizes.append(doubling)
    return tuple(size for size in sizes if size < max_batch_tiles) + (max_batch_tiles,)


class BucketedEncoder:
    """`[n, 3, S, S] -> [n, tokens, hidden]`, as the encoder, each batch run padded up to its bucket.

    `compile=False` keeps the padding with the eager encoder (the same shapes, none compiled): the padding
    and slicing can then be checked without paying for compilation.
    """

    def __init__(self, encoder: nn.Module, buckets: tuple[int, ...], device: torch.device, compile: bool = True):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive sizes, got {buckets}")
        self.buckets = buckets
        self._device_type = device.type
        self._use_graphs = compile and device.type in GRAPH_DEVICES
        if compile:
            # Each bucket is one more compiled shape of the same forward; dynamo's default limit (8) would
            # silently run the buckets past it in eager mode.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(buckets) + 1)
            self._large = encoder if device.type == "npu" else torch.compile(encoder, dynamic=False)
            self._small = _compile_for_graphs(encoder, device.type) if self._use_graphs else self._large
        else:
            self._large = self._small = encoder

    def bucket(self, tiles: int) -> int:
        """The smallest bucket holding `tiles`; batches over the largest are split by `__call__`."""
        return next((size for size in self.buckets if size >= tiles), self.buckets[-1])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        largest = self.buckets[-1]
        if len(pixels) > largest:
            return torch.cat([self(part) for part in pixels.split(largest)])
        tiles, size = len(pixels), self.bucket(len(pixels))
        # Always a fresh buffer, full batches too: the compiled graph is guarded on its input's properties
        # (inference tensor or not, view or not), and any difference from the warm-up would recompile.
        batch = pixels.new_zeros((size, *pixels.shape[1:]))  # [size, 3, S, S], blank past `tiles`
        batch[:tiles] = pixels
        return self._forward(size)(batch)[:tiles]  # [tiles, tokens, hidden]

    def _forward(self, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._use_graphs and size <= GRAPH_MAX_TILES:
            return self._graph_forward
        return self._large

    def _graph_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # A graph's output lives in memory that its next replay overwrites: copy it out. On CUDA, also tell
        # inductor's graph trees that a new step begins (there is no backward pass to mark it).
        if self._device_type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self._small(pixels).clone()


def _compile_for_graphs(encoder: nn.Module, device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if device_type == "cuda":
        return torch.compile(encoder, dynamic=False, mode="reduce-overhead")
    importlib.import_module("torch_npu")  # TorchAir needs torch_npu imported first
    torchair = importlib.import_module("torchair")
    config = torchair.CompilerConfig()
    config.mode = "reduce-overhead"  # aclgraph: capture once, replay without host-side launches
    return torch.compile(encoder, dynamic=False, backend=torchair.get_npu_backend(compiler_config=config))
