"""Prefix caching over both KV pools (engine/kv_cache.py, engine/scheduler.py): outputs with the cache equal
outputs without it (greedy tokens, float32 logprobs within 1e-4, and the MTP drafts), on the C++ and the torch
paths, with MTP, chunked prefill, preemption, abort, n > 1 and tensor parallel; eviction; reference counts;
counters; the HTTP surface (usage.prompt_tokens_details.cached_tokens, /metrics, /reset_prefix_cache)."""
import asyncio
import random

import httpx
import pytest

from exaserve.engine import LLM, SamplingParams
from exaserve.engine.kv_cache import KVCache, block_hashes
from exaserve.testing import add_random_mtp, make_hf_checkpoint, quantize_fp8

BS = 4          # block size; the checkpoint's window is 8 (make_hf_checkpoint)
WINDOW = 8
pytest_plugins = ["server_fixture"]

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix_cache")
    make_hf_checkpoint(path, seed=5)
    return str(add_random_mtp(path, seed=5))


def _rounds(seed=0):
    """Prompts in rounds (one generate call each, so later rounds can hit what earlier ones cached), with the
    hit each should get: 40 shared tokens, then prompts whose hit ends inside a block, inside the first window,
    at the end of a prompt seen before (identical, and one a multiple of the block size), and an extension."""
    rng = random.Random(seed)
    base = [rng.randrange(2, 96) for _ in range(40)]
    first = base + [rng.randrange(2, 96) for _ in range(7)]                 # 47 tokens: 11 full blocks
    second = [
        (base[:22] + [rng.randrange(2, 96) for _ in range(5)], 20),        # shares 22: the hit ends at 20
        (base[:6] + [rng.randrange(2, 96) for _ in range(3)], 4),          # hit 4 < window
        (list(first), 44),                                                 # the same prompt: all but its end
        (base[:40], 36),                                                   # 40 = 10 blocks: the last is computed
        (first + [rng.randrange(2, 96) for _ in range(9)], 44),            # an extension
    ]
    return [[(first, 0)], second]


def _run(path, rounds, caching, params=GREEDY, **kw):
    """Outputs of every round, and the MTP drafts: {(engine request, position of the first draft): drafts}."""
    llm = LLM(path, dtype="float32", block_size=BS, enable_prefix_caching=caching, **kw)
    drafts = {}
    if llm.engine.num_speculative_tokens:
        propose = llm.engine.runner.propose

        def recording(batch, result):
            out = propose(batch, result)
            for r, d, emitted in zip(batch.requests, out, result.tokens):
                if d:
                    drafts[r.request_id, r.num_tokens + len(emitted)] = list(d)
            return out

        llm.engine.runner.propose = recording
    outs = []
    try:
        for prompts in rounds:
            outs += llm.generate([p for p, _ in prompts], params, use_tqdm=False)
    finally:
        llm.engine.close()
    return llm, outs, drafts


def _assert_same(ref, out):
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        for x, y in zip(a.outputs, b.outputs):
            assert y.token_ids == x.token_ids
            if x.logprobs is not None:
                assert max(abs(lx[t] - ly[t]) for lx, ly, t in zip(x.logprobs, y.logprobs, x.token_ids)) < 1e-4


def _assert_same_drafts(ref, out):
    """Drafts made at the same position are the same (the MTP block's ring was restored exactly). A chunk that
    ends one token before its prompt's end drafts too, so where a hit moved the chunk boundaries one run may
    draft once more at the end of a prompt: the runs must agree on all other positions."""
    common = ref.keys() & out.keys()
    assert all(out[key] == ref[key] for key in common)
    requests = {rid for rid, _ in ref}
    assert len(common) >= len(ref) - len(requests) > 0


def _assert_released(llm):
    """Every reference went back: the free counts are the pools' sizes (cached blocks count as free)."""
    kv, sched = llm.engine.kv, llm.engine.scheduler
    assert kv.paged.num_free == kv.paged.num_blocks
    assert kv.ring.num_free == kv.ring.num_slots
    assert len(kv.ring._snap_free) + len(kv.ring.snapshots) == kv.ring.num_snapshot_blocks
    assert not sched._in_flight and not sched.running and not sched.waiting and not llm.engine.requests


@pytest.mark.parametrize("kernels,k,chunk", [(None, 0, 64), (None, 0, 5), (None, 1, 64), (None, 2, 5),
                                             (None, 3, 64), (None, 4, 7), ("torch", 2, 64)],
                         ids=["cpp-k0", "cpp-k0-chunk5", "cpp-k1", "cpp-k2-chunk5", "cpp-k3", "cpp-k4-chunk7",
                              "torch-k2"])
def test_hits_equal_no_cache(checkpoint, kernels, k, chunk):
    rounds = _rounds()
    kw = dict(kernels=kernels, num_speculative_tokens=k, max_num_batched_tokens=chunk)
    _, ref, ref_drafts = _run(checkpoint, rounds, False, **kw)
    llm, out, drafts = _run(checkpoint, rounds, True, **kw)
    _assert_same(ref, out)
    if k:
        _assert_same_drafts(ref_drafts, drafts)
    expected = [hit for prompts in rounds for _, hit in prompts]
    assert [o.num_cached_tokens for o in out] == expected
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] == sum(expected)
    assert stats["prefix_cache_queries"] == sum(len(p) for prompts in rounds for p, _ in prompts)
    if not k:   # (with drafts, a step that verifies them after a prompt's last token counts them as prompt tokens)
        assert stats["prompt_tokens"] == stats["prefix_cache_queries"] - stats["prefix_cache_hits"]
    _assert_released(llm)


def test_fp8_checkpoint_hits_equal_no_cache(checkpoint, tmp_path):
    quantize_fp8(checkpoint, tmp_path / "fp8", tmp_path / "deq", block=(16, 16))
    rounds = _rounds(seed=4)
    kw = dict(num_speculative_tokens=2, max_num_batched_tokens=16)
    _, ref, ref_drafts = _run(str(tmp_path / "fp8"), rounds, False, **kw)
    llm, out, drafts = _run(str(tmp_path / "fp8"), rounds, True, **kw)
    _assert_same(ref, out)
    _assert_same_drafts(ref_drafts, drafts)
    assert [o.num_cached_tokens for o in out] == [hit for prompts in rounds for _, hit in prompts]
    _assert_released(llm)


def test_off_caches_nothing(checkpoint):
    llm, out, _ = _run(checkpoint, _rounds(), False)
    stats = llm.engine.stats()
    assert stats["prefix_cache_queries"] == stats["prefix_cache_hits"] == stats["cached_blocks"] == 0
    assert llm.engine.kv.ring.num_snapshot_blocks == 0
    assert all(o.num_cached_tokens == 0 for o in out)


def test_n_choices_share_one_prefill(checkpoint):
    """The 3 choices of one request (and a second request with the same prompt) arrive together: one computes
    the prompt's full blocks, the others wait for them and reuse them."""
    rng = random.Random(7)
    prompt = [rng.randrange(2, 96) for _ in range(30)]          # 7 full blocks; a hit can reach 28
    params = SamplingParams(n=3, max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    rounds = [[(prompt, 0), (list(prompt), 28)]]
    _, ref, _ = _run(checkpoint, rounds, False, params, max_num_batched_tokens=8)
    llm, out, _ = _run(checkpoint, rounds, True, params, max_num_batched_tokens=8)
    _assert_same(ref, out)
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] == 5 * 28          # all but the first of the 6 engine requests
    assert stats["prompt_tokens"] == 30 + 5 * 2
    assert [o.num_cached_tokens for o in out] == [0, 28]
    _assert_released(llm)


def test_preemption_and_eviction_under_a_full_pool(checkpoint):
    """A pool so small that cached prefixes fill it and running requests get preempted: new requests are still
    admitted (cached blocks are evicted), outputs stay exact, and every reference goes back."""
    rng = random.Random(3)
    shared = [rng.randrange(2, 96) for _ in range(24)]
    prompts = [shared[:rng.randint(8, 24)] + [rng.randrange(2, 96) for _ in range(rng.randint(1, 20))]
               for _ in range(16)]
    probe = LLM(checkpoint, dtype="float32", block_size=BS, max_num_seqs=8, num_speculative_tokens=2).engine.kv
    # 105 blocks (8 requests may need 152) and the rest, a few snapshot blocks
    budget = probe.ring.nbytes + 120 * probe.paged.nbytes // probe.paged.num_blocks
    kw = dict(max_num_seqs=8, max_num_batched_tokens=32, kv_cache_memory=budget, num_speculative_tokens=2)
    params = SamplingParams(max_tokens=32, temperature=0.0, logprobs=0, ignore_eos=True)
    rounds = [[(p, None) for p in prompts[:8]], [(p, None) for p in prompts[8:]], [(p, None) for p in prompts[:8]]]
    _, ref, ref_drafts = _run(checkpoint, rounds, False, params, **kw)
    llm, out, drafts = _run(checkpoint, rounds, True, params, **kw)
    _assert_same(ref, out)
    _assert_same_drafts(ref_drafts, drafts)
    stats = llm.engine.stats()
    kv = llm.engine.kv
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    # the pool cannot hold every prompt's blocks: some were evicted to admit later requests
    distinct_blocks = {h for p in prompts for h in block_hashes(p, BS)}
    assert kv.paged.num_cached < len(distinct_blocks) and kv.paged.num_cached <= kv.paged.num_blocks
    assert kv.ring.num_snapshot_blocks > 0
    _assert_released(llm)


def test_abort_mid_prefill_returns_every_reference(checkpoint):
    """A request aborted while its prompt is half computed gives back its blocks and snapshot blocks; what it
    registered before stays usable and exact."""
    rng = random.Random(11)
    prompt = [rng.randrange(2, 96) for _ in range(60)]
    llm = LLM(checkpoint, dtype="float32", block_size=BS, max_num_batched_tokens=12)
    free = llm.engine.kv.paged.num_free
    llm.engine.add_request("a", prompt, GREEDY)
    for _ in range(3):
        llm.engine.step()
    assert 0 < llm.engine.requests["a"].num_computed_tokens < len(prompt)
    llm.engine.abort("a")
    _assert_released(llm)
    assert llm.engine.kv.paged.num_free == free and llm.engine.kv.paged.num_cached == 36 // BS
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    ref = LLM(checkpoint, dtype="float32", block_size=BS, enable_prefix_caching=False).generate(
        [prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 36
    _assert_same([ref], [out])
    _assert_released(llm)


def test_reset_forgets_and_snapshot_region_is_sized_from_the_budget(checkpoint):
    rounds = _rounds()
    llm = LLM(checkpoint, dtype="float32", block_size=BS)
    llm.generate([p for p, _ in rounds[0]], GREEDY, use_tqdm=False)
    assert llm.engine.kv.paged.num_cached > 0 and llm.engine.kv.ring.snapshots
    llm.reset_prefix_cache()
    assert llm.engine.kv.paged.num_cached == 0 and not llm.engine.kv.ring.snapshots
    assert llm.generate([p for p, _ in rounds[0]], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    _assert_released(llm)
    cfg, kv = llm.engine.model_config, llm.engine.kv
    # the snapshot region: 1/8 of what the rings leave when the blocks could use it all, what the blocks leave
    # (up to as many snapshot blocks as blocks) when max_num_seqs full-length sequences need fewer blocks
    budget = 1 << 20
    for max_model_len, share in ((4096, 1 / 8), (512, None)):
        kv = KVCache.create(cfg, kv_cache_memory=budget, max_num_seqs=4, max_model_len=max_model_len, block_size=BS,
                            prefix_caching=True)
        rest = budget - kv.ring.nbytes
        assert kv.ring.nbytes + kv.ring.snapshot_nbytes + kv.paged.nbytes <= budget
        assert 0 < kv.ring.num_snapshot_blocks <= kv.paged.num_blocks
        if share is not None:
            slot = kv.ring.nbytes // kv.ring.num_slots
            assert rest * share - 2 * slot <= kv.ring.snapshot_nbytes <= rest * share
        else:
            assert kv.paged.num_blocks == 4 * 512 // BS and kv.ring.snapshot_nbytes > rest / 8


def test_tensor_parallel_hits_equal_one_rank_without_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix_tp")
    make_hf_checkpoint(path, seed=3, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    add_random_mtp(path, seed=3)
    rounds = _rounds(seed=2)
    kw = dict(num_speculative_tokens=2, max_num_batched_tokens=16)
    _, ref, ref_drafts = _run(str(path), rounds, False, **kw)
    llm, out, drafts = _run(str(path), rounds, True, tensor_parallel_size=2, **kw)
    _assert_same(ref, out)
    _assert_same_drafts(ref_drafts, drafts)
    assert [o.num_cached_tokens for o in out] == [hit for prompts in rounds for _, hit in prompts]


def test_http_usage_metrics_and_reset(tiny_model):
    """cached_tokens in usage (chat and completions, streamed or not), the /metrics counters, and POST
    /reset_prefix_cache behind the API key, on an in-process app over a real AsyncEngine."""
    from exaserve.engine import AsyncEngine
    from exaserve.server.app import build_app

    engine = AsyncEngine(str(tiny_model), dtype="float32", block_size=BS)
    app = build_app(engine, served_model_name="m", api_key="k")
    auth = {"Authorization": "Bearer k"}
    chat = {"messages": [{"role": "system", "content": "You are a careful assistant. " * 6},
                         {"role": "user", "content": "Hello there"}], "max_tokens": 2}
    prompt = "The quick brown fox jumps over the lazy dog. " * 4

    async def scenario(client):
        async def usage(path, body, stream=False):
            if not stream:
                r = await client.post(path, json=body, headers=auth)
                assert r.status_code == 200, r.text
                return r.json()["usage"]
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", path, json=body, headers=auth) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
            import json
            return json.loads(lines[-1][6:])["usage"]

        first = await usage("/v1/chat/completions", chat)
        again = await usage("/v1/chat/completions", chat, stream=True)
        n2 = await usage("/v1/completions", {"prompt": prompt, "max_tokens": 2, "n": 2})
        n2_again = await usage("/v1/completions", {"prompt": prompt, "max_tokens": 2, "n": 2}, stream=True)
        metrics = (await client.get("/metrics")).text
        stats = engine.stats()
        denied = await client.post("/reset_prefix_cache")
        reset = await client.post("/reset_prefix_cache", headers=auth)
        after = await usage("/v1/chat/completions", chat)
        return first, again, n2, n2_again, metrics, stats, denied, reset, after

    async def main():
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            return await scenario(client)

    try:
        first, again, n2, n2_again, metrics, stats, denied, reset, after = asyncio.run(main())
    finally:
        engine.shutdown()
    n = first["prompt_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["prompt_tokens"] == n and again["prompt_tokens_details"]["cached_tokens"] == (n - 1) // BS * BS
    m = n2["prompt_tokens"]
    assert n2["prompt_tokens_details"]["cached_tokens"] == 0      # the two choices share one prefill
    assert n2_again["prompt_tokens_details"]["cached_tokens"] == (m - 1) // BS * BS
    assert f"exaserve_prefix_cache_hits_total {stats['prefix_cache_hits']}" in metrics
    assert f"exaserve_prefix_cache_queries_total {stats['prefix_cache_queries']}" in metrics
    assert stats["prefix_cache_hits"] >= 2 * ((n - 1) // BS * BS) > 0
    assert denied.status_code == 401 and reset.status_code == 200
    assert after["prompt_tokens_details"]["cached_tokens"] == 0
