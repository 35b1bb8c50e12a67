"""Tensor and expert parallelism on CPU: gloo, worker processes on 127.0.0.1 (engine/parallel.py,
engine/distributed.py)."""
import random

import pytest
import torch

from exaserve.engine import LLM, SamplingParams
from exaserve.engine.config import ModelConfig
from exaserve.engine.loader import load_model
from exaserve.engine.parallel import Parallel
from exaserve.testing import add_random_mtp, hf_greedy, make_hf_checkpoint

GEN = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """8 q heads over 2 kv heads (tp=4 replicates kv heads in pairs), 8 experts + a shared one, vocabulary 98
    (not a multiple of 4: the last rank's vocabulary shard is padded), MTP block."""
    path = tmp_path_factory.mktemp("tp_tiny")
    model = make_hf_checkpoint(path, seed=3, vocab_size=98, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                               num_experts=8, num_experts_per_tok=2, num_shared_experts=1)
    add_random_mtp(path, seed=3)
    return path, model


def _prompts(n, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(3, 26))] for _ in range(n)]


def _run(path, prompts, **kw):
    llm = LLM(str(path), dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, **kw)
    try:
        params = SamplingParams(max_tokens=GEN, temperature=0.0, logprobs=0, ignore_eos=True)
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.close()


def _chosen_logprobs(out):
    return [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]


@pytest.mark.parametrize("kw", [dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, enable_expert_parallel=True),
                                dict(tensor_parallel_size=4),
                                dict(tensor_parallel_size=2, num_speculative_tokens=2)],
                         ids=["tp2", "tp2-ep", "tp4", "tp2-mtp2"])
def test_sharded_engine_matches_one_rank_and_transformers(checkpoint, kw):
    path, hf = checkpoint
    prompts = _prompts(6, 98, seed=1)     # more prompts than seats, chunked prefill mixed with decode
    one = _run(path, prompts, num_speculative_tokens=kw.get("num_speculative_tokens", 0))
    many = _run(path, prompts, **kw)
    for a, b in zip(one, many):
        assert b.token_ids == a.token_ids
        assert max(abs(x - y) for x, y in zip(_chosen_logprobs(a), _chosen_logprobs(b))) < 1e-4
    for prompt, b in list(zip(prompts, many))[:2]:
        ref_tokens, ref_lps = hf_greedy(hf, prompt, GEN)
        assert b.token_ids == ref_tokens
        assert max(abs(x - y) for x, y in zip(_chosen_logprobs(b), ref_lps)) < 1e-4


def _shards(path, size, ep):
    cfg = ModelConfig.from_pretrained(path)
    return cfg, [load_model(path, torch.float32, "cpu", cfg, par=Parallel(r, size, ep)) for r in range(size)]


@pytest.mark.parametrize("size,ep", [(2, False), (2, True), (4, False)])
def test_shards_hold_exactly_their_slices(checkpoint, size, ep):
    """Each rank's parameters are its slices: the shards put together give the one-rank model back, and each
    rank holds its share of the bytes (no rank loads a whole split tensor)."""
    path, _ = checkpoint
    cfg, shards = _shards(path, size, ep)
    full = load_model(path, torch.float32, "cpu", cfg)
    d, nq, nkv = cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q = torch.cat([s.layers[1].attn.qkv[:nq // size] for s in shards])
    assert torch.equal(q, full.layers[1].attn.qkv[:nq])
    k_heads = [s.layers[1].attn.qkv[nq // size:nq // size + s.layers[1].attn.nkv * d] for s in shards]
    group = max(1, size // cfg.num_kv_heads)        # ranks sharing one kv head
    assert torch.equal(torch.cat(k_heads[::group]), full.layers[1].attn.qkv[nq:nq + nkv])
    assert torch.equal(torch.cat([s.layers[1].attn.o for s in shards], dim=1), full.layers[1].attn.o)
    moe = [s.layers[1].mlp for s in shards]
    if ep:
        assert torch.equal(torch.cat([m.w13 for m in moe]), full.layers[1].mlp.w13)
        assert torch.equal(torch.cat([m.w2 for m in moe]), full.layers[1].mlp.w2)
    else:
        width = cfg.moe_intermediate_size // size
        assert torch.equal(torch.cat([m.w13[:, :width] for m in moe], dim=1), full.layers[1].mlp.w13[:, :width * size])
        assert torch.equal(torch.cat([m.w2 for m in moe], dim=2), full.layers[1].mlp.w2)
    for m in moe:
        assert torch.equal(m.router, full.layers[1].mlp.router)       # replicated
    embed = torch.cat([s.embed for s in shards])
    assert torch.equal(embed[:cfg.vocab_size], full.embed) and not embed[cfg.vocab_size:].any()
    split = sum(p.numel() for n, p in full.named_parameters() if n.endswith(("qkv", "o", "w13", "w2", "embed")))
    for s in shards:
        mine = sum(p.numel() for n, p in s.named_parameters() if n.endswith(("qkv", "o", "w13", "w2", "embed")))
        assert mine < split / size * 1.5      # its share (kv heads replicated at tp=4, vocabulary padding)


def test_sizes_that_do_not_divide_are_clear_errors(checkpoint):
    path, _ = checkpoint
    cfg = ModelConfig.from_pretrained(path)
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) is not divisible by tensor_parallel_size \(3\)"):
        load_model(path, torch.float32, "cpu", cfg, par=Parallel(0, 3))
    with pytest.raises(ValueError, match=r"num_experts \(8\) is not divisible by tensor_parallel_size \(16\)|"
                                         r"num_attention_heads"):
        load_model(path, torch.float32, "cpu", cfg, par=Parallel(0, 16, True))
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) is not divisible by tensor_parallel_size \(3\)"):
        LLM(str(path), tensor_parallel_size=3)


pytest_plugins = ["server_fixture"]


def _children(pid: int) -> list[int]:
    from pathlib import Path
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _alive(pid: int) -> bool:
    from pathlib import Path
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_server_streams_with_tp2_and_fails_fast_when_a_worker_dies(checkpoint, live_server):
    import json
    import os
    import signal
    import time

    import httpx

    path, _ = checkpoint
    prompt = _prompts(1, 98, seed=5)[0]
    expected = _run(path, [prompt])[0]
    with live_server(path, "-tp", "2", "--dtype", "float32") as server:
        with httpx.stream("POST", server.url + "/v1/completions", json={
                "prompt": prompt, "max_tokens": GEN, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}, timeout=60) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert "".join(choice["text"] for c in chunks for choice in c["choices"]) == expected.text
        assert chunks[-1]["usage"]["completion_tokens"] == GEN
        assert "MiB on rank 0" in server.log() and "tensor parallel 2; per rank: KV pools" in server.log()
        workers = _children(server.proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        started = time.monotonic()
        assert server.proc.wait(timeout=20) == 1          # the server notices between requests and exits non-zero
        assert time.monotonic() - started < 15
        assert "the engine stopped" in server.log()
        assert not any(_alive(w) for w in workers)


def test_two_nodes_give_the_tokens_of_one(checkpoint):
    """Two "nodes" on 127.0.0.1 with two ranks each: node 1 is `exaserve serve --node-rank 1` (its ranks only),
    node 0 the engine; the tokens equal one rank's, and node 1 ends cleanly with the engine."""
    import subprocess
    import sys
    import tempfile

    from exaserve.engine.distributed import free_port

    path, _ = checkpoint
    port = free_port()
    node1 = subprocess.Popen([sys.executable, "-m", "exaserve", "serve", "--model", str(path), "--dtype", "float32",
                              "-tp", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                              "--master-port", str(port)], cwd=tempfile.gettempdir())
    try:
        prompts = _prompts(3, 98, seed=7)
        many = _run(path, prompts, tensor_parallel_size=4, nnodes=2, master_addr="127.0.0.1", master_port=port)
        one = _run(path, prompts)
        assert [o.token_ids for o in many] == [o.token_ids for o in one]
        assert node1.wait(timeout=60) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


def test_multi_node_options_are_checked():
    from exaserve.engine.config import ConfigError, EngineConfig
    with pytest.raises(ConfigError, match="master_port"):
        EngineConfig("m", tensor_parallel_size=4, nnodes=2)
    with pytest.raises(ConfigError, match="multiple of nnodes"):
        EngineConfig("m", tensor_parallel_size=3, nnodes=2, master_port=29500)
    with pytest.raises(ConfigError, match="node_rank"):
        EngineConfig("m", tensor_parallel_size=4, nnodes=2, node_rank=2, master_port=29500)


def test_a_rank_that_fails_to_load_is_reported_by_rank_0_with_its_message():
    from exaserve.engine import distributed
    port = distributed.free_port()
    rank0 = distributed.Rendezvous("127.0.0.1", port, 3, 0)
    distributed.Rendezvous("127.0.0.1", port, 3, 1).report()
    distributed.Rendezvous("127.0.0.1", port, 3, 2).report("CheckpointError: tensor 'x' is truncated")
    with pytest.raises(RuntimeError, match=r"rank 2: CheckpointError: tensor 'x' is truncated"):
        rank0.wait_loaded(None)
    rank0.go(None)      # the ranks that loaded are told to stop
    assert distributed.Rendezvous("127.0.0.1", port, 3, 1).wait_go() is None


def test_a_worker_killed_mid_request_fails_the_request_and_the_engine(checkpoint):
    """A rank that dies during a step: the collective fails, the engine thread stops with WorkerError, the
    request gets an error instead of hanging, and nothing is left running."""
    import asyncio
    import os
    import signal
    import time

    from exaserve.engine import AsyncEngine
    from exaserve.engine.async_engine import EngineDeadError

    path, _ = checkpoint
    engine = AsyncEngine(str(path), dtype="float32", tensor_parallel_size=2)
    workers = [p.pid for p in engine.core._workers.procs]

    async def main():
        got = 0
        with pytest.raises(EngineDeadError):
            async for d in engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True)):
                got += len(d.token_ids)
                if got >= 3 and workers:
                    os.kill(workers[0], signal.SIGKILL)
        return got

    try:
        started = time.monotonic()
        assert asyncio.run(main()) >= 3
        assert time.monotonic() - started < 60
        assert not engine.is_healthy() and "tensor-parallel" in (engine.problem() or "") + str(engine.failure)
    finally:
        engine.shutdown()
    assert all(not _alive(pid) for pid in workers)


def test_tp2_with_preemption_n_and_top_logprobs_equals_one_rank(checkpoint):
    """A KV pool small enough to preempt, two seeded sampled choices per prompt and top-3 logprobs: tp=2 gives
    what one rank gives."""
    path, _ = checkpoint
    prompts = _prompts(4, 98, seed=11)
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=5, n=2, logprobs=3, ignore_eos=True)

    def run(tp):
        # the budget is per rank, and a rank of tp=2 holds half the kv heads: half the bytes, the same 30 blocks
        ring = 3 * 4 * 8 * 2 * 2 * 8 * 4 // tp          # 3 sliding layers x 4 seats x 8 rows x K,V x heads x 8 x 4 B
        llm = LLM(str(path), dtype="float32", max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
                  kv_cache_memory=ring + 30 * 4 * 2 * 2 * 8 * 4 // tp, tensor_parallel_size=tp)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
            return outs, llm.engine.stats()
        finally:
            llm.engine.close()

    (one, s1), (two, s2) = run(1), run(2)
    assert s1["blocks_total"] == s2["blocks_total"] == 30 * 7 // 8      # prefix caching: 1/8 to ring snapshots
    assert s1["preemptions"] > 0 and s1["preemptions"] == s2["preemptions"]
    for a, b in zip(one, two):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for ca, cb in zip(a.outputs, b.outputs):
            for la, lb in zip(ca.logprobs, cb.logprobs):
                assert la.keys() == lb.keys() and max(abs(la[t] - lb[t]) for t in la) < 1e-4


def test_a_hung_worker_fails_the_request_after_the_collective_timeout(checkpoint):
    """A rank that stops answering (SIGSTOP) without dying: the collective times out
    (EXASERVE_COLLECTIVE_TIMEOUT), the request gets an error, the engine reports the hung rank, and the stopped
    worker is killed on shutdown."""
    import asyncio
    import os
    import signal
    import time

    from exaserve.engine import AsyncEngine, envs
    from exaserve.engine.async_engine import EngineDeadError

    path, _ = checkpoint
    engine = AsyncEngine(str(path), dtype="float32", tensor_parallel_size=2, env=envs.Env(collective_timeout=3.0))
    worker = engine.core._workers.procs[0].pid
    stopped = []

    async def main():
        with pytest.raises(EngineDeadError):
            async for _ in engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True)):
                if not stopped:
                    os.kill(worker, signal.SIGSTOP)
                    stopped.append(time.monotonic())

    try:
        asyncio.run(main())
        assert time.monotonic() - stopped[0] < 30
        assert "WorkerError" in engine.problem()
    finally:
        engine.shutdown()
    assert not _alive(worker)


def test_two_nodes_under_torchrun(checkpoint):
    """`torchrun --nproc-per-node 1 -m exaserve serve ...` on each of two "nodes": the nodes come from torchrun's
    environment, the ranks meet at its agent's store; node 0 serves the one-rank text; both end on SIGTERM."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import httpx

    from exaserve.engine.distributed import free_port

    path, _ = checkpoint
    torchrun = shutil.which("torchrun") or str(__import__("pathlib").Path(sys.executable).with_name("torchrun"))
    master, http = free_port(), free_port()
    prompt = _prompts(1, 98, seed=9)[0]
    expected = _run(path, [prompt])[0].text
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(k),
                               "--master-addr", "127.0.0.1", "--master-port", str(master), "-m", "exaserve", "serve",
                               "--model", str(path), "--dtype", "float32", "-tp", "4", "--port", str(http)],
                              cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in (1, 0)]
    try:
        deadline = time.monotonic() + 180
        while True:
            assert all(n.poll() is None for n in nodes), nodes[1].stderr.read()[-3000:]
            assert time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{http}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{http}/v1/completions", json={
            "prompt": prompt, "max_tokens": GEN, "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.json()["choices"][0]["text"] == expected
        nodes[1].send_signal(signal.SIGTERM)
        for n in nodes:
            n.wait(timeout=60)
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()


def test_stacked_experts_load_like_per_expert_ones(checkpoint, tmp_path):
    """Re-saved checkpoints store experts stacked (mlp.experts.gate_up_proj [E, 2I, H], gate rows first, and
    down_proj [E, H, I]): the same weights as the per-expert form, on one rank, split (tp=2) or by expert (EP)."""
    from exaserve.testing import rewrite_checkpoint

    path, _ = checkpoint
    cfg = ModelConfig.from_pretrained(path)

    def stack(tensors):
        for layer in {n.split(".mlp.experts.")[0] for n in tensors if ".mlp.experts." in n}:
            def take(e, w, layer=layer):
                return tensors.pop(f"{layer}.mlp.experts.{e}.{w}_proj.weight")
            experts = range(cfg.num_experts)
            tensors[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([take(e, "gate"), take(e, "up")]) for e in experts])
            tensors[f"{layer}.mlp.experts.down_proj"] = torch.stack([take(e, "down") for e in experts])

    stacked = rewrite_checkpoint(path, tmp_path / "stacked", stack)
    for size, ep in ((1, False), (2, False), (2, True)):
        a, b = (load_model(p, torch.float32, "cpu", cfg, par=Parallel(size - 1, size, ep)) for p in (path, stacked))
        for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(x, y), (size, ep, name)
    prompts = _prompts(2, 98, seed=13)
    assert [o.token_ids for o in _run(stacked, prompts, tensor_parallel_size=2)] == \
        [o.token_ids for o in _run(path, prompts)]


def test_every_rank_reports_its_kv_room_and_rank_0_gets_them():
    """GPUs of one machine may differ in free memory: each rank reports the KV bytes it has room for, and rank 0
    sizes every rank's pools by the smallest (its own included)."""
    from exaserve.engine import distributed
    port = distributed.free_port()
    rank0 = distributed.Rendezvous("127.0.0.1", port, 4, 0)
    distributed.Rendezvous("127.0.0.1", port, 4, 1).report(kv_budget=5 << 30)
    distributed.Rendezvous("127.0.0.1", port, 4, 2).report(kv_budget=3 << 30)
    distributed.Rendezvous("127.0.0.1", port, 4, 3).report()       # kv_cache_memory given: nothing to report
    assert sorted(rank0.wait_loaded(None)) == [3 << 30, 5 << 30]


def test_rank_0_failing_mid_step_fails_fast_instead_of_leaving_workers_in_a_collective(checkpoint):
    """An exception on rank 0 between two all-reduces (here: its MoE block) leaves the other rank waiting in a
    collective rank 0 will never join: the engine must stop with WorkerError at once and kill the worker, not
    wait for the collective timeout (120 s) or try a graceful stop that would block on the waiting rank."""
    import asyncio
    import time

    from exaserve.engine import AsyncEngine
    from exaserve.engine.async_engine import EngineDeadError

    path, _ = checkpoint
    engine = AsyncEngine(str(path), dtype="float32", tensor_parallel_size=2)
    workers = [p.pid for p in engine.core._workers.procs]
    moe = next(layer.mlp for layer in engine.core._sharded.local.layers if hasattr(layer.mlp, "w13"))

    def broken(x):
        raise RuntimeError("injected fault in rank 0's MoE block")

    async def main():
        with pytest.raises(EngineDeadError):
            async for _ in engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True)):
                moe.forward = broken

    try:
        started = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - started < 30
        assert "out of step" in (engine.problem() or "") + str(engine.failure)
    finally:
        engine.shutdown()
    assert all(not _alive(pid) for pid in workers)
