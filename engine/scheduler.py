"""Continuous-batching scheduler (vLLM-v1 style): token and seat budgets, running requests first.

Every request carries `num_computed_tokens`; a step gives each request the tokens it still lacks (its whole
remaining prompt chunked to the budget, or one decode token), so prefill chunks and decodes share a batch.
When KV blocks run out, the newest running request is preempted: its cache is freed and it recomputes later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from exaserve.engine.kv_cache import KVCache
from exaserve.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self):
        return len(self.requests)


class Scheduler:
    def __init__(self, kv: KVCache, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, budget)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break
        if batch.num_preempted:          # memory is short: admit nobody new this step
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = self._num_new_tokens(req, budget)
            if self.kv.ring.num_free == 0 or not self._can_grow(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.ring_slot = self.kv.ring.allocate()
            self._grow(req, req.num_computed_tokens + n)
            req.status = Status.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    @staticmethod
    def _num_new_tokens(req: Request, budget: int) -> int:
        """The tokens it lacks plus its drafts (KV is reserved for them too), cut to the budget."""
        n = min(req.num_tokens - req.num_computed_tokens + len(req.spec_token_ids), budget)
        del req.spec_token_ids[max(0, n - 1):]
        return n

    def _can_grow(self, req: Request, num_tokens: int) -> bool:
        return self.kv.paged.blocks_for(num_tokens) - len(req.block_ids) <= self.kv.paged.num_free

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make sure `req` has blocks for `num_tokens` tokens; False when the pool is short."""
        need = self.kv.paged.blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.kv.paged.num_free:
            return False
        req.block_ids += self.kv.paged.allocate(need)
        return True

    def _release(self, req: Request) -> None:
        self.kv.paged.free(req.block_ids)
        req.block_ids = []
        if req.ring_slot >= 0:
            self.kv.ring.free(req.ring_slot)
            req.ring_slot = -1

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str, stop_reason=None) -> None:
        """Finished or aborted: everything it holds goes back at once."""
        if req.status == Status.RUNNING:
            self.running.remove(req)
        elif req.status == Status.WAITING:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
