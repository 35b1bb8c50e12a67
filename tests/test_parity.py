"""Numerical parity with transformers.ExaoneMoeForCausalLM (float32)."""
import random

import pytest

from exaserve.engine import LLM, SamplingParams
from exaserve.testing import hf_greedy, make_hf_checkpoint

GEN = 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    model = make_hf_checkpoint(path)
    return path, model


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """GQA group 4, top-4 of 16 experts, two global layers, 2 shared experts, group-limited routing."""
    path = tmp_path_factory.mktemp("hf_tiny_gqa")
    model = make_hf_checkpoint(path, seed=1, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                               num_hidden_layers=5, layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention", "sliding_attention",
                                                                 "full_attention"],
                               num_experts=16, num_experts_per_tok=4, num_shared_experts=2, n_group=4, topk_group=2,
                               sliding_window=6)
    return path, model


def _prompts(n, vocab, seed, lo=3, hi=30):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _check(llm, model, prompts):
    params = SamplingParams(max_tokens=GEN, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(model, prompt, GEN)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens
        got_lps = [lp[t] for lp, t in zip(got.logprobs, got.token_ids)]
        assert max(abs(a - b) for a, b in zip(got_lps, ref_lps)) < 1e-4
        assert got.finish_reason == "length"


def test_single_request_matches_transformers(checkpoint):
    path, model = checkpoint
    llm = LLM(str(path), dtype="float32", max_num_seqs=4, max_num_batched_tokens=64)
    # a prompt longer than the window (8) and generation far past it
    _check(llm, model, _prompts(1, 96, seed=0, lo=20, hi=20))


def test_batch_of_mixed_lengths_matches_transformers(checkpoint):
    path, model = checkpoint
    llm = LLM(str(path), dtype="float32", max_num_seqs=8, max_num_batched_tokens=48)
    _check(llm, model, _prompts(8, 96, seed=1))


def test_gqa_grouped_routing_matches_transformers(gqa_checkpoint):
    path, model = gqa_checkpoint
    llm = LLM(str(path), dtype="float32", max_num_seqs=8, max_num_batched_tokens=32, block_size=4)
    _check(llm, model, _prompts(8, 96, seed=2))
