"""Scheduler, pools and stop conditions of the engine on tiny random checkpoints."""
import random

import pytest

from exaserve.engine import LLM, SamplingParams
from exaserve.engine.tiny import make_tiny_checkpoint
from exaserve.testing import make_hf_checkpoint

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_tiny")
    make_hf_checkpoint(path, seed=3)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tok")))


def _random_prompts(n, seed, lo=1, hi=60, vocab=96):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _solo(model_dir, prompts, max_tokens):
    llm = LLM(model_dir, dtype="float32", max_num_seqs=1, max_num_batched_tokens=4096, block_size=4)
    return [llm.generate([p], SamplingParams(max_tokens=max_tokens, **GREEDY))[0].outputs[0].token_ids
            for p in prompts]


def _pools_empty(llm):
    kv = llm.engine.kv
    assert kv.paged.num_free == kv.paged.num_blocks
    assert kv.ring.num_free == kv.ring.num_slots
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting
    assert not llm.engine.requests


def test_batch_invariance_with_chunked_prefill(model_dir):
    # 32 prompts of random length (window is 8, block size 4: many cross the window and span many blocks)
    prompts = _random_prompts(32, seed=0)
    solo = _solo(model_dir, prompts, 12)
    llm = LLM(model_dir, dtype="float32", max_num_seqs=32, max_num_batched_tokens=20, block_size=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == solo
    assert llm.engine.counters["steps"] > 32          # the budget of 20 tokens really forced chunking
    _pools_empty(llm)


def test_preemption_keeps_outputs_and_frees_everything(model_dir):
    prompts = _random_prompts(12, seed=1, lo=10, hi=40)
    solo = _solo(model_dir, prompts, 24)
    # 40 blocks of 4 tokens cannot hold 12 sequences of up to 64 tokens: forces preemption by recompute
    probe = LLM(model_dir, dtype="float32", max_num_seqs=12, block_size=4).engine.kv
    budget = probe.ring.nbytes + 40 * probe.paged.nbytes // probe.paged.num_blocks
    llm = LLM(model_dir, dtype="float32", max_num_seqs=12, max_num_batched_tokens=64, block_size=4,
              kv_cache_memory=budget)
    assert llm.engine.kv.paged.num_blocks == 40 - 40 // 8     # prefix caching: 1/8 goes to ring snapshots
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == solo
    assert llm.engine.scheduler.num_preemptions > 0
    _pools_empty(llm)


def test_abort_half_midflight_frees_everything(model_dir):
    prompts = _random_prompts(10, seed=2, lo=5, hi=30)
    solo = _solo(model_dir, prompts, 16)
    llm = LLM(model_dir, dtype="float32", max_num_seqs=10, max_num_batched_tokens=64, block_size=4)
    core = llm.engine
    reqs = [core.add_request(f"r{i}", p, SamplingParams(max_tokens=16, **GREEDY)) for i, p in enumerate(prompts)]
    for _ in range(5):
        core.step()
    aborted = [r for i, r in enumerate(reqs) if i % 2]
    for r in aborted:
        d = core.abort(r.request_id)
        assert d.finished and d.finish_reason == "abort"
    while core.has_unfinished():
        core.step()
    for i, r in enumerate(reqs):
        if i % 2 == 0:
            assert r.output_token_ids == solo[i]
        else:
            assert r.finish_reason == "abort" and r.output_token_ids == solo[i][: len(r.output_token_ids)]
    assert core.counters["aborted"] == 5
    _pools_empty(llm)


def test_sliding_memory_does_not_grow_with_prompt_or_chunk(model_dir):
    small = LLM(model_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=16)
    large = LLM(model_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512)
    assert small.engine.kv.ring.nbytes == large.engine.kv.ring.nbytes
    assert small.engine.kv.ring.ring_len == 8          # the window: no speculative rollback configured
    # and a sequence that runs 4x past the window still holds exactly one ring slot
    small.generate([[5] * 30], SamplingParams(max_tokens=4, **GREEDY))
    assert small.engine.kv.ring.num_free == small.engine.kv.ring.num_slots


def test_max_tokens_and_model_len_limits(model_dir):
    llm = LLM(model_dir, dtype="float32", max_model_len=64)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) plus max_tokens \(10\).*max_model_len \(64\)"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 1000]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))


def test_eos_stop_tokens_min_tokens(model_dir):
    llm = LLM(model_dir, dtype="float32")
    prompt = [9, 8, 7, 6]
    ref = llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0].token_ids
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # the model's EOS ids: make the stop token an EOS id
    llm.engine.model_config.eos_token_ids.append(stop_tok)
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
        assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason is None
        ignored = llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0]
        assert ignored.token_ids == ref
        # min_tokens masks EOS until reached: the output is at least that long
        out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, min_tokens=first + 3))[0].outputs[0]
        assert len(out.token_ids) >= first + 3 and stop_tok not in out.token_ids[: first + 3 - 1]
    finally:
        llm.engine.model_config.eos_token_ids.remove(stop_tok)


def test_stop_strings_cut_text(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32")
    params = SamplingParams(max_tokens=30, **GREEDY)
    full = llm.generate(["The weather in Seoul"], params)[0].outputs[0]
    assert full.text == llm.tokenizer.decode(full.token_ids)
    stop = full.text[8:11]
    cut = llm.generate(["The weather in Seoul"], SamplingParams(max_tokens=30, stop=[stop], **GREEDY))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = llm.generate(["The weather in Seoul"], SamplingParams(max_tokens=30, stop=[stop],
                                                                 include_stop_str_in_output=True, **GREEDY))
    assert kept[0].outputs[0].text == full.text[: full.text.index(stop) + len(stop)]


def test_streamed_deltas_add_up(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32")
    core = llm.engine
    full = llm.generate(["Cooking rice"], SamplingParams(max_tokens=25, **GREEDY))[0].outputs[0]
    stop = full.text[10:13]
    core.add_request("s", llm.tokenizer.encode("Cooking rice"), SamplingParams(max_tokens=25, stop=[stop], **GREEDY))
    pieces, ids = [], []
    while core.has_unfinished():
        for d in core.step():
            pieces.append(d.text)
            ids += d.token_ids
    assert "".join(pieces) == full.text[: full.text.index(stop)]
    assert ids == full.token_ids[: len(ids)]


def test_seeded_sampling_is_batch_independent(model_dir):
    llm = LLM(model_dir, dtype="float32", max_num_seqs=8)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([[3, 4, 5]], p)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 3
    batch = llm.generate([[7, 8], [3, 4, 5], [9] * 20, [11, 12]], [others[0], p, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
