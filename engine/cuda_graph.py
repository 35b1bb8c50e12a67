"""CUDA graphs for decode steps: a decode step's few hundred kernel launches replayed as one.

Without graphs the host issues every launch of a decode step one by one (~10 torch ops and Triton launches per
layer, a few microseconds of host time each), so at small batches the GPU waits on Python. At start-up the
model's forward is captured once per size of a ladder of batch sizes (1, 2, 4, 8, 16, 24, ... up to the largest
batch), all reading one set of static input buffers and sharing one memory pool. A decode-only step (every
sequence one new token) of b sequences replays the smallest captured size B >= b: its inputs are copied into
the first b rows of the static buffers, and the B - b padding rows are made inert: slot -1 in both KV
mappings (they write nowhere) and a context of 0 (the attention kernels read no key for them; a ring layer
reads only the padding token's own fresh key). Block tables have a fixed width (enough for max_model_len), so
every captured kernel sees the same shapes whatever the batch's contexts. Prefill chunks, mixed batches and
batches above the ladder run eagerly.

Only the triton kernels are graph-safe (no host syncs, grids from host-side bounds); graphs are for one rank
(tensor_parallel_size 1). Capture needs CUDA; the padding, ladder and buffer logic is plain torch and is tested
on the CPU (tests/test_cuda_graph.py) with an eager stand-in for the graph.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from exaserve.engine.model import AttnMetadata

log = logging.getLogger("exaserve.engine")


def ladder(max_batch_size: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, then every multiple of 8, up to and including max_batch_size."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [s for s in (1, 2, 4) if s < max_batch_size] + list(range(8, max_batch_size, 8))
    return sizes + [max_batch_size]


class StaticInputs:
    """The decode inputs every graph reads, sized for the largest batch: the first B rows are batch size B's
    view. Rows past the real batch are padding (see load)."""

    def __init__(self, max_batch_size: int, table_width: int, device):
        self.max_batch_size, self.table_width = max_batch_size, table_width
        n = max_batch_size

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids, self.positions, self.ring_slots = zeros(n), zeros(n), zeros(n)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.ring_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        # decode-only: sequence s is token s, so the query starts never change
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.context_lens = zeros(n, dtype=torch.int32)
        self.seq_lens = zeros(n, dtype=torch.int32)
        self.block_tables = zeros(n, table_width, dtype=torch.int32)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def views(self, size: int):
        """(input_ids, positions, AttnMetadata) of batch size `size`: views of the buffers, fixed addresses."""
        meta = AttnMetadata(query_start_loc=self.query_start_loc[:size + 1], context_lens=self.context_lens[:size],
                            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
                            slot_mapping=self.slot_mapping[:size], ring_slots=self.ring_slots[:size],
                            ring_mapping=self.ring_mapping[:size])
        return self.input_ids[:size], self.positions[:size], meta

    def load(self, input_ids, positions, meta: AttnMetadata, size: int) -> None:
        """Copy a decode batch of b rows in, and make rows b..size-1 padding: no KV writes (slot -1), no keys
        read (context 0). Ids, positions, ring slots and tables of padding rows keep whatever valid values they
        hold (from earlier steps or the start): nothing reads them, or only the padding row's own data."""
        b = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.ring_slots[:b].copy_(meta.ring_slots)
        self.ring_mapping[:b].copy_(meta.ring_mapping)
        self.context_lens[:b].copy_(meta.context_lens)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, :width].copy_(meta.block_tables)
        if size > b:
            self.slot_mapping[b:size].fill_(-1)
            self.ring_mapping[b:size].fill_(-1)
            self.context_lens[b:size].zero_()
            self.seq_lens[b:size].zero_()


@dataclass
class Captured:
    """One captured batch size: replay() recomputes `output` from the static inputs."""
    replay: Callable[[], None]
    output: torch.Tensor


Forward = Callable[..., torch.Tensor]     # (input_ids, positions, meta, kv, before_forward) -> hidden [T, H]


class DecodeGraphs:
    """The decode graphs of one model: `forward` has the model forward's signature and replays a graph for a
    decode-only batch that fits the ladder, else runs the eager forward."""

    def __init__(self, eager: Forward, kv, max_batch_size: int, table_width: int, device):
        self.eager, self.kv = eager, kv
        self.sizes = ladder(max_batch_size)
        self.static = StaticInputs(max_batch_size, table_width, device)
        self.graphs: dict[int, Captured] = {}
        self.replays = 0

    def size_for(self, batch: int) -> int | None:
        """The smallest captured size >= batch, None above the ladder."""
        for size in self.sizes:
            if size >= batch:
                return size
        return None

    def capture(self, capture_one: Callable[[int], Captured] | None = None) -> None:
        """Capture every size, largest first (smaller graphs reuse its pool memory). capture_one(size) is the
        CUDA capture by default; tests pass an eager stand-in."""
        capture_one = capture_one or self._cuda_capture
        t0 = time.monotonic()
        for size in sorted(self.sizes, reverse=True):
            self.graphs[size] = capture_one(size)
        log.info("CUDA graphs: %d decode batch sizes up to %d captured in %.1f s (static inputs %.1f MiB)",
                 len(self.sizes), self.sizes[-1], time.monotonic() - t0, self.static.nbytes() / (1 << 20))

    def _cuda_capture(self, size: int) -> Captured:
        try:
            if not hasattr(self, "_pool"):
                self._pool = torch.cuda.graph_pool_handle()
            args = (*self.static.views(size), self.kv)
            # the static inputs are all padding here (slots -1, contexts 0): warm-up and capture write no KV
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.eager(*args)                     # compiles the kernels, settles the allocator
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = self.eager(*args)
        except (RuntimeError, AssertionError) as e:
            raise RuntimeError(f"CUDA graph capture of the decode step at batch size {size} failed ({e}); graphs "
                               f"need CUDA and the triton kernels (no host syncs): use those, or --enforce-eager"
                               ) from e
        return Captured(graph.replay, output)

    def replayable(self, input_ids, meta: AttnMetadata) -> int | None:
        """The captured size to replay this batch with, or None to run it eagerly: decode-only (one token per
        sequence), within the ladder, tables within the fixed width."""
        b = input_ids.shape[0]
        if b == 0 or meta.seq_lens.shape[0] != b or meta.block_tables.shape[1] > self.static.table_width:
            return None
        return self.size_for(b)

    def forward(self, input_ids, positions, meta: AttnMetadata, kv, before_forward=None) -> torch.Tensor:
        size = self.replayable(input_ids, meta) if kv is self.kv else None
        if size is None or size not in self.graphs:
            return self.eager(input_ids, positions, meta, kv, before_forward)
        self.static.load(input_ids, positions, meta, size)
        if before_forward is not None:
            before_forward()
        graph = self.graphs[size]
        graph.replay()
        self.replays += 1
        return graph.output[:input_ids.shape[0]]
