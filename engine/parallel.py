"""Tensor and expert parallelism: where this process sits and the collectives the model calls.

The model (engine/model.py) is built per rank with `Parallel(rank, size, expert_parallel, group)`; each module
asks it for its share of a dimension (`part`, a clear error when the size does not divide) and reduces its
partial outputs with `all_reduce`. With size 1 every collective is a no-op and the shapes are the full ones.

Sharding (MODEL.md has the shapes), Megatron-style, two all-reduces per layer:
- attention: q heads split across ranks, kv heads split too (or, when there are more ranks than kv heads, each
  group of size // num_kv_heads ranks shares one kv head); o_proj split on its input; all-reduce its output;
- MLP (the dense layer 0 and the shared expert): gate/up split by rows, down by columns;
- routed experts: each expert's intermediate dimension split (TP), or whole experts per rank (expert parallel);
  routed and shared outputs are summed before the layer's second all-reduce; the router stays replicated;
- embedding and lm_head split by vocabulary (padded to a multiple of the size): the embedding lookup is an
  all-reduce of rows only one rank holds, the logits an all-gather;
- the MTP block's decoder layer as any layer; its small fc is replicated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: object = None        # the torch.distributed process group of the model's collectives

    def part(self, n: int, what: str) -> int:
        """This rank's share of a dimension of n that splits evenly; a clear error otherwise."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        return n // self.size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first kv head, count) of this rank: split when they divide, replicated in groups when fewer."""
        if num_kv_heads >= self.size:
            n = self.part(num_kv_heads, "num_key_value_heads")
            return self.rank * n, n
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({self.size}) must divide num_key_value_heads "
                             f"({num_kv_heads}) or be a multiple of it")
        return self.rank // (self.size // num_kv_heads), 1

    def vocab_shard(self, vocab_size: int) -> tuple[int, int]:
        """(first row, rows per rank) of the embedding and lm_head; the last rank's shard may be padded."""
        rows = -(-vocab_size // self.size)
        return self.rank * rows, rows

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = Parallel()
