"""Sampler and SamplingParams: every processor against a plain-Python reference, seeded determinism, logprobs."""

import math

import pytest
import torch

from exaserve.engine.sampler import Sampler, SamplingRow, make_generator
from exaserve.engine.sampling_params import SamplingParams

EOS = 7


def make_row(params, prompt=(), output=(), eos=(EOS,)):
    generator = make_generator(params.seed, "cpu") if params.seed is not None else None
    return SamplingRow(params, list(prompt), list(output), generator, list(eos))


def reference_probs(logits, row):
    """The documented pipeline written out token by token."""
    p, vocab = row.params, range(len(logits))
    x = [float(v) for v in logits]
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    if len(row.output_token_ids) < p.min_tokens:
        for token in row.eos_token_ids + (p.stop_token_ids or []):
            x[token] = -math.inf
    for token in set(row.prompt_token_ids) | set(row.output_token_ids):
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(row.output_token_ids):
        x[token] -= p.frequency_penalty * row.output_token_ids.count(token) + p.presence_penalty
    if p.greedy:
        best = max(vocab, key=lambda t: x[t])
        return [1.0 if t == best else 0.0 for t in vocab]

    def softmax(values):
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        return [e / sum(exps) for e in exps]

    def keep_only(kept):
        return [x[t] if t in kept else -math.inf for t in vocab]

    x = [v / p.temperature for v in x]
    if p.top_k > 0:
        x = keep_only(set(sorted(vocab, key=lambda t: -x[t])[: p.top_k]))
    if p.top_p < 1:
        probs, kept, mass = softmax(x), set(), 0.0
        for token in sorted(vocab, key=lambda t: -x[t]):
            kept.add(token)
            mass += probs[token]
            if mass >= p.top_p:
                break
        x = keep_only(kept)
    if p.min_p > 0:
        probs = softmax(x)
        x = keep_only({t for t in vocab if probs[t] >= p.min_p * max(probs)})
    return softmax(x)


CASES = [
    (SamplingParams(temperature=0.7), (), ()),
    (SamplingParams(temperature=1.6), (), ()),
    (SamplingParams(top_k=3), (), ()),
    (SamplingParams(top_k=-1), (), ()),
    (SamplingParams(top_k=100), (), ()),
    (SamplingParams(top_p=0.6), (), ()),
    (SamplingParams(top_p=0.05), (), ()),
    (SamplingParams(min_p=0.2), (), ()),
    (SamplingParams(temperature=1.3, top_k=5, top_p=0.8, min_p=0.05), (), ()),
    (SamplingParams(repetition_penalty=1.5), (1, 2, 3, 3), (4, 2)),
    (SamplingParams(repetition_penalty=0.7, temperature=0.9), (0, 5), (6,)),
    (SamplingParams(frequency_penalty=0.5, presence_penalty=0.3), (1, 2), (2, 4, 4, 4)),
    (SamplingParams(frequency_penalty=-1.0, presence_penalty=2.0, top_k=4), (), (9, 9, 10)),
    (SamplingParams(logit_bias={2: 5.0, 4: -100.0, 11: 0.5}), (), ()),
    (SamplingParams(min_tokens=3, stop_token_ids=[5]), (), (1,)),
    (SamplingParams(min_tokens=1, stop_token_ids=[5]), (), (1, 2)),
    (SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={3: 1.0}), (3, 8), (8,)),
    (SamplingParams(top_k=1, temperature=0.5, frequency_penalty=1.0), (), (0, 0)),
]


@pytest.fixture
def batch():
    rows = [make_row(params, prompt, output) for params, prompt, output in CASES]
    logits = torch.randn(len(rows), 12, generator=torch.Generator().manual_seed(0)) * 2
    return logits, rows


def test_probs_match_reference_for_every_processor(batch):
    logits, rows = batch
    expected = torch.tensor([reference_probs(l.tolist(), row) for l, row in zip(logits, rows)])
    torch.testing.assert_close(Sampler().probs(logits, rows), expected, atol=1e-5, rtol=1e-5)
    # Alone, each row takes the paths that skip the stages nobody else in the batch needs.
    for i, row in enumerate(rows):
        torch.testing.assert_close(Sampler().probs(logits[i : i + 1], [row])[0], expected[i], atol=1e-5, rtol=1e-5)
    # Every case changes the distribution (none passes vacuously) but the no-ops: top_k=-1, top_k > V and
    # min_tokens already reached.
    unchanged = [i for i in range(len(rows)) if torch.allclose(expected[i], logits[i].softmax(-1), atol=1e-4)]
    assert unchanged == [3, 4, 15]


def test_sampled_tokens_stay_inside_the_allowed_set(batch):
    logits, rows = batch
    probs = Sampler().probs(logits, rows)
    torch.manual_seed(1)
    repeats = 300
    tokens = torch.tensor(Sampler()(logits.repeat(repeats, 1), rows * repeats).token_ids).view(repeats, len(rows))
    assert (probs.gather(1, tokens.T) > 0).all()
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    assert (tokens[:, greedy] == probs[greedy].argmax(-1)).all()


def test_a_tiny_temperature_is_greedy():
    """logits / 1e-40 would overflow to inf and sample NaN; such temperatures decode greedily."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    tiny = SamplingParams(temperature=1e-40, seed=1)
    assert tiny.greedy and not SamplingParams(temperature=1e-4).greedy
    out = Sampler()(logits, [SamplingRow(tiny, [1], [], make_generator(1, "cpu"), [])] * 3)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_is_argmax_and_consumes_no_randomness():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    rows = [make_row(SamplingParams(temperature=0)) for _ in range(3)] + [
        make_row(SamplingParams(top_k=1, seed=5)),
        make_row(SamplingParams(temperature=0, seed=6)),
    ]
    state = torch.get_rng_state()
    out = Sampler()(logits.to(torch.bfloat16), rows)
    assert out.token_ids == logits.to(torch.bfloat16).float().argmax(-1).tolist()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(rows[3].generator.get_state(), make_generator(5, "cpu").get_state())


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, EOS] = logits[0, 3] = 10.0
    params = SamplingParams(min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    early, done = make_row(params, output=[1]), make_row(params, output=[1, 2])
    probs = Sampler().probs(torch.cat([logits, logits]), [early, done])
    assert probs[0, EOS] == 0 and probs[0, 3] == 0 and probs[0].sum().item() == pytest.approx(1.0)
    assert probs[1, EOS] > 0.49 and probs[1, 3] > 0.49
    torch.manual_seed(0)
    tokens = Sampler()(logits.repeat(200, 1), [early] * 200).token_ids
    assert not {EOS, 3} & set(tokens)


def test_penalties_touch_only_their_rows_and_the_input_stays_untouched():
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    original = logits.clone()
    rows = [
        make_row(SamplingParams(temperature=0.8), prompt=[1, 2], output=[3]),
        make_row(SamplingParams(repetition_penalty=1.3, presence_penalty=1.0), prompt=[1, 2], output=[3, 3]),
        make_row(SamplingParams(), prompt=[5], output=[6]),
    ]
    processed = Sampler().process(logits, rows)
    assert processed.dtype == torch.float32 and torch.equal(logits, original)
    torch.testing.assert_close(processed[0], logits[0] / 0.8)
    torch.testing.assert_close(processed[2], logits[2])
    changed = (processed[1] != logits[1]).nonzero().flatten().tolist()
    assert changed == [1, 2, 3]


def test_empirical_frequencies_match_probs():
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.9)
    probs = Sampler().probs(logits, [make_row(params)])[0]
    torch.manual_seed(2)
    draws = 20000
    batched = torch.tensor(Sampler()(logits.expand(draws, -1), [make_row(params)] * draws).token_ids)
    assert (torch.bincount(batched, minlength=12) / draws - probs).abs().max() < 0.015
    seeded = make_row(SamplingParams(temperature=0.8, top_k=8, top_p=0.9, seed=11))
    steps = 3000
    sequential = torch.tensor([Sampler()(logits, [seeded]).token_ids[0] for _ in range(steps)])
    assert (torch.bincount(sequential, minlength=12) / steps - probs).abs().max() < 0.04


def run_requests(order, requests, step_logits, steps=6, default_seed=0):
    """Sample `steps` tokens for the requests named in `order`, one batch per step; returns name -> tokens."""
    torch.manual_seed(default_seed)
    rows = {name: make_row(requests[name], prompt=[1, 2, 3]) for name in order}
    sampler = Sampler()
    for step in range(steps):
        logits = torch.stack([step_logits[name][step] for name in order])
        out = sampler(logits, [rows[name] for name in order])
        for name, token in zip(order, out.token_ids):
            rows[name].output_token_ids.append(token)
    return {name: rows[name].output_token_ids for name in order}


def test_seeded_sampling_is_reproducible_and_batch_independent():
    requests = {
        "target": SamplingParams(seed=123, temperature=0.9, top_p=0.95),
        "other_seeded": SamplingParams(seed=7, top_k=50, frequency_penalty=0.4),
        "unseeded": SamplingParams(temperature=1.2, repetition_penalty=1.2),
        "greedy": SamplingParams(temperature=0, seed=9),
        "other_seed": SamplingParams(seed=124, temperature=0.9, top_p=0.95),
    }
    gen = torch.Generator().manual_seed(8)
    step_logits = {name: torch.randn(6, 500, generator=gen) for name in requests}
    step_logits["other_seed"] = step_logits["target"]
    alone = run_requests(["target"], requests, step_logits)["target"]
    orders = [
        ["target", "other_seeded", "unseeded", "greedy"],
        ["greedy", "unseeded", "other_seeded", "target"],
        ["unseeded", "target", "greedy"],
    ]
    for default_seed, order in enumerate(orders, start=1):
        assert run_requests(order, requests, step_logits, default_seed=default_seed)["target"] == alone
    first, second = (run_requests(o, requests, step_logits)["other_seeded"] for o in orders[:2])
    assert first == second
    assert run_requests(["other_seed"], requests, step_logits)["other_seed"] != alone


def test_logprobs_come_from_raw_logits_with_the_sampled_token_last():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 4).to(torch.bfloat16)
    raw = logits.float().log_softmax(-1)
    forced = {5: 100.0}  # processing forces token 5; its logprob must still be the raw one
    rows = [
        make_row(SamplingParams(logprobs=0, temperature=0.5, logit_bias=forced)),
        make_row(SamplingParams(logprobs=3, logit_bias=forced, seed=1)),
        make_row(SamplingParams(logprobs=3, temperature=0)),
        make_row(SamplingParams(temperature=0)),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids == [5, 5, 0, 0]
    assert out.logprobs[0] == {5: pytest.approx(raw[0, 5].item())}
    assert list(out.logprobs[1]) == [0, 1, 2, 5]
    assert list(out.logprobs[1].values()) == pytest.approx(raw[1, [0, 1, 2, 5]].tolist())
    assert list(out.logprobs[2]) == [0, 1, 2]
    assert out.logprobs[3] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must"),
        ({"n": 129}, "n must"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {50: 1.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: 101.0}}, "logit_bias"),
        ({"stop_token_ids": [50]}, "stop_token_ids"),
        ({"stop": ["ok", ""]}, "stop"),
    ],
)
def test_validate_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate(vocab_size=50)


def test_validate_accepts_and_normalises():
    params = SamplingParams(stop="###", top_k=-1, logit_bias={49: -100.0}, logprobs=20, min_tokens=16)
    params.validate(vocab_size=50)
    assert params.stop == ["###"]
    SamplingParams(logit_bias={10_000: 1.0}).validate()  # no vocabulary to check against
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


# Token 5 is EOS here; every token but 0 is in the prompt. Token 3's logit is 0: 0 * inf was NaN.
EXTREME_LOGITS = [-1.0, 5.0, 6.0, 0.0, 4.5, 2.0]


def extreme_row(**kwargs):
    return make_row(SamplingParams(min_tokens=1, **kwargs), prompt=[1, 2, 3, 4, 5], eos=[5])


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        # a penalty that rounds to 0 in fp32: the positive seen logits overflow to +inf and are the top candidates
        ({"repetition_penalty": 1e-46, "temperature": 0}, {1}),
        ({"repetition_penalty": 1e-46}, {1, 2, 4}),
        ({"repetition_penalty": 1e-46, "temperature": 1e-4}, {1, 2, 4}),
        ({"repetition_penalty": 1e-36, "temperature": 1e-4}, {1, 2, 4}),  # overflows at the temperature
        # a penalty that rounds to inf: every seen logit goes to about 0 (or -inf), the largest stays the largest
        ({"repetition_penalty": 1e300, "temperature": 0}, {2}),
        # an inf temperature: uniform over every token min_tokens leaves
        ({"temperature": 1e39}, {0, 1, 2, 3, 4}),
    ],
)
def test_extreme_settings_sample_no_nan(kwargs, allowed):
    """Overflowing settings gave NaN logits, and NaN was the argmax (here EOS, which min_tokens masks) or the
    sampled token was id 0."""
    repeats = 400
    rows = [extreme_row(**kwargs) for _ in range(repeats)]
    logits = torch.tensor([EXTREME_LOGITS] * repeats)
    torch.manual_seed(0)
    tokens = Sampler()(logits, rows).token_ids
    assert set(tokens) == allowed
    seeded = [Sampler()(logits[:1], [extreme_row(seed=3, **kwargs)]).token_ids[0] for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0] in allowed
    probs = Sampler().probs(logits[:1], rows[:1])[0]
    assert not probs.isnan().any() and {i for i, p in enumerate(probs.tolist()) if p > 0} == allowed


def test_min_tokens_yields_when_only_stop_tokens_are_left():
    """A grammar's mask that leaves only stop tokens (the output is complete) outranks min_tokens, which would
    mask those too; where other tokens are left, min_tokens masks the stops as usual."""
    only_eos = torch.full((2, 6), float("-inf"))
    only_eos[:, 5] = 1.0
    rows = [extreme_row(temperature=0), extreme_row(temperature=0.5, seed=3)]
    assert Sampler()(only_eos, rows).token_ids == [5, 5]
    more = only_eos.clone()
    more[:, 2] = 0.0
    assert Sampler()(more, rows).token_ids == [2, 2]


def test_nan_or_inf_from_the_model_and_an_empty_row_raise():
    logits = torch.tensor([EXTREME_LOGITS] * 3)
    logits[1, 2] = float("nan")
    rows = [make_row(SamplingParams(temperature=t)) for t in (0, 1, 0)]
    for sample in (Sampler().__call__, Sampler().probs):
        with pytest.raises(FloatingPointError, match=r"NaN or \+inf .*forward pass\); rows \[1\] of the batch"):
            sample(logits, rows)
        with pytest.raises(FloatingPointError, match=r"NaN or \+inf .*forward pass\)$"):
            sample(logits[1:2] * 0 + float("inf"), rows[:1])
        # every token at -inf from the model: nothing to sample
        empty = torch.full((1, 6), float("-inf"))
        with pytest.raises(FloatingPointError, match="no token is left"):
            sample(empty, [extreme_row(temperature=0.5)])
