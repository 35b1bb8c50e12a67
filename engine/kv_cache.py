"""The two KV pools: paged blocks for global layers, fixed rings for sliding-window layers; and the prefix cache
over both.

A global layer's cache grows with the context, so it is paged: `[num_blocks, block_size, kv_heads, head_dim]`
per layer, with blocks handed out from a free list. A sliding layer only ever needs the last `window` keys,
so each running sequence owns one ring slot `[ring_len, kv_heads, head_dim]` per layer where position p
lives at row p % ring_len; ring_len = window + the most tokens a sequence may roll back (speculative
drafts), so memory per sequence is constant whatever the prompt length or prefill chunk size.

Prefix cache (DESIGN). A full prompt block is named by a hash chained over every block before it
(`block_hashes`), so equal names mean equal prefixes. Global layers: a computed full prompt block is registered
under its name and outlives its request with a reference count; a later request with the same prefix takes the
block instead of computing it, and an unreferenced cached block stays in the free count and is evicted, least
recently used first, only when no never-cached block is left, so cached prefixes never refuse a request.

Sliding layers cannot be rebuilt from the global pages: the K/V a sliding layer holds for token t depends on
the hidden state at t, which attended over the previous sliding layer's window, whose entries attended over
the window before that, so the receptive field grows by a window per sliding layer (36 in K-EXAONE) and
recomputing the last `window` tokens before a hit would attend over rings missing everything earlier: not
exact. So the rings are restored from saved K/V: every full prompt block also gets a *snapshot*, the K/V of
its block_size positions in every ring layer (the MTP block's ring layer included), kept in a block-shaped
region behind the running rings in the same ring tensor, so the model's one ring write (`ring_mapping`) can
put a token straight into a snapshot without a kernel change. A hit of L tokens (L a block boundary, below the
prompt length so that the last prompt token is computed for its logits) needs the global blocks of [0, L) and
the snapshots covering the window before L, [L - window + 1, L), which are copied into the request's ring
before the step's forward. The MTP block's K/V at position p also depends on token p + 1, so with MTP a
snapshot's name includes the token after its block.

Cost of a hit of L tokens: no compute for [0, L); a copy of at most window - 1 positions x ring layers x K and
V into the ring (K-EXAONE: 127 x 37 x 2 rows of 2 KiB at tp 1, ~19 MB, microseconds on a GPU). Memory: a
snapshot block costs ring layers / global layers times a global block (K-EXAONE: 37/12, ~3x); the snapshot
region gets 1/8 of the budget left after the rings (more if the blocks need less) and is evicted LRU on its
own; hits keep the snapshots they use recent, so those before a reused prefix's end outlive the rest.
Saving costs nothing for the positions a chunk would not keep in its ring (written straight into the
snapshot) and one row copy per ring layer for the last window - 1 positions of a chunk (copied from the ring
at the start of the next step, before anything can overwrite them).
"""
from __future__ import annotations

import array
import hashlib
import mmap
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from exaserve.engine.config import ModelConfig

SNAPSHOT_SHARE = 8      # the snapshot region takes at most 1/SNAPSHOT_SHARE of the budget left after the rings


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


def block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """The name of each full block of `token_ids`: a SHA-256 chained over the previous block's name, so a block
    is named by its whole prefix (a cryptographic hash: no crafted prompt can collide with another's prefix)."""
    data, step = array.array("I", token_ids).tobytes(), 4 * block_size
    names, parent = [], b""
    for start in range(0, len(token_ids) // block_size * step, step):
        parent = hashlib.sha256(parent + data[start:start + step]).digest()
        names.append(parent)
    return names


def snapshot_key(block_hash: bytes, next_token: int | None) -> bytes:
    """A snapshot's name: its block's, and with MTP (next_token given) the token after the block."""
    return block_hash if next_token is None else block_hash + next_token.to_bytes(4, "little")


class PagedPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)
        self._free = deque(range(num_blocks))             # never cached, or dropped from the cache
        self._evictable: OrderedDict[int, None] = OrderedDict()   # cached, unreferenced; least recently used first
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}                 # block name -> block

    @property
    def num_free(self) -> int:
        """Blocks a request can get: free ones and unreferenced cached ones (evicted when taken)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        if self.k.shape[0] == 0:          # a model without global layers needs no blocks
            return 0
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self.cached[self._hash[block]]
                self._hash[block] = None
            self._ref[block] = 1
            out.append(block)
        return out

    def free(self, blocks: list[int]) -> None:
        # a request's last blocks first: they are the least shared, so the first evicted
        for block in reversed(blocks):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`."""
        out = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` are unreferenced (taking them lowers num_free)."""
        return sum(self._ref[b] == 0 for b in blocks)

    def acquire(self, blocks: list[int]) -> None:
        """One more reference to each of these cached blocks."""
        for block in blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1

    def register(self, block: int, h: bytes) -> None:
        """`block` now holds the computed prefix named `h` (kept as it is when another block holds it already)."""
        if h not in self.cached and self._hash[block] is None:
            self.cached[h] = block
            self._hash[block] = h

    def reset_cache(self) -> None:
        """Forget every cached prefix; blocks in use stay with their requests."""
        for block in self.cached.values():
            self._hash[block] = None
        self._free.extend(self._evictable)
        self._evictable.clear()
        self.cached.clear()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class RingPool:
    """`num_slots` rings of ring_len rows per layer, then (prefix caching) `num_snapshot_blocks` snapshot blocks of
    block_size rows, in one tensor per layer addressed by flat row: ring slot s, position p is row
    s * ring_len + p % ring_len; snapshot block j, offset o is row snapshot_base + j * block_size + o."""

    def __init__(self, num_layers: int, num_slots: int, ring_len: int, num_kv_heads: int, head_dim: int,
                 dtype, device, num_snapshot_blocks: int = 0, block_size: int = 16):
        self.num_slots, self.ring_len, self.block_size = num_slots, ring_len, block_size
        self.num_snapshot_blocks = num_snapshot_blocks
        extra = -(-num_snapshot_blocks * block_size // ring_len) if num_snapshot_blocks else 0
        shape = (num_layers, num_slots + extra, ring_len, num_kv_heads, head_dim)
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)
        self._free = deque(range(num_slots))
        self.snapshot_base = num_slots * ring_len
        self._snap_free = deque(range(num_snapshot_blocks))
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()    # name -> block, least recently used first

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

    def row(self, slot: int, position: int) -> int:
        return slot * self.ring_len + position % self.ring_len

    def snapshot_row(self, block: int, offset: int) -> int:
        return self.snapshot_base + block * self.block_size + offset

    # -- snapshots ------------------------------------------------------------------------------------------
    def allocate_snapshot(self) -> int | None:
        """A snapshot block to write, evicting the least recently used one if none is free; None if none can be
        (every block is being written)."""
        if self._snap_free:
            return self._snap_free.popleft()
        if self.snapshots:
            return self.snapshots.popitem(last=False)[1]
        return None

    def free_snapshot(self, block: int) -> None:
        self._snap_free.append(block)

    def commit_snapshot(self, key: bytes, block: int) -> None:
        """`block` holds the snapshot named `key` (freed again when another block holds it already)."""
        if key in self.snapshots:
            self.snapshots.move_to_end(key)
            self.free_snapshot(block)
        else:
            self.snapshots[key] = block

    def touch_snapshot(self, key: bytes) -> None:
        self.snapshots.move_to_end(key)

    def reset_cache(self) -> None:
        self._snap_free.extend(self.snapshots.values())
        self.snapshots.clear()

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Row src[i] -> row dst[i] in every layer, K and V (int64 flat rows, on the pool's device)."""
        if self.k.shape[0] == 0 or src.numel() == 0:
            return
        for pool in (self.k, self.v):
            flat = pool.view(pool.shape[0], -1, *pool.shape[-2:])
            flat[:, dst] = flat[:, src]

    @property
    def nbytes(self) -> int:
        """The running rings' bytes (snapshot_nbytes: the snapshot region's)."""
        return 2 * self.k.shape[0] * self.snapshot_base * self.k[0, 0, 0].numel() * self.k.element_size()

    @property
    def snapshot_nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size() - self.nbytes


@dataclass
class KVCache:
    paged: PagedPool
    ring: RingPool

    @classmethod
    def create(cls, cfg: ModelConfig, *, kv_cache_memory: int, max_num_seqs: int, max_model_len: int,
               block_size: int = 16, max_rollback: int = 0, extra_ring_layers: int = 0, dtype=torch.float32,
               device="cpu", num_kv_heads: int | None = None, prefix_caching: bool = False) -> "KVCache":
        """Size both pools from one byte budget: rings first (a fixed cost per seat), blocks from the rest,
        never more blocks than `max_num_seqs` full-length sequences could use. num_kv_heads: this rank's kv heads
        under tensor parallelism (default: all of them). prefix_caching: with sliding and global layers, the
        blocks get at most 1 - 1/SNAPSHOT_SHARE of the budget after the rings and ring snapshots (see above) what
        the blocks leave, never more snapshot blocks than blocks."""
        el = torch.empty((), dtype=dtype).element_size()
        num_kv_heads = num_kv_heads or cfg.num_kv_heads
        per_token_layer = 2 * num_kv_heads * cfg.head_dim * el
        n_ring_layers = len(cfg.sliding_layers) + extra_ring_layers
        ring_len = (cfg.sliding_window or 0) + max_rollback
        ring_bytes = n_ring_layers * max_num_seqs * ring_len * per_token_layer
        n_global = len(cfg.full_layers)
        num_blocks = num_snapshots = 0
        if n_global:
            block_bytes = n_global * block_size * per_token_layer
            useful = max_num_seqs * -(-max_model_len // block_size)
            rest = max(0, kv_cache_memory - ring_bytes)
            snapshots = prefix_caching and len(cfg.sliding_layers) > 0
            num_blocks = min(useful, (rest - (rest // SNAPSHOT_SHARE if snapshots else 0)) // block_bytes)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes leaves no room for KV blocks after "
                                 f"{ring_bytes} bytes of sliding-window rings for {max_num_seqs} sequences; "
                                 f"raise kv_cache_memory or lower max_num_seqs")
            if snapshots:
                # the ring tensor grows by whole slots: round the region down to what they hold
                slot_bytes = n_ring_layers * ring_len * per_token_layer
                left = (rest - num_blocks * block_bytes) // slot_bytes * slot_bytes
                num_snapshots = min(num_blocks, left // (n_ring_layers * block_size * per_token_layer))
        elif ring_bytes > kv_cache_memory:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes is below the {ring_bytes} bytes of rings "
                             f"needed for {max_num_seqs} sequences")
        paged = PagedPool(n_global, num_blocks, block_size, num_kv_heads, cfg.head_dim, dtype, device)
        ring = RingPool(n_ring_layers, max_num_seqs, ring_len, num_kv_heads, cfg.head_dim, dtype, device,
                        num_snapshots, block_size)
        return cls(paged, ring)
