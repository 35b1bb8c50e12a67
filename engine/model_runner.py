"""Turns a scheduled batch into flat tensors, runs the model once, samples or verifies drafts, drafts.

The runner reads request state and returns results (StepResult, drafts); the scheduler applies them."""
from __future__ import annotations

import itertools

import torch

from exaserve.engine.cpu_model import CpuModel
from exaserve.engine.kv_cache import KVCache
from exaserve.engine.model import AttnMetadata, ExaoneMoeModel
from exaserve.engine.request import Request
from exaserve.engine.sampler import Sampler, SamplingRow, plain_greedy
from exaserve.engine.scheduler import ScheduledBatch, StepResult
from exaserve.engine.spec_decode import SpecStats, verify


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

    def _t(self, x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=self.device)

    def _step_tensors(self, reqs, starts, counts, ids, pos, slots=(), tables=None, rows=()):
        """(input_ids, positions, AttnMetadata) for chunks [starts[s], starts[s] + counts[s]) of each request.

        All index lists go into two tensors (int64 and int32) that are then cut into views: one allocation and
        copy per dtype instead of one per list (each costs ~5 us on CPU, which adds up at batch 1). `rows`
        (optional): hidden rows to sample, returned as a fourth value (int64)."""
        ring_len = self.kv.ring.ring_len
        qsl, seq_lens, ring_rows = [0], [], []
        for r, start, n in zip(reqs, starts, counts):
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            # only a chunk's last ring_len tokens survive in the ring; earlier ones would be overwritten
            keep_from, base = start + n - ring_len, r.ring_slot * ring_len
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
        result = StepResult([[] for _ in range(m)], [[] for _ in range(m)], [0] * m)
        sample_rows = [_row(batch.requests[s]) for s in plain]
        if self.cpu_model is not None and plain and not spec and not self.num_speculative_tokens:
            # nothing needs the hidden states: on the C++ path the step is one call, up to the sampled rows'
            # logits, or up to their tokens when every one of them takes the plain argmax
            greedy = all(map(plain_greedy, sample_rows))
            input_ids, positions, meta, rows = self.prepare(batch, rows_plain)
            out = self.cpu_model.rows_step(input_ids, positions, meta, self.kv, rows, greedy, before_forward)
            if greedy:
                for s, tok in zip(plain, out.tolist()):
                    result.tokens[s], result.logprobs[s] = [tok], [None]
            else:
                self._sampled(result, plain, self.sampler(out, sample_rows))
            return result
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.forward(input_ids, positions, meta, self.kv, before_forward)
        self._hidden = hidden
        if plain:
            self._sampled(result, plain, self.sampler(self.model.compute_logits(hidden[rows_plain]), sample_rows))
        if spec:
            reqs = [batch.requests[s] for s in spec]
            drafts = [r.spec_token_ids for r in reqs]
            tokens, lps = verify(self.sampler, self.model.compute_logits(hidden[rows_spec]), [_row(r) for r in reqs],
                                 drafts)
            for s, d, tok, lp in zip(spec, drafts, tokens, lps):
                result.tokens[s], result.logprobs[s] = tok, lp
                result.num_rejected[s] = len(d) + 1 - len(tok)
                self.spec_stats.record(len(d), len(tok) - 1)
        return result

    @staticmethod
    def _sampled(result: StepResult, plain: list[int], out) -> None:
        for s, tok, lp in zip(plain, out.token_ids, out.logprobs):
            result.tokens[s], result.logprobs[s] = [tok], [lp]

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
            if r.ring_slot < 0:
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
