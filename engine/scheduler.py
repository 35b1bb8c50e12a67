"""Continuous-batching scheduler (vLLM-v1 style): token and seat budgets, running requests first.

Every request carries `num_computed_tokens`; a step gives each request the tokens it still lacks (its whole
remaining prompt chunked to the budget, or one decode token), so prefill chunks and decodes share a batch.
When KV blocks run out, the newest running request is preempted: its cache is freed and it recomputes later.

With prefix caching (engine/kv_cache.py) a request admitted from the waiting queue starts at its longest usable
cached prefix: it takes the cached global blocks, its ring is restored from snapshots by a row copy that runs
before the step's forward, and the step computes only the rest. The full prompt blocks a step completes are
registered (global blocks) and committed (snapshots) when the step is applied. A waiting request whose next
block is being computed by a running request waits for it instead of computing it too, so requests that share
a prompt (the n choices of one request, a burst with one system prompt) share one prefill.

The scheduler owns request state: after each step, `update` alone applies what the step produced (token counts,
rollback of rejected drafts, the new tokens and their stop conditions, the next drafts, finishing); the runner
and the speculative decoder only return results.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from exaserve.engine.kv_cache import KVCache, block_hashes, snapshot_key
from exaserve.engine.request import Request, Status

log = logging.getLogger("exaserve.engine")


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0
    # ring rows to copy before the forward, in every ring layer (RingPool.copy_rows): the snapshot saves the
    # previous step left and this step's restores of cached prefixes, one gather then one scatter
    copy_src: list[int] = field(default_factory=list)
    copy_dst: list[int] = field(default_factory=list)

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
    def __init__(self, kv: KVCache, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 enable_prefix_caching: bool = False, window: int | None = None, mtp: bool = False):
        """window: the sliding window (None: no sliding layers); mtp: the MTP block runs (its ring's K/V at p
        depends on token p + 1, so snapshots are named with the token after their block)."""
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
        # prefix caching needs global blocks to name; a model without them (all sliding) runs without it
        self.prefix_caching = enable_prefix_caching and kv.paged.num_blocks > 0
        self.window = window or 0
        self.mtp = mtp
        self.prefix_cache_queries = 0    # prompt tokens looked up (at each admission from the waiting queue)
        self.prefix_cache_hits = 0       # of those, found cached
        self._in_flight: dict[bytes, Request] = {}   # a block name -> the running request that will compute it
        self._save_src: list[int] = []   # ring rows -> snapshot rows, copied at the start of the next step
        self._save_dst: list[int] = []

    def add(self, req: Request) -> None:
        if self.prefix_caching:
            req.block_hashes = block_hashes(req.prompt_token_ids, self.kv.paged.block_size)
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
                self._plan_snapshots(req, n)
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break
        # the saves first: a restore may read a snapshot that a save writes now (it reads the save's source)
        saved = dict(zip(self._save_dst, self._save_src))
        batch.copy_src, batch.copy_dst = self._save_src, self._save_dst
        self._save_src, self._save_dst = [], []
        if not batch.num_preempted:      # memory is short: admit nobody new this step
            self._admit(batch, budget, saved)
        if not batch.requests:           # no step runs: the saves wait for the next one
            self._save_src, self._save_dst = batch.copy_src, batch.copy_dst
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int, saved: dict[int, int]) -> None:
        """Waiting requests join the batch in order while seats, ring slots, blocks and the budget last; one
        whose next prompt block a running request is computing waits for it (skipped, not blocking the rest)."""
        kv, bs = self.kv, self.kv.paged.block_size
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs or kv.ring.num_free == 0:
                break
            hit, snapshots = [], []
            if self.prefix_caching:
                hit, snapshots, matched = self._lookup(req)
                limit = min((req.num_tokens - 1) // bs, len(req.block_hashes))
                if matched < limit and self._in_flight.get(req.block_hashes[matched]) is not None:
                    continue
            req.num_computed_tokens = len(hit) * bs
            n = self._num_new_tokens(req, budget)
            need = kv.paged.blocks_for(req.num_computed_tokens + n) - len(hit) + kv.paged.num_evictable(hit)
            if need > kv.paged.num_free:
                req.num_computed_tokens = 0
                break
            self.waiting.remove(req)
            kv.paged.acquire(hit)
            req.block_ids, req.num_registered_blocks = list(hit), len(hit)
            req.ring_slot = kv.ring.allocate()
            self._grow(req, req.num_computed_tokens + n)
            if self.prefix_caching:
                self._restore(req, snapshots, batch, saved)
            req.status = Status.RUNNING
            self.running.append(req)
            self._plan_snapshots(req, n)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n

    # -- prefix cache ---------------------------------------------------------------------------------------
    def _snapshot_key(self, req: Request, i: int, next_token: int | None = None) -> bytes | None:
        """The name of block i's snapshot; None when MTP needs the token after the block and it is unknown."""
        if not self.mtp:
            return snapshot_key(req.block_hashes[i], None)
        after = (i + 1) * self.kv.paged.block_size
        if after < req.num_tokens:
            next_token = req.token_ids[after]
        return None if next_token is None else snapshot_key(req.block_hashes[i], next_token)

    def _lookup(self, req: Request) -> tuple[list[int], list[tuple[bytes, int]], int]:
        """The longest usable hit: (its global blocks, the snapshots covering the window before its end, the
        number of blocks of the longest cached global prefix). A hit ends on a block boundary before the last
        token (which is computed for its logits) and needs every snapshot of the window before it."""
        bs, snapshots = self.kv.paged.block_size, self.kv.ring.snapshots
        blocks = self.kv.paged.lookup(req.block_hashes[:(req.num_tokens - 1) // bs])
        k = len(blocks)
        if not self.window:
            return blocks, [], k
        while k > 0:
            first = max(0, k * bs - self.window + 1) // bs
            keys = [self._snapshot_key(req, i) for i in range(first, k)]
            missing = next((j for j in range(len(keys) - 1, -1, -1) if keys[j] not in snapshots), None)
            if missing is None:
                return blocks[:k], [(key, snapshots[key]) for key in keys], len(blocks)
            k = first + missing        # every hit ending after the missing snapshot needs it
        return [], [], len(blocks)

    def _restore(self, req: Request, snapshots: list[tuple[bytes, int]], batch: ScheduledBatch,
                 saved: dict[int, int]) -> None:
        """Count the lookup; copy the hit's window from its snapshots into the request's ring (in this step,
        before the forward); mark the blocks it will compute as in flight."""
        kv, bs, hit = self.kv, self.kv.paged.block_size, req.num_computed_tokens
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += hit
        if req.num_preemptions == 0:
            req.num_cached_tokens = hit
        if snapshots:
            first = max(0, hit - self.window + 1)
            for key, _ in snapshots:
                kv.ring.touch_snapshot(key)
            base = first // bs
            for p in range(first, hit):
                src = kv.ring.snapshot_row(snapshots[p // bs - base][1], p % bs)
                batch.copy_src.append(saved.get(src, src))
                batch.copy_dst.append(kv.ring.row(req.ring_slot, p))
        for h in req.block_hashes[hit // bs:]:
            if h not in kv.paged.cached and h not in self._in_flight:
                self._in_flight[h] = req

    def _plan_snapshots(self, req: Request, n: int) -> None:
        """Snapshot blocks for the full prompt blocks that this step's chunk [start, start + n) begins (or
        continues) and that are not cached yet; none when the region has no block to spare."""
        if not (self.prefix_caching and self.window):
            return
        ring, bs, start = self.kv.ring, self.kv.paged.block_size, req.num_computed_tokens
        end = min(start + n, len(req.block_hashes) * bs)
        for i in range(start // bs, -(-end // bs)):
            if i in req.snapshot_targets or i * bs < start:   # one begun without a snapshot cannot be completed
                continue
            if self._snapshot_key(req, i) in ring.snapshots:
                continue
            block = ring.allocate_snapshot()
            if block is None:
                return
            req.snapshot_targets[i] = block

    def _cache_computed(self, req: Request, start: int, n: int, next_token: int | None) -> None:
        """After a step computed [start, start + n) of `req`: register its completed full prompt blocks, commit
        the snapshots it completed, and queue the copies of the snapshot positions it left in the ring (the
        last window - 1 of the chunk; the runner wrote the others straight into their snapshots)."""
        kv, bs, end = self.kv, self.kv.paged.block_size, start + n
        full = min(end // bs, len(req.block_hashes))
        for i in range(req.num_registered_blocks, full):
            h = req.block_hashes[i]
            kv.paged.register(req.block_ids[i], h)
            if self._in_flight.get(h) is req:
                del self._in_flight[h]
        req.num_registered_blocks = max(req.num_registered_blocks, full)
        targets = req.snapshot_targets
        if not targets:
            return
        for p in range(max(start, end - self.window + 1), min(end, len(req.block_hashes) * bs)):
            block = targets.get(p // bs)
            if block is not None:
                self._save_src.append(kv.ring.row(req.ring_slot, p))
                self._save_dst.append(kv.ring.snapshot_row(block, p % bs))
        for i in [i for i in targets if i < full]:
            block = targets.pop(i)
            key = self._snapshot_key(req, i, next_token)
            if key is None:
                kv.ring.free_snapshot(block)
            else:
                kv.ring.commit_snapshot(key, block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks and snapshots in use stay with their requests)."""
        self.kv.paged.reset_cache()
        self.kv.ring.reset_cache()

    @staticmethod
    def _num_new_tokens(req: Request, budget: int) -> int:
        """The tokens it lacks plus its drafts (KV is reserved for them too), cut to the budget."""
        n = min(req.num_tokens - req.num_computed_tokens + len(req.spec_token_ids), budget)
        del req.spec_token_ids[max(0, n - 1):]
        return n

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
        for block in req.snapshot_targets.values():
            self.kv.ring.free_snapshot(block)
        req.snapshot_targets = {}
        for h in req.block_hashes[req.num_registered_blocks:]:
            if self._in_flight.get(h) is req:
                del self._in_flight[h]
        req.num_registered_blocks = 0
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
                start = req.num_computed_tokens
                req.num_computed_tokens += n - result.num_rejected[s]
                if self.prefix_caching and start < len(req.block_hashes) * self.kv.paged.block_size:
                    self._cache_computed(req, start, n, result.tokens[s][0] if result.tokens[s] else None)
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
        if req.grammar is not None:
            req.grammar.accept(token)
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
        if req.grammar is not None and req.grammar.terminated:   # it accepted a stop token (ignore_eos too)
            return self._stop(req, "stop", None)
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

