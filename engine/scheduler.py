"""Continuous-batching scheduler (vLLM-v1 style): token and seat budgets, running requests first.

Every request carries `num_computed_tokens`; a step gives each request the tokens it still lacks (its whole
remaining prompt chunked to the budget, or one decode token), so prefill chunks and decodes share a batch.
When KV blocks run out, the newest running request is preempted: its cache is freed and it recomputes later.

The scheduler owns request state: after each step, `update` alone applies what the step produced (token counts,
rollback of rejected drafts, the new tokens and their stop conditions, the next drafts, finishing); the runner
and the speculative decoder only return results.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from exaserve.engine.kv_cache import KVCache
from exaserve.engine.request import Request, Status

log = logging.getLogger("exaserve.engine")


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


@dataclass
class StepResult:
    """What one step produced per scheduled request, in batch order (ModelRunner.execute): the tokens it emits
    (empty while a prompt is still being prefilled), their logprobs, how many drafts were rejected (their
    KV positions are void), and why its sampling failed, if it did (that request alone then fails)."""
    tokens: list[list[int]]
    logprobs: list[list[dict | None]]
    num_rejected: list[int]
    errors: list[str | None]


class Scheduler:
    def __init__(self, kv: KVCache, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0       # computed, counted once per chunk
        self.num_generation_tokens = 0
        self.num_finished = 0            # by a stop condition or length (not aborts)

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

    def update(self, batch: ScheduledBatch, result: StepResult,
               drafts: list[list[int]] | None = None) -> list[Request]:
        """Apply one step's result: rejected drafts roll back (their KV positions are overwritten later), the new
        tokens are appended and checked against the stop conditions (a stop inside accepted drafts drops the
        tokens after it), finished requests release their memory, the others take their next drafts (`drafts`,
        per request of the batch). A request whose sampling failed, or whose update raises, fails alone.
        Returns the requests that emitted tokens or failed, in batch order."""
        emitted = []
        for s, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            if result.errors[s] is not None:
                self.fail(req, result.errors[s])
                emitted.append(req)
                continue
            try:
                req.num_computed_tokens += n - result.num_rejected[s]
                if req.num_computed_tokens <= len(req.prompt_token_ids):
                    self.num_prompt_tokens += n
                for token, logprobs in zip(result.tokens[s], result.logprobs[s]):
                    self._append(req, token, logprobs)
                    if req.finished:
                        break
                req.spec_token_ids = [] if req.finished or drafts is None else drafts[s]
            except Exception as e:  # e.g. the detokenizer: a bug met by one request fails that request
                log.exception("request %s: applying the step failed", req.request_id)
                self.fail(req, f"applying the step failed: {type(e).__name__}: {e}")
            if result.tokens[s] or req.error is not None:
                emitted.append(req)
        return emitted

    def _append(self, req: Request, token: int, logprobs: dict | None) -> None:
        p = req.params
        req.append_token(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if logprobs is not None:
            req.logprobs.append(logprobs)
        self.num_generation_tokens += 1
        n_out = len(req.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return self._stop(req, "stop", None)
            if p.stop_token_ids and token in p.stop_token_ids:
                return self._stop(req, "stop", token)
        stop_str = req.detok.add(token)
        if stop_str is not None and n_out >= p.min_tokens:
            return self._stop(req, "stop", stop_str)
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return self._stop(req, "length", None)

    def _stop(self, req: Request, reason: str, stop_reason) -> None:
        self.finish(req, reason, stop_reason)
        self.num_finished += 1

    def fail(self, req: Request, error: str) -> None:
        """Finished with finish_reason "error"; what it holds goes back."""
        req.error = error
        self.finish(req, "error")

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

