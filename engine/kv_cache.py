"""The two KV pools: paged blocks for global layers, fixed rings for sliding-window layers.

A global layer's cache grows with the context, so it is paged: `[num_blocks, block_size, kv_heads, head_dim]`
per layer, with blocks handed out from a free list. A sliding layer only ever needs the last `window` keys,
so each running sequence owns one ring slot `[ring_len, kv_heads, head_dim]` per layer where position p
lives at row p % ring_len; ring_len = window + the most tokens a sequence may roll back (speculative
drafts), so memory per sequence is constant whatever the prompt length or prefill chunk size.
"""
from __future__ import annotations

import mmap
from collections import deque
from dataclasses import dataclass

import torch

from exaserve.engine.config import ModelConfig


def _zeros(shape, dtype, device) -> torch.Tensor:
    """A zeroed pool. On CPU it is an anonymous mapping: the OS hands out zero pages on first touch, so
    resident memory grows with the blocks actually used rather than the pool's size."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = 1
    for dim in shape:
        n *= dim
    if n == 0:
        return torch.zeros(shape, dtype=dtype)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class PagedPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        if self.k.shape[0] == 0:          # a model without global layers needs no blocks
            return 0
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class RingPool:
    def __init__(self, num_layers: int, num_slots: int, ring_len: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        self.num_slots, self.ring_len = num_slots, ring_len
        shape = (num_layers, num_slots, ring_len, num_kv_heads, head_dim)
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)
        self._free = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free ring slot")
        return self._free.popleft()

    def free(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class KVCache:
    paged: PagedPool
    ring: RingPool

    @classmethod
    def create(cls, cfg: ModelConfig, *, kv_cache_memory: int, max_num_seqs: int, max_model_len: int,
               block_size: int = 16, max_rollback: int = 0, extra_ring_layers: int = 0, dtype=torch.float32,
               device="cpu", num_kv_heads: int | None = None) -> "KVCache":
        """Size both pools from one byte budget: rings first (a fixed cost per seat), blocks from the rest,
        never more blocks than `max_num_seqs` full-length sequences could use. num_kv_heads: this rank's kv heads
        under tensor parallelism (default: all of them)."""
        el = torch.empty((), dtype=dtype).element_size()
        num_kv_heads = num_kv_heads or cfg.num_kv_heads
        per_token_layer = 2 * num_kv_heads * cfg.head_dim * el
        n_ring_layers = len(cfg.sliding_layers) + extra_ring_layers
        ring_len = (cfg.sliding_window or 0) + max_rollback
        ring_bytes = n_ring_layers * max_num_seqs * ring_len * per_token_layer
        n_global = len(cfg.full_layers)
        num_blocks = 0
        if n_global:
            block_bytes = n_global * block_size * per_token_layer
            useful = max_num_seqs * -(-max_model_len // block_size)
            num_blocks = min(useful, max(0, kv_cache_memory - ring_bytes) // block_bytes)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes leaves no room for KV blocks after "
                                 f"{ring_bytes} bytes of sliding-window rings for {max_num_seqs} sequences; "
                                 f"raise kv_cache_memory or lower max_num_seqs")
        elif ring_bytes > kv_cache_memory:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes is below the {ring_bytes} bytes of rings "
                             f"needed for {max_num_seqs} sequences")
        paged = PagedPool(n_global, num_blocks, block_size, num_kv_heads, cfg.head_dim, dtype, device)
        ring = RingPool(n_ring_layers, max_num_seqs, ring_len, num_kv_heads, cfg.head_dim, dtype, device)
        return cls(paged, ring)
