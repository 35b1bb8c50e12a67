"""MTP self-speculative decoding: verification of drafts against the target distribution.

Drafts are the MTP block's argmax, so the draft distribution q is one-hot and the rejection rule of
speculative sampling becomes: accept draft d with probability p(d); on rejection draw from p with d removed
(renormalised); when every draft passes, draw a bonus token from the next position's p. The emitted tokens
are then distributed exactly as plain sampling from p. Greedy requests accept exactly the drafts that equal
the target argmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from exaserve.engine.sampler import Sampler, SamplingRow


@dataclass
class SpecStats:
    """Counters for metrics and the periodic log line."""
    num_speculative_tokens: int
    proposed: list[int] = field(default_factory=list)     # drafts verified, per draft position
    accepted: list[int] = field(default_factory=list)     # of which accepted, per draft position
    verify_events: int = 0                                # (request, step) pairs that verified drafts
    emitted: int = 0                                      # tokens those verifications emitted
    disabled_steps: int = 0                               # steps where the batch was too large to draft

    def __post_init__(self):
        self.proposed = [0] * self.num_speculative_tokens
        self.accepted = [0] * self.num_speculative_tokens

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.verify_events += 1
        self.emitted += num_accepted + 1
        for j in range(num_drafts):
            self.proposed[j] += 1
            self.accepted[j] += j < num_accepted

    def as_dict(self) -> dict:
        rates = [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]
        return {"num_speculative_tokens": self.num_speculative_tokens, "drafts_proposed": sum(self.proposed),
                "drafts_accepted": sum(self.accepted), "acceptance_per_position": rates,
                "mean_emitted_per_verify": self.emitted / self.verify_events if self.verify_events else 0.0,
                "spec_disabled_steps": self.disabled_steps}


def draft_rows(row: SamplingRow, drafts: list[int]) -> list[SamplingRow]:
    """Rows for positions 0..k of one verification: row j sees the output as if drafts[:j] were accepted,
    so penalties and min_tokens apply to the target distribution exactly as in plain decoding."""
    return [SamplingRow(row.params, row.prompt_token_ids, row.output_token_ids + drafts[:j], row.generator,
                        row.eos_token_ids) for j in range(len(drafts) + 1)]


def verify(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow],
           drafts: list[list[int]]) -> tuple[list[list[int]], list[list[dict | None]]]:
    """logits: the 1 + len(d) target rows of each request, concatenated; rows: one per request.

    Returns per request the emitted tokens (accepted drafts, then one corrected or bonus token) and their
    logprobs (from the raw logits, as in plain decoding)."""
    all_rows = [r for row, d in zip(rows, drafts) for r in draft_rows(row, d)]
    probs = sampler.probs(logits, all_rows)
    argmax = probs.argmax(dim=-1).tolist()
    emitted, chosen, base = [], [], 0
    for row, d in zip(rows, drafts):
        g = row.generator
        out = []
        for j, token in enumerate(d):
            i = base + j
            if row.params.greedy:
                ok = argmax[i] == token
            else:
                ok = float(torch.rand((), generator=g, device=probs.device)) < float(probs[i, token])
            if not ok:
                break
            out.append(token)
        i = base + len(out)
        if row.params.greedy:
            out.append(argmax[i])
        else:
            p = probs[i]
            if len(out) < len(d):           # rejected: the target distribution without the draft
                p = p.clone()
                p[d[len(out)]] = 0.0
            out.append(_draw(p, g))
        emitted.append(out)
        chosen += out + [0] * (len(d) + 1 - len(out))     # padding rows: their logprobs are dropped
        base += len(d) + 1
    lps = sampler.logprobs(logits, all_rows, torch.tensor(chosen, device=logits.device))
    logprobs, base = [], 0
    for out, d in zip(emitted, drafts):
        logprobs.append(lps[base:base + len(out)])
        base += len(d) + 1
    return emitted, logprobs


def _draw(p: torch.Tensor, generator) -> int:
    """One draw from an unnormalised distribution (exponential race, as the sampler does)."""
    noise = torch.empty_like(p).uniform_(generator=generator).log_().neg_().clamp_min_(torch.finfo(p.dtype).tiny)
    return int((p / noise).argmax())
