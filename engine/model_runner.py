"""Turns a scheduled batch into flat tensors, runs the model once, samples or verifies drafts, drafts."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from exaserve import kernels

from exaserve.engine.kv_cache import KVCache
from exaserve.engine.model import AttnMetadata, ExaoneMoeModel
from exaserve.engine.request import Request
from exaserve.engine.sampler import Sampler, SamplingRow, plain_greedy
from exaserve.engine.scheduler import ScheduledBatch
from exaserve.engine.spec_decode import SpecStats, verify


@dataclass
class StepResult:
    """Per scheduled request, in batch order: the tokens it emits this step (empty while a prompt is still
    being prefilled), their logprobs, and how many drafts were rejected (their KV positions are void)."""
    tokens: list[list[int]]
    logprobs: list[list[dict | None]]
    num_rejected: list[int]


def _row(r: Request) -> SamplingRow:
    return SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, r.eos_token_ids)


class ModelRunner:
    def __init__(self, model: ExaoneMoeModel, kv: KVCache, device, num_spec_tokens: int = 0,
                 spec_max_batch_size: int = 32):
        self.model = model
        self.kv = kv
        self.device = torch.device(device)
        self.sampler = Sampler(device=self.device)
        self.num_spec_tokens = num_spec_tokens
        self.spec_max_batch_size = spec_max_batch_size
        self.spec_stats = SpecStats(num_spec_tokens)
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
        if plain and not spec and not self.num_spec_tokens:
            # nothing needs the hidden states: on the C++ path the step is one call, up to the sampled rows'
            # logits, or up to their tokens when every one of them takes the plain argmax
            greedy = all(map(plain_greedy, sample_rows))
            input_ids, positions, meta, rows = self.prepare(batch, rows_plain)
            out = self.model.rows_step(input_ids, positions, meta, self.kv, rows, greedy, before_forward)
            if out is not None:
                if greedy:
                    for s, tok in zip(plain, out.tolist()):
                        result.tokens[s], result.logprobs[s] = [tok], [None]
                else:
                    self._sampled(result, plain, self.sampler(out, sample_rows))
                return result
        else:
            input_ids, positions, meta = self.prepare(batch)
        hidden = self.model.forward(input_ids, positions, meta, self.kv, before_forward)  # no nn.Module hooks
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
        for r in batch.requests:
            r.spec_token_ids = []
        return result

    @staticmethod
    def _sampled(result: StepResult, plain: list[int], out) -> None:
        for s, tok, lp in zip(plain, out.token_ids, out.logprobs):
            result.tokens[s], result.logprobs[s] = [tok], [lp]

    # -- MTP drafting -------------------------------------------------------------------------------------------
    def propose(self, batch: ScheduledBatch, result: StepResult) -> None:
        """Runs the MTP block over every position this step made valid (keeping its KV current), then drafts
        up to num_spec_tokens tokens for each request that is decoding, chaining the block on its own output."""
        live = [(s, r) for s, r in enumerate(batch.requests) if not r.finished and r.ring_slot >= 0]
        if not live:
            return
        starts, counts, ids, rows, reqs = [], [], [], [], []
        offsets = [0, *itertools.accumulate(batch.num_new_tokens)]
        for s, r in live:
            n = batch.num_new_tokens[s] - result.num_rejected[s]     # positions this step made valid
            start = r.num_computed_tokens - n
            starts.append(start)
            counts.append(n)
            ids += r.token_ids[start + 1:start + n + 1]
            rows += range(offsets[s], offsets[s] + n)
            reqs.append(r)
        pos = [p for st, n in zip(starts, counts) for p in range(st, st + n)]
        ids_t, pos_t, meta = self._step_tensors(reqs, starts, counts, ids, pos)
        h = self.model.mtp_forward(ids_t, self._hidden[rows], pos_t, meta, self.kv)
        if len(reqs) > self.spec_max_batch_size:      # verifying would cost more than it saves
            self.spec_stats.disabled_steps += 1
            return
        last, drafting, budgets = [], [], []
        end = 0
        for r, n in zip(reqs, counts):
            end += n
            k = min(self.num_spec_tokens, r.params.max_tokens - len(r.output_token_ids) - 1)
            if r.num_computed_tokens == r.num_tokens - 1 and k > 0:
                last.append(end - 1)
                drafting.append(r)
                budgets.append(k)
        if not drafting:
            return
        h = h[last]
        for j in range(max(budgets)):
            tokens = kernels.argmax(self.model.compute_logits(h))
            for r, t, k in zip(drafting, tokens.tolist(), budgets):
                if j < k:
                    r.spec_token_ids.append(t)
            if j + 1 == max(budgets):
                break
            pos = [r.num_tokens - 1 + j for r in drafting]      # the drafted token's own position
            _, pos_t, meta = self._step_tensors(drafting, pos, [1] * len(drafting), [], pos)
            h = self.model.mtp_forward(tokens, h, pos_t, meta, self.kv)
