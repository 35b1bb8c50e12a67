"""Turns a scheduled batch into flat tensors, runs the model once, samples."""
from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from engine.model import AttnMetadata, ExaoneMoeModel
from engine.sampler import Sampler, SamplerOutput, SamplingRow
from engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: ExaoneMoeModel, kv: KVCache, device):
        self.model = model
        self.kv = kv
        self.device = torch.device(device)
        self.sampler = Sampler(device=self.device)

    def prepare(self, batch: ScheduledBatch):
        """Flat inputs of one step. Returns (input_ids, positions, metadata, rows whose last token is sampled)."""
        bs, ring_len = self.kv.paged.block_size, self.kv.ring.ring_len
        ids, pos, slots, ring_rows, qsl, ctx, seq_lens, logit_rows = [], [], [], [], [0], [], [], []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            start = req.num_computed_tokens
            end = start + n
            ids += req.token_ids[start:end]
            positions = range(start, end)
            pos += positions
            blocks = req.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in positions] if blocks else [-1] * n
            # only the last ring_len tokens of a chunk survive in the ring; earlier ones would be overwritten
            keep_from = end - ring_len
            base = req.ring_slot * ring_len
            ring_rows += [base + p % ring_len if p >= keep_from else -1 for p in positions]
            qsl.append(qsl[-1] + n)
            ctx.append(start)
            seq_lens.append(end)
            if end == req.num_tokens:
                logit_rows.append(qsl[-1] - 1)
        max_blocks = max((len(r.block_ids) for r in batch.requests), default=0)
        tables = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in batch.requests]

        def t(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype, device=self.device)

        meta = AttnMetadata(
            query_start_loc=t(qsl, torch.int32), context_lens=t(ctx, torch.int32), seq_lens=t(seq_lens, torch.int32),
            block_tables=t(tables, torch.int32).view(len(tables), max_blocks), slot_mapping=t(slots),
            ring_slots=t([r.ring_slot for r in batch.requests]), ring_mapping=t(ring_rows))
        return t(ids), t(pos), meta, logit_rows

    def execute(self, batch: ScheduledBatch) -> SamplerOutput | None:
        """Runs one step; returns the sampled tokens for the requests whose scheduled tokens end their known
        tokens (in batch order), or None when no request samples this step."""
        input_ids, positions, meta, logit_rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta, self.kv)
        if not logit_rows:
            return None
        logits = self.model.compute_logits(hidden[logit_rows])
        rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, r.eos_token_ids)
                for r, n in zip(batch.requests, batch.num_new_tokens)
                if r.num_computed_tokens + n == r.num_tokens]
        return self.sampler(logits, rows)
