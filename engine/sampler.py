"""Batched token sampling: logit processors, seeded sampling and top-N logprobs, all on the device.

Processing order (vLLM's, so results match what OpenAI-style clients expect):
  logit_bias -> min_tokens mask (EOS and stop_token_ids; not where a grammar allows only those) ->
  repetition penalty (prompt + output)
  -> frequency / presence penalties (output) -> [greedy rows stop here: argmax]
  -> temperature -> top_k -> top_p -> min_p -> sample.
Filtered tokens get -inf. Every stage is skipped when no row in the batch uses it.

Extreme settings stay numerically safe: penalties and temperatures are clamped to finite fp32 values (so no stage
makes NaN), and a row that overflows to +inf keeps only its +inf tokens, as equally likely top candidates (the
softmax of a row holding +inf is NaN). A row the sampler cannot serve raises FloatingPointError: raw logits holding
NaN or +inf (a fault in the forward pass), or no token left (every processed logit -inf).
"""

from dataclasses import dataclass

import torch

from exaserve.engine.sampling_params import SamplingParams
from exaserve.kernels import torch_ops

NEG_INF = float("-inf")
FLOAT_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingRow:
    """One sequence to sample the next token for."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # set iff params.seed is not None (see make_generator)
    eos_token_ids: list[int]  # masked, with params.stop_token_ids, until min_tokens are out


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row; None where params.logprobs is None


def make_generator(seed: int, device) -> torch.Generator:
    """Created once per request: its state carries from step to step, so one seed gives one sequence."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    def __init__(self, device=None, argmax=torch_ops.argmax):
        self.device = None if device is None else torch.device(device)  # None: sample where the logits are
        self.argmax = argmax   # the kernel backend's row-wise argmax

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = self._on_device(logits)
        raw_max = logits.amax(dim=-1)
        x = self.process(logits, rows, copy=False)
        token_ids = self.argmax(x)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            probs = x[sampled].softmax(dim=-1)
            token_ids[sampled] = self.argmax(probs / self._exponential_noise(probs, [rows[i] for i in sampled]))
        chosen = x.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        ids = token_ids.tolist()
        _check_rows(raw_max, chosen)  # once the tokens are on the host: then it waits for nothing more
        return SamplerOutput(ids, self.logprobs(logits, rows, token_ids))

    def probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The distribution each row's token is drawn from, [S, V] fp32; greedy rows are one-hot on the argmax."""
        logits = self._on_device(logits)
        x = self.process(logits, rows)
        _check_rows(logits.amax(dim=-1), x.amax(dim=-1))
        probs = x.softmax(dim=-1)
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if greedy:
            probs[greedy] = torch.nn.functional.one_hot(x[greedy].argmax(dim=-1), x.shape[-1]).float()
        return probs

    def process(self, logits: torch.Tensor, rows: list[SamplingRow], copy: bool = True) -> torch.Tensor:
        """Apply every processor in order to a fp32 copy of logits [S, V]; the input is left untouched.
        copy=False: when no processor applies, fp32 logits are returned as they are (the caller won't write)."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        if not copy and logits.dtype == torch.float32 and not any(_processed(row) for row in rows):
            return self._on_device(logits)
        x = self._on_device(logits).to(torch.float32, copy=True)
        _apply_logit_bias(x, rows)
        _apply_min_tokens(x, rows)
        _apply_penalties(x, rows)
        sampled = [row for row in rows if not row.params.greedy]
        if not sampled:
            return x
        # Greedy rows get neutral values below, so the remaining stages leave them as they are.
        if any(row.params.temperature != 1.0 for row in sampled):
            temps = [1.0 if row.params.greedy else row.params.temperature for row in rows]
            x.div_(_column(temps, x).clamp_(max=FLOAT_MAX))  # an inf temperature would make -inf / inf = NaN
            if any(row.params.temperature < 1.0 and _penalized(row.params) for row in sampled):
                x = _overflow_to_top(x)  # only a penalty makes logits large enough to overflow here
        x = _apply_top_k_top_p(x, rows)
        if any(row.params.min_p > 0 for row in sampled):
            min_p = _column([0.0 if row.params.greedy else row.params.min_p for row in rows], x)
            probs = x.softmax(dim=-1)
            x.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), NEG_INF)
        return x

    def logprobs(self, logits: torch.Tensor, rows: list[SamplingRow],
                 token_ids: torch.Tensor) -> list[dict[int, float] | None]:
        """Top-N logprobs of the raw logits for each row, plus the given token of that row."""
        return _logprobs(self._on_device(logits), rows, token_ids)

    def _on_device(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.device is None else logits.to(self.device)

    @staticmethod
    def _exponential_noise(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Exp(1) noise for the exponential race: argmax(p / q) is a draw from p.

        A seeded row takes exactly one draw of V values from its own generator per token, so its tokens do
        not depend on the other rows of the batch or their order; the other rows share one batched draw.
        """
        # -log(U) is an Exp(1) draw; on CPU, uniform + log is ~6x faster than Tensor.exponential_.
        noise = torch.empty_like(probs)
        if any(row.generator is None for row in rows):
            noise.uniform_()
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].uniform_(generator=row.generator)
        # U = 1 gives 0, and 0/0 on a filtered token would be NaN (argmax picks NaN).
        return noise.log_().neg_().clamp_min_(torch.finfo(noise.dtype).tiny)


def plain_greedy(row: SamplingRow) -> bool:
    """Whether this row's token is simply the argmax of its raw logits, with no logprobs to report."""
    return row.params.logprobs is None and not _processed(row)


def _processed(row: SamplingRow) -> bool:
    """Whether any processor may change this row's logits."""
    p = row.params
    return not p.greedy or bool(p.logit_bias) or len(row.output_token_ids) < p.min_tokens or _penalized(p)


def _penalized(p: SamplingParams) -> bool:
    return (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) != (1.0, 0.0, 0.0)


def _column(values: list, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Per-row parameters as an [S, 1] tensor that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=dtype, device=like.device).unsqueeze(1)


def _apply_logit_bias(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    entries = [(i, token, bias) for i, row in enumerate(rows) for token, bias in (row.params.logit_bias or {}).items()]
    if entries:
        r, t, b = zip(*entries)
        index = (torch.tensor(r, device=x.device), torch.tensor(t, device=x.device))
        x.index_put_(index, torch.tensor(b, dtype=x.dtype, device=x.device), accumulate=True)


def _apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    short = [i for i, row in enumerate(rows) if len(row.output_token_ids) < row.params.min_tokens]
    if not short:
        return
    # finite logits per row, in one pass (and one device sync) for all of them: where a grammar's mask left
    # only stop tokens, the output is complete, and that outranks min_tokens (masking the stops too would leave
    # nothing to sample)
    finite = torch.isfinite(x[short])
    counts = finite.sum(dim=1).tolist()
    entries = []
    for j, (i, count) in enumerate(zip(short, counts)):
        row = rows[i]
        stops = (*row.eos_token_ids, *(row.params.stop_token_ids or ()))
        if count <= len(stops):   # few enough to be only stops: look (never for a whole vocabulary)
            allowed = finite[j].nonzero().flatten().tolist()
            if allowed and set(stops).issuperset(allowed):
                continue
        entries += [(i, token) for token in stops]
    if entries:
        r, t = zip(*entries)
        x[torch.tensor(r, device=x.device), torch.tensor(t, device=x.device)] = NEG_INF


def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Penalties on the subset of rows that asks for any, counting tokens with one scatter_add."""
    picked = [i for i, row in enumerate(rows) if _penalized(row.params)]
    if not picked:
        return
    params = [rows[i].params for i in picked]
    vocab_size = x.shape[-1]
    logits = x[picked]
    output_counts = _token_counts([rows[i].output_token_ids for i in picked], vocab_size, x.device)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = output_counts + _token_counts([rows[i].prompt_token_ids for i in picked], vocab_size, x.device) > 0
        # Clamped to finite fp32: a penalty that rounds to 0 or inf would make 0 * inf = NaN on some logit.
        penalty = _column([p.repetition_penalty for p in params], x).clamp_(torch.finfo(x.dtype).tiny, FLOAT_MAX)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    if any(p.frequency_penalty != 0.0 for p in params):
        logits -= _column([p.frequency_penalty for p in params], x) * output_counts
    if any(p.presence_penalty != 0.0 for p in params):
        logits -= _column([p.presence_penalty for p in params], x) * (output_counts > 0)
    x[picked] = _overflow_to_top(logits)


def _overflow_to_top(x: torch.Tensor) -> torch.Tensor:
    """Rows that overflowed to +inf keep only their +inf tokens, as equally likely top candidates."""
    top = torch.isposinf(x)
    return torch.where(top.any(dim=-1, keepdim=True), torch.where(top, 0.0, NEG_INF), x)


def _check_rows(raw_max: torch.Tensor, best: torch.Tensor) -> None:
    """Raise FloatingPointError for rows whose raw logits hold NaN or +inf (then their max is one), or whose
    processed logits leave no token (best: the chosen or the largest processed logit; -inf or NaN)."""
    faults = [(~(raw_max < float("inf")), "the model's logits hold NaN or +inf (a fault in the forward pass)"),
              (~(best > NEG_INF), "no token is left to sample: every logit is -inf after processing")]
    for bad, message in faults:
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise FloatingPointError(message if len(bad) == 1 else f"{message}; rows {rows} of the batch")


def _token_counts(sequences: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[len(sequences), V] fp32 occurrence counts; padding goes to an extra column that is dropped."""
    width = max(1, max(map(len, sequences)))
    padded = torch.tensor([seq + [vocab_size] * (width - len(seq)) for seq in sequences], device=device)
    counts = torch.zeros(len(sequences), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]


def _apply_top_k_top_p(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    vocab_size = x.shape[-1]
    # 0 marks "off"; greedy rows are off for both.
    top_k = [0 if row.params.greedy or row.params.top_k <= 0 else min(row.params.top_k, vocab_size) for row in rows]
    top_p = [1.0 if row.params.greedy else row.params.top_p for row in rows]
    if all(p == 1.0 for p in top_p):
        if not any(top_k):
            return x
        # top_k alone: the k-th largest value is a threshold, found without sorting the whole vocabulary.
        k = _column(top_k, x, torch.long)
        kth = x.topk(max(top_k), dim=-1).values.gather(1, (k - 1).clamp_min(0))
        return x.masked_fill((x < kth) & (k > 0), NEG_INF)
    sorted_x, order = x.sort(dim=-1, descending=True)
    if any(top_k):
        k = _column([k or vocab_size for k in top_k], x, torch.long)
        sorted_x.masked_fill_(torch.arange(vocab_size, device=x.device) >= k, NEG_INF)
    # Keep a token while the mass of the tokens before it is under top_p: the smallest set reaching top_p,
    # always holding the top token. Rows with top_p == 1 use inf so float rounding in cumsum drops nothing.
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_x.masked_fill_(mass_before >= _column([p if p < 1.0 else float("inf") for p in top_p], x), NEG_INF)
    return x.scatter(1, order, sorted_x)


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor) -> list[dict[int, float] | None]:
    """Top-N logprobs of the raw model distribution (before any processing), then the sampled token."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    result: list[dict[int, float] | None] = [None] * len(rows)
    if not wanted:
        return result
    logprobs = logits[wanted].float().log_softmax(dim=-1)
    top = logprobs.topk(max(rows[i].params.logprobs for i in wanted), dim=-1)
    chosen = token_ids[wanted]
    chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    for j, (ids, values, token, value) in enumerate(
        zip(top.indices.tolist(), top.values.tolist(), chosen.tolist(), chosen_logprobs.tolist())
    ):
        n = rows[wanted[j]].params.logprobs
        entry = dict(zip(ids[:n], values[:n]))
        entry.setdefault(token, value)
        result[wanted[j]] = entry
    return result
