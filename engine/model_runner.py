"""Turns a scheduled batch into flat tensors, runs the model once, samples or verifies drafts, drafts.

The runner reads request state and returns results (StepResult, drafts); the scheduler applies them."""
from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch

from exaserve.engine.cpu_model import CpuModel
from exaserve.engine.cuda_graph import DecodeGraphs
from exaserve.engine.distributed import ShardedModel
from exaserve.engine.kv_cache import KVCache
from exaserve.engine.model import AttnMetadata, ExaoneMoeModel
from exaserve.engine.request import Request
from exaserve.engine.sampler import Sampler, SamplingRow, plain_greedy
from exaserve.engine.scheduler import ScheduledBatch, StepResult
from exaserve.engine.spec_decode import SpecStats, verify
from exaserve.engine.structured import apply_masks, token_masks

log = logging.getLogger("exaserve.engine")


def _row(r: Request) -> SamplingRow:
    return SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, r.eos_token_ids)


class ModelRunner:
    def __init__(self, model: ExaoneMoeModel, kv: KVCache, device, num_speculative_tokens: int = 0,
                 spec_max_batch_size: int = 32, cpu_model: CpuModel | None = None):
        self.model = model
        self.cpu_model = cpu_model       # the C++ fast path of the same model, on the cpu backend
        self.forward = cpu_model.forward if cpu_model is not None else model.forward   # no nn.Module hooks
        self.kv = kv
        self.device = torch.device(device)
        self.argmax = model.ops.argmax
        self.sampler = Sampler(device=self.device, argmax=self.argmax)
        self.num_speculative_tokens = num_speculative_tokens
        self.spec_max_batch_size = spec_max_batch_size
        self.spec_stats = SpecStats(num_speculative_tokens)
        self._hidden = None
        self.window = model.cfg.sliding_window or 0
        # under tensor parallelism the ring copies travel with the forward call, to run on every rank
        self._copies_in_forward = isinstance(model, ShardedModel)

    def use_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """Capture decode steps of up to max_batch_size requests as CUDA graphs (engine/cuda_graph.py): decode-only
        steps replay them, the rest runs eagerly."""
        width = -(-max_model_len // self.kv.paged.block_size)
        self.graphs = DecodeGraphs(self.forward, self.kv, max_batch_size, width, self.device)
        self.graphs.capture()
        self.forward = self.graphs.forward

    def _t(self, x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=self.device)

    def _step_tensors(self, reqs, starts, counts, ids, pos, slots=(), tables=None, rows=()):
        """(input_ids, positions, AttnMetadata) for chunks [starts[s], starts[s] + counts[s]) of each request.

        All index lists go into two tensors (int64 and int32) that are then cut into views: one allocation and
        copy per dtype instead of one per list (each costs ~5 us on CPU, which adds up at batch 1). `rows`
        (optional): hidden rows to sample, returned as a fourth value (int64).

        A position of a block whose ring snapshot the request is writing (prefix caching) goes straight into
        the snapshot when the ring will not need it (before the chunk's last window - 1 positions); the
        scheduler copies the rest from the ring at the start of the next step."""
        ring, bs = self.kv.ring, self.kv.paged.block_size
        ring_len = ring.ring_len
        qsl, seq_lens, ring_rows = [0], [], []
        for r, start, n in zip(reqs, starts, counts):
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            # only a chunk's last ring_len tokens survive in the ring; earlier ones would be overwritten
            keep_from, base = start + n - ring_len, r.ring_slot * ring_len
            if r.snapshot_targets:
                direct_to, targets = start + n - self.window + 1, r.snapshot_targets
                for p in range(start, start + n):
                    block = targets.get(p // bs) if p < direct_to else None
                    ring_rows.append(ring.snapshot_row(block, p % bs) if block is not None
                                     else base + p % ring_len if p >= keep_from else -1)
            else:
                ring_rows += [base + p % ring_len if p >= keep_from else -1 for p in range(start, start + n)]
        width = max((len(t) for t in tables), default=0) if tables is not None else 0
        table = [b for t in tables for b in (*t, *[0] * (width - len(t)))] if width else []
        wide = (ids, pos, slots, [r.ring_slot for r in reqs], ring_rows, rows)
        narrow = (qsl, starts, seq_lens, table)
        ids_t, pos_t, slots_t, ring_slots, ring_mapping, rows_t = self._t(
            list(itertools.chain(*wide))).split_with_sizes([len(x) for x in wide])
        qsl_t, ctx_t, seq_t, table_t = self._t(list(itertools.chain(*narrow)), torch.int32).split_with_sizes(
            [len(x) for x in narrow])
        meta = AttnMetadata(query_start_loc=qsl_t, context_lens=ctx_t, seq_lens=seq_t,
                            block_tables=table_t.view(len(reqs), width), slot_mapping=slots_t,
                            ring_slots=ring_slots, ring_mapping=ring_mapping)
        return (ids_t, pos_t, meta, rows_t) if rows else (ids_t, pos_t, meta)

    def prepare(self, batch: ScheduledBatch, rows=()):
        """Flat inputs of one step: (input_ids, positions, metadata), and `rows` as a tensor when given."""
        bs = self.kv.paged.block_size
        ids, pos, slots, starts = [], [], [], []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            start = req.num_computed_tokens
            ids += req.token_ids[start:start + n - len(req.spec_token_ids)] + req.spec_token_ids
            positions = range(start, start + n)
            pos += positions
            blocks = req.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in positions] if blocks else [-1] * n
            starts.append(start)
        return self._step_tensors(batch.requests, starts, batch.num_new_tokens, ids, pos, slots,
                                  [r.block_ids for r in batch.requests], rows)

    def execute(self, batch: ScheduledBatch, before_forward=None) -> StepResult:
        plain, spec, rows_plain, rows_spec = [], [], [], []
        end = 0
        for s, (r, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            end += n                                          # the sequence's rows end here
            if r.num_computed_tokens + n - len(r.spec_token_ids) < r.num_tokens:
                continue                                      # mid-prompt chunk: nothing to sample
            if r.spec_token_ids:
                spec.append(s)
                rows_spec += range(end - 1 - len(r.spec_token_ids), end)
            else:
                plain.append(s)
                rows_plain.append(end - 1)
        m = len(batch)
        result = StepResult([[] for _ in range(m)], [[] for _ in range(m)], [0] * m, [None] * m)
        sample_rows = [_row(batch.requests[s]) for s in plain]
        if self.cpu_model is not None and plain and not spec and not self.num_speculative_tokens:
            # nothing needs the hidden states: on the C++ path the step is one call, up to the sampled rows'
            # logits, or up to their tokens when every one of them takes the plain argmax (of the tokens its
            # grammar allows: the masks go into the call)
            greedy = all(map(plain_greedy, sample_rows))
            mask = None
            if greedy:
                constrained = [(j, batch.requests[s].grammar, ()) for j, s in enumerate(plain)
                               if batch.requests[s].grammar is not None]
                if constrained:
                    bitmask, filled = token_masks(len(plain), self.model.cfg.vocab_size, constrained)
                    mask = bitmask if filled else None
            input_ids, positions, meta, rows = self.prepare(batch, rows_plain)
            self._copy_ring_rows(batch)
            out = self.cpu_model.rows_step(input_ids, positions, meta, self.kv, rows, greedy, before_forward, mask)
            if greedy:
                for s, tok in zip(plain, out.tolist()):
                    if tok < 0:     # the C++ step found its hidden state NaN or infinite: no token to emit
                        log.error("request %s: the model's hidden state is not finite", batch.requests[s].request_id)
                        result.errors[s] = "sampling failed: the model's output is not finite (NaN or inf)"
                    else:
                        result.tokens[s], result.logprobs[s] = [tok], [None]
            else:
                self._sample(result, batch, plain, out, sample_rows)
            return result
        input_ids, positions, meta = self.prepare(batch)
        if self._copies_in_forward:
            copies = (self._t(batch.copy_src), self._t(batch.copy_dst)) if batch.copy_src else None
            hidden = self.model.forward(input_ids, positions, meta, self.kv, before_forward, ring_copies=copies)
        else:
            self._copy_ring_rows(batch)
            hidden = self.forward(input_ids, positions, meta, self.kv, before_forward)
        self._hidden = hidden
        if plain:
            self._sample(result, batch, plain, self.model.compute_logits(hidden[rows_plain]), sample_rows)
        if spec:
            self._verify(result, batch, spec, self.model.compute_logits(hidden[rows_spec]))
        return result

    def _copy_ring_rows(self, batch: ScheduledBatch) -> None:
        """The step's ring copies (snapshot saves and restores, ScheduledBatch), before its forward."""
        if batch.copy_src:
            self.kv.ring.copy_rows(self._t(batch.copy_src), self._t(batch.copy_dst))

    def _sample(self, result: StepResult, batch: ScheduledBatch, plain: list[int], logits: torch.Tensor,
                rows: list[SamplingRow]) -> None:
        """One token for each request of `plain` (batch indices; logits and rows in that order). Rows of requests
        with a grammar are masked first (in place)."""
        constrained = [(j, batch.requests[s].grammar, ()) for j, s in enumerate(plain) if batch.requests[s].grammar]
        if constrained:
            apply_masks(logits, constrained)

        def run(js: list[int]) -> None:
            out = self.sampler(logits if len(js) == len(rows) else logits[js], [rows[j] for j in js])
            for j, tok, lp in zip(js, out.token_ids, out.logprobs):
                result.tokens[plain[j]], result.logprobs[plain[j]] = [tok], [lp]

        _each_alone_on_failure(run, result, [batch.requests[s] for s in plain], plain)

    def _verify(self, result: StepResult, batch: ScheduledBatch, spec: list[int], logits: torch.Tensor) -> None:
        """Verify the drafts of each request of `spec` (batch indices) against its 1 + len(drafts) logits rows."""
        reqs = [batch.requests[s] for s in spec]
        rows = [_row(r) for r in reqs]
        drafts = [r.spec_token_ids for r in reqs]
        starts = [0, *itertools.accumulate(len(d) + 1 for d in drafts)]
        # a grammar masks each position; the first draft it rejects is masked out, so the accepted run ends there
        constrained = [(starts[j], r.grammar, drafts[j]) for j, r in enumerate(reqs) if r.grammar is not None]
        if constrained:
            apply_masks(logits, constrained)

        def run(js: list[int]) -> None:
            part = logits if len(js) == len(reqs) else logits[[i for j in js for i in range(starts[j], starts[j + 1])]]
            tokens, lps = verify(self.sampler, part, [rows[j] for j in js], [drafts[j] for j in js])
            for j, tok, lp in zip(js, tokens, lps):
                s, d = spec[j], drafts[j]
                result.tokens[s], result.logprobs[s] = tok, lp
                result.num_rejected[s] = len(d) + 1 - len(tok)
                self.spec_stats.record(len(d), len(tok) - 1)

        _each_alone_on_failure(run, result, reqs, spec)

    # -- MTP drafting -------------------------------------------------------------------------------------------
    def propose(self, batch: ScheduledBatch, result: StepResult) -> list[list[int]]:
        """Runs the MTP block over every position this step made valid (keeping its KV current), then drafts
        up to num_speculative_tokens tokens for each request that is decoding, chaining the block on its own
        output. Reads the requests as they were before `result` is applied; returns the drafts per request of
        the batch (the scheduler hands them over in `update`)."""
        drafts: list[list[int]] = [[] for _ in batch.requests]
        starts, counts, ids, rows, live = [], [], [], [], []
        offsets = [0, *itertools.accumulate(batch.num_new_tokens)]
        for s, r in enumerate(batch.requests):
            if r.ring_slot < 0 or result.errors[s] is not None:     # finished, or failing in this step
                continue
            n = batch.num_new_tokens[s] - result.num_rejected[s]     # positions this step made valid
            start = r.num_computed_tokens
            tokens = r.token_ids[start + 1:start + n + 1]
            tokens += result.tokens[s][:n - len(tokens)]             # the tokens this step emitted
            starts.append(start)
            counts.append(n)
            ids += tokens
            rows += range(offsets[s], offsets[s] + n)
            live.append(s)
        if not live:
            return drafts
        reqs = [batch.requests[s] for s in live]
        pos = [p for st, n in zip(starts, counts) for p in range(st, st + n)]
        ids_t, pos_t, meta = self._step_tensors(reqs, starts, counts, ids, pos)
        h = self.model.mtp_forward(ids_t, self._hidden[rows], pos_t, meta, self.kv)
        if len(reqs) > self.spec_max_batch_size:      # verifying would cost more than it saves
            self.spec_stats.disabled_steps += 1
            return drafts
        last, drafting, budgets, next_pos = [], [], [], []
        end = 0
        for s, r, start, n in zip(live, reqs, starts, counts):
            end += n
            emitted = len(result.tokens[s])
            k = min(self.num_speculative_tokens, r.params.max_tokens - len(r.output_token_ids) - emitted - 1)
            if start + n == r.num_tokens + emitted - 1 and k > 0:   # every token but the last one computed
                last.append(end - 1)
                drafting.append(s)
                budgets.append(k)
                next_pos.append(start + n)             # the first draft's own position
        if not drafting:
            return drafts
        h = h[last]
        reqs = [batch.requests[s] for s in drafting]
        for j in range(max(budgets)):
            tokens = self.argmax(self.model.compute_logits(h))
            for s, t, k in zip(drafting, tokens.tolist(), budgets):
                if j < k:
                    drafts[s].append(t)
            if j + 1 == max(budgets):
                break
            pos = [p + j for p in next_pos]
            _, pos_t, meta = self._step_tensors(reqs, pos, [1] * len(reqs), [], pos)
            h = self.model.mtp_forward(tokens, h, pos_t, meta, self.kv)
        return drafts


def _each_alone_on_failure(run: Callable[[list[int]], None], result: StepResult, reqs: list[Request],
                           batch_index: list[int]) -> None:
    """run(js) samples the requests reqs[j] for j in js, writing into `result`. When a run over them all raises,
    each runs alone (seeded generators rewound first, so its tokens are those it would have had), and one that
    still raises fails alone: its error goes to result.errors, the others keep their tokens."""
    states = [r.generator.get_state() if r.generator is not None else None for r in reqs]
    try:
        run(list(range(len(reqs))))
        return
    except Exception as e:
        if len(reqs) == 1:
            log.error("request %s: sampling failed", reqs[0].request_id, exc_info=e)
            result.errors[batch_index[0]] = f"sampling failed: {type(e).__name__}: {e}"
            return
        log.warning("sampling %d requests together failed (%s: %s); sampling each alone", len(reqs),
                    type(e).__name__, e)
    for j, (r, state) in enumerate(zip(reqs, states)):
        if state is not None:
            r.generator.set_state(state)
        try:
            run([j])
        except Exception as e:
            log.error("request %s: sampling failed", r.request_id, exc_info=e)
            result.errors[batch_index[j]] = f"sampling failed: {type(e).__name__}: {e}"
