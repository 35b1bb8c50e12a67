"""MTP self-speculative decoding: exactness (greedy and sampled), acceptance, rollback with the pools."""
import random

import pytest
import torch

from exaserve.engine import LLM, SamplingParams
from exaserve.engine.sampler import Sampler, SamplingRow
from exaserve.engine.spec_decode import verify
from exaserve.testing import add_random_mtp, make_chain_checkpoint, make_hf_checkpoint

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def random_mtp(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec_random")
    make_hf_checkpoint(path, seed=5)
    return str(add_random_mtp(path, seed=5))


def _prompts(n, seed, lo=1, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(2, 96) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_drafts_equals_plain(random_mtp, k):
    prompts = _prompts(32, seed=k)
    plain = LLM(random_mtp, dtype="float32", max_num_seqs=32, max_num_batched_tokens=64, block_size=4)
    params = [SamplingParams(max_tokens=16, **GREEDY) for _ in prompts]
    ref = [o.outputs[0] for o in plain.generate(prompts, params)]
    # a stop string inside accepted drafts: stop at a piece of each reference text
    for i in range(0, 32, 4):
        params[i] = SamplingParams(max_tokens=16, stop=[ref[i].text[10:16]], **GREEDY)
    ref = [o.outputs[0] for o in plain.generate(prompts, params)]
    # few blocks: requests get preempted mid-way while drafts are in flight
    probe = LLM(random_mtp, dtype="float32", max_num_seqs=32, block_size=4, num_speculative_tokens=k).engine.kv
    budget = probe.ring.nbytes + 60 * probe.paged.nbytes // probe.paged.num_blocks
    llm = LLM(random_mtp, dtype="float32", max_num_seqs=32, max_num_batched_tokens=64, block_size=4,
              num_speculative_tokens=k, kv_cache_memory=budget)
    out = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    assert [o.text for o in out] == [o.text for o in ref]
    stats = llm.engine.stats()
    assert stats["drafts_proposed"] > 0 and stats["preemptions"] > 0
    assert llm.engine.kv.paged.num_free == llm.engine.kv.paged.num_blocks
    assert llm.engine.kv.ring.num_free == llm.engine.kv.ring.num_slots


def test_agreeing_mtp_is_accepted_and_random_is_not(tmp_path, random_mtp):
    path, succ = make_chain_checkpoint(tmp_path / "chain", agree=1.0)
    llm = LLM(str(path), dtype="float32", num_speculative_tokens=2)
    prompts = [[t] for t in range(5, 45, 5)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, **GREEDY))
    for p, o in zip(prompts, outs):
        expect, t = [], p[-1]
        for _ in range(40):
            t = succ[t]
            expect.append(t)
        assert o.outputs[0].token_ids == expect
    s = llm.engine.stats()
    assert min(s["acceptance_per_position"]) >= 0.95
    assert s["mean_emitted_per_verify"] > 1.9
    bad = LLM(random_mtp, dtype="float32", num_speculative_tokens=2)
    bad.generate(_prompts(8, seed=9), SamplingParams(max_tokens=20, **GREEDY))
    assert bad.engine.stats()["acceptance_per_position"][0] < 0.2


def _chi_square_p(observed, expected):
    """p-value of Pearson's chi-square statistic (bins with expected < 5 pooled), via the regularised gamma."""
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
        else:
            obs.append(o)
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_distribution_matches_plain_sampling(tmp_path, top_p):
    """The 2nd and 3rd generated tokens (produced by verification with k=2) follow the exact distribution of
    plain sampling, computed by enumerating the first tokens."""
    V = 24
    make_hf_checkpoint(tmp_path / "small", seed=11, vocab_size=V, std=0.15)
    add_random_mtp(tmp_path / "small", seed=11)
    prompt = [3, 7, 5]
    params = SamplingParams(max_tokens=3, temperature=1.0, top_p=top_p, ignore_eos=True, seed=None)
    # exact marginal of the 2nd token under plain sampling: sum over the first token
    import transformers
    model = transformers.ExaoneMoeForCausalLM.from_pretrained(str(tmp_path / "small")).float().eval()
    sampler = Sampler()

    def dist(prefixes):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + p for p in prefixes])).logits[:, -1].float()
        rows = [SamplingRow(params, prompt, p, None, []) for p in prefixes]
        return sampler.probs(logits, rows)

    p1 = dist([[]])[0]
    p2_given = dist([[a] for a in range(V)])
    p2 = (p1[:, None] * p2_given).sum(0)
    torch.manual_seed(0)
    llm = LLM(str(tmp_path / "small"), dtype="float32", max_num_seqs=256, max_num_batched_tokens=1024,
              num_speculative_tokens=2)
    n = 20000
    outs = llm.generate([prompt] * n, params)
    second = [0] * V
    for o in outs:
        second[o.outputs[0].token_ids[1]] += 1
    s = llm.engine.stats()
    assert 0.05 < s["acceptance_per_position"][0] < 0.95          # both accept and reject paths ran
    assert _chi_square_p(second, (p2 * n).tolist()) > 0.001


def test_rejection_rule_directly():
    """verify() on fixed target logits and a fixed draft: emitted first tokens follow the target."""
    V = 6
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 0.2], [0.3, 0.1, 0.0, 1.0, -1.0, 0.0]])
    params = SamplingParams(temperature=1.0, max_tokens=8)
    p = logits[0].softmax(-1)
    torch.manual_seed(1)
    counts = [0] * V
    n = 20000
    for _ in range(n):
        toks, _ = verify(Sampler(), logits, [SamplingRow(params, [1], [], None, [])], [[4]])
        counts[toks[0][0]] += 1
    assert _chi_square_p(counts, (p * n).tolist()) > 0.001


def test_seeded_spec_sampling_is_reproducible(random_mtp):
    llm = LLM(random_mtp, dtype="float32", num_speculative_tokens=2)
    p = SamplingParams(max_tokens=12, temperature=0.8, seed=42, ignore_eos=True)
    a = llm.generate([[4, 5, 6]], p)[0].outputs[0].token_ids
    b = llm.generate([[4, 5, 6], [9, 9], [7] * 30], [p, SamplingParams(max_tokens=12), p])
    assert b[0].outputs[0].token_ids == a


def test_checkpoint_without_mtp_fails_clearly(tmp_path):
    make_hf_checkpoint(tmp_path, seed=2)
    with pytest.raises(ValueError, match="MTP block"):
        LLM(str(tmp_path), dtype="float32", num_speculative_tokens=2)
