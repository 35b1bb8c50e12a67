"""A fault met by one request in a step (sampling, stop handling, its output) fails that request alone: the others
keep exactly their tokens, the engine keeps serving, and every KV block and ring slot goes back."""
import pytest

from exaserve.engine import LLM, SamplingParams
from exaserve.testing import add_random_mtp, make_hf_checkpoint

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults")
    make_hf_checkpoint(path, seed=7)
    return str(add_random_mtp(path, seed=7))


def _run(core, requests, fault=None, fault_at=2):
    """Add (request id, prompt, params) triples, step to the end; `fault(core)` runs after `fault_at` steps.
    Returns request id -> (token ids, the final delta)."""
    tokens, last = {}, {}
    for rid, prompt, params in requests:
        core.add_request(rid, prompt, params)
        tokens[rid] = []
    steps = 0
    while core.has_unfinished():
        if fault is not None and steps == fault_at:
            fault(core)
        for d in core.step():
            tokens[d.request_id] += d.token_ids
            if d.finished:
                last[d.request_id] = d
        steps += 1
    return {rid: (tokens[rid], last[rid]) for rid in tokens}


def _assert_all_returned(core):
    s = core.stats()
    assert s["blocks_used"] == 0 and s["ring_slots_used"] == 0 and s["running"] == 0 and s["waiting"] == 0
    assert not core.requests


def _nan_logits_for(params):
    """A sampler wrapper that gives the rows of `params` NaN logits, as a faulty forward pass would."""
    def wrap(sample):
        def faulty(logits, rows):
            bad = [i for i, row in enumerate(rows) if row.params is params]
            if bad:
                logits = logits.clone()
                logits[bad, 3] = float("nan")
            return sample(logits, rows)
        return faulty
    return wrap


@pytest.mark.parametrize("seeded", [False, True])
def test_nan_logits_fail_only_their_request(model_dir, seeded):
    """The NaN row is only found after the batch drew its noise: seeded rows sampled again alone must rewind their
    generators to get the tokens they get without the faulty request."""
    llm = LLM(model_dir, dtype="float32", max_num_seqs=8)
    core = llm.engine

    def params(i):
        # logprobs: the step goes through the sampler (a plain greedy batch on the C++ path skips it)
        return (SamplingParams(max_tokens=8, temperature=0.9, seed=100 + i, ignore_eos=True) if seeded
                else SamplingParams(max_tokens=8, logprobs=0, **GREEDY))

    good = [(f"g{i}", p, params(i)) for i, p in enumerate(PROMPTS[:3])]
    reference = _run(core, good)
    bad = SamplingParams(max_tokens=8, logprobs=0, **GREEDY)
    sample = core.runner.sampler
    core.runner.sampler = _nan_logits_for(bad)(sample)
    try:
        good = [(f"g{i}", p, params(i)) for i, p in enumerate(PROMPTS[:3])]
        out = _run(core, [good[0], ("bad", PROMPTS[3], bad), *good[1:]])
    finally:
        core.runner.sampler = sample
    for rid, (tokens, _) in reference.items():
        assert out[rid][0] == tokens and out[rid][1].finish_reason == "length" and out[rid][1].error is None
    tokens, delta = out["bad"]
    assert tokens == [] and delta.finished and delta.finish_reason == "error"
    assert "FloatingPointError" in delta.error and "NaN or +inf" in delta.error
    assert core.stats()["failed"] == 1
    _assert_all_returned(core)
    assert _run(core, good[:1])["g0"][0] == reference["g0"][0]        # and it goes on serving


def test_a_params_fault_mid_decode_fails_only_its_request(model_dir):
    """A logit_bias token outside the vocabulary (set after validation) makes the batched sampler raise
    IndexError; the request fails after the tokens it already had."""
    llm = LLM(model_dir, dtype="float32", max_num_seqs=8)
    core = llm.engine
    good = [(f"g{i}", p, SamplingParams(max_tokens=6, logprobs=1, **GREEDY)) for i, p in enumerate(PROMPTS[:3])]
    reference = _run(core, good)
    bad = SamplingParams(max_tokens=6, **GREEDY)

    def break_params(_):
        bad.logit_bias = {10 ** 6: 1.0}

    out = _run(core, [("bad", PROMPTS[3], bad), *good], fault=break_params, fault_at=2)
    for rid, (tokens, _) in reference.items():
        assert out[rid][0] == tokens
    tokens, delta = out["bad"]
    assert len(tokens) == 2 and delta.finish_reason == "error" and "IndexError" in delta.error
    _assert_all_returned(core)


@pytest.mark.parametrize("where, message", [("add", "applying the step failed: KeyError: 'injected'"),
                                            ("delta", "building the output failed: KeyError: 'injected'")])
def test_a_detokenizer_fault_fails_only_its_request(model_dir, where, message):
    llm = LLM(model_dir, dtype="float32", max_num_seqs=8)
    core = llm.engine
    good = [(f"g{i}", p, SamplingParams(max_tokens=6, **GREEDY)) for i, p in enumerate(PROMPTS[:3])]
    reference = _run(core, good)

    def break_detokenizer(core):
        setattr(core.requests["bad"].detok, where, lambda *a: (_ for _ in ()).throw(KeyError("injected")))

    out = _run(core, [*good[:2], ("bad", PROMPTS[3], SamplingParams(max_tokens=6, **GREEDY)), good[2]],
               fault=break_detokenizer)
    for rid, (tokens, _) in reference.items():
        assert out[rid][0] == tokens
    assert out["bad"][1].finish_reason == "error" and out["bad"][1].error == message
    _assert_all_returned(core)


def test_nan_logits_while_verifying_drafts_fail_only_their_request(model_dir):
    llm = LLM(model_dir, dtype="float32", max_num_seqs=8, num_speculative_tokens=2)
    core = llm.engine
    good = [(f"g{i}", p, SamplingParams(max_tokens=10, **GREEDY)) for i, p in enumerate(PROMPTS[:3])]
    reference = _run(core, good)
    bad = SamplingParams(max_tokens=10, **GREEDY)
    sampler = core.runner.sampler
    sampler.probs = _nan_logits_for(bad)(sampler.probs)
    try:
        out = _run(core, [*good, ("bad", PROMPTS[3], bad)])
    finally:
        del sampler.probs
    for rid, (tokens, _) in reference.items():
        assert out[rid][0] == tokens
    assert out["bad"][1].finish_reason == "error" and "NaN or +inf" in out["bad"][1].error
    assert core.stats()["drafts_proposed"] > 0
    _assert_all_returned(core)


def test_a_fault_of_the_whole_batch_raises_and_the_engine_recovers(model_dir):
    llm = LLM(model_dir, dtype="float32", max_num_seqs=8)
    core = llm.engine
    params = SamplingParams(max_tokens=4, **GREEDY)
    expected = llm.generate(PROMPTS, params)
    runner = core.runner
    owner, name = (runner.cpu_model, "rows_step") if runner.cpu_model is not None else (runner, "forward")
    run = getattr(owner, name)
    setattr(owner, name, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected forward fault")))
    try:
        with pytest.raises(RuntimeError, match="injected forward fault"):
            llm.generate(PROMPTS, params)
    finally:
        setattr(owner, name, run)
    _assert_all_returned(core)          # generate aborted what it had added
    assert [o.outputs for o in llm.generate(PROMPTS, params)] == [o.outputs for o in expected]


def test_a_non_finite_hidden_state_on_the_cpp_greedy_path_fails_only_its_request(model_dir):
    """A plain greedy batch takes its tokens straight from the C++ step (no logits reach the sampler): a row
    whose hidden state is NaN gets no token (-1 from C++) and its request fails; the others keep theirs."""
    llm = LLM(model_dir, dtype="float32", max_num_seqs=8)
    core = llm.engine
    if core.runner.cpu_model is None:
        pytest.skip("the C++ CPU kernels are not available here")
    params = SamplingParams(max_tokens=8, **GREEDY)
    good = [(f"g{i}", p, params) for i, p in enumerate(PROMPTS[:3])]
    reference = _run(core, good)
    poisoned = 40                                    # a token only the bad prompt holds
    assert all(poisoned not in p for p in PROMPTS[:3])
    row = core.model.embed.data[poisoned].clone()
    core.model.embed.data[poisoned] = float("nan")
    try:
        out = _run(core, [good[0], ("bad", [41, poisoned, 42], params), *good[1:]])
    finally:
        core.model.embed.data[poisoned] = row
    for rid, (tokens, _) in reference.items():
        assert out[rid][0] == tokens and out[rid][1].error is None
    tokens, delta = out["bad"]
    assert tokens == [] and delta.finish_reason == "error" and "not finite" in delta.error
    _assert_all_returned(core)
