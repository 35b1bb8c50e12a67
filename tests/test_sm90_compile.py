"""Every Triton kernel configuration the engine and the benchmarks use compiles for an H200 (sm_90), here, on CPU.

A subprocess (this file run as a script) replaces Triton's driver with a stub whose target is sm_90 and its
launcher with one that only compiles: each op is called as the engine calls it, on meta tensors of the real
shapes (K-EXAONE at tensor parallel 1 and 8, the bench checkpoint, the test models), so the host side picks its
tile configs as it would on the GPU; every launch goes TTIR -> TTGIR -> LLVM -> PTX through the real NVIDIA
backend, then through `ptxas -v` from the triton wheel, and its shared memory, registers and spills are
recorded (registers and spills only for the bf16 production configs: ptxas spends tens of seconds on a
spilling fp32 kernel). Asserted: every kernel compiles, every kernel of the Triton modules is covered, shared
memory fits an H200 (232,448 bytes per block) in every dtype, and the bf16 production configs spill no
registers. The FP8 kernels (kernels/triton_fp8.py) have their own such test (tests/test_triton_fp8.py).

    python tests/test_sm90_compile.py [out.json]     # the table, without pytest (one process)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sm90

# -- the child process: stub driver, compile-only launcher ------------------------------------------------

def _install_stub(records: list, context: dict):
    """Make every Triton launch compile for sm_90 and record its resources instead of running."""
    from triton.runtime import jit as jit_module

    sm90.install_driver()
    real_run = jit_module.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        rec = dict(context, kernel=self.fn.__name__)
        start = time.perf_counter()
        try:
            kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
            rec.update(shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
                       num_stages=kernel.metadata.num_stages)
            if context["production"]:     # ptxas takes tens of seconds on the spilling fp32 configs
                info = sm90.ptxas_info(kernel.asm["ptx"])
                if "ptxas_error" in info:
                    rec.update(info)
                else:
                    rec.update(registers=info["registers"], spill_bytes=info["spill_stores"] + info["spill_loads"])
            rec["constexprs"] = {self.arg_names[p[0]]: str(v) for p, v in kernel.src.constants.items()
                                 if self.arg_names[p[0]].isupper()}
        except Exception as e:    # reported, not raised: the table shows every failure at once
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        rec["seconds"] = round(time.perf_counter() - start, 2)
        records.append(rec)

    jit_module.JITFunction.run = compile_only


def _cases():
    """(name, dtype, production, thunk): each thunk calls ops the way the engine or a benchmark does."""
    import torch

    from exaserve.kernels import triton_attention as attn
    from exaserve.kernels import triton_moe as moe
    from exaserve.kernels import triton_norm as norm

    def t(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def moe_case(M, E, H, N, k, dtype):
        def run():
            x = t(M, H, dtype=dtype)
            weights, ids = moe.moe_route(x, t(E, H, dtype=torch.float32), t(E, dtype=torch.float32), k, 1, 1, True,
                                         2.5)
            moe.fused_moe(x, t(E, 2 * N, H, dtype=dtype), t(E, H, N, dtype=dtype), weights, ids)
        return run

    def attention_case(nq, nkv, d, dtype, batch, new, page=16, context=32768, ring=False, splits=None,
                       window=128):
        def run():
            T = batch * new
            q, k, v = t(T, nq, d, dtype=dtype), t(T, nkv, d, dtype=dtype), t(T, nkv, d, dtype=dtype)
            qsl = t(batch + 1, dtype=torch.int32)
            lens = t(batch, dtype=torch.int32)
            if ring:
                pool = t(batch, window + 4, nkv, d, dtype=dtype)
                attn.ring_attention(q, k, v, pool, pool, t(batch, dtype=torch.int64), qsl, lens, window, d ** -0.5)
                attn.write_kv(k, v, pool, pool, t(T, dtype=torch.int64))
            else:
                blocks = -(-context // page)
                cache = t(batch * blocks, page, nkv, d, dtype=dtype)
                attn.write_kv(k, v, cache, cache, t(T, dtype=torch.int64))
                attn.paged_attention(q, cache, cache, t(batch, blocks, dtype=torch.int32), lens, qsl, d ** -0.5,
                                     num_splits=splits)
        return run

    def rows_case(T, H, I, nq, nkv, d, dtype):
        def run():
            x, w = t(T, H, dtype=dtype), t(H, dtype=dtype)
            norm.rms_norm(x, w, 1e-5)
            norm.add_rms_norm(x, x, w, 1e-5)
            qkv = t(T, (nq + 2 * nkv) * d, dtype=dtype)
            q, k, _ = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
            cos = t(4096, d // 2, dtype=torch.float32)
            for rope in (True, False):
                norm.qk_norm_rope(q.reshape(T, nq, d), k.reshape(T, nkv, d), t(d, dtype=dtype), t(d, dtype=dtype),
                                  1e-5, t(T, dtype=torch.int64), cos, cos, rope)
            norm.silu_and_mul(t(T, 2 * I, dtype=dtype))
        return run

    bf16, f32 = torch.bfloat16, torch.float32
    cases = []
    # bf16 production: K-EXAONE MoE (E 128, H 6144, top-8) with expert width 2048 (tp 1) and 256 (tp 8) at
    # token counts of each config bucket, and the bench checkpoint (E 32, H 512, N 256, top-4)
    for M in (1, 8, 64, 512, 4096):
        for N in (2048, 256):
            cases.append((f"moe K-EXAONE N{N} M{M}", bf16, True, moe_case(M, 128, 6144, N, 8, bf16)))
    for M in (1, 8, 256):
        cases.append((f"moe bench M{M}", bf16, True, moe_case(M, 32, 512, 256, 4, bf16)))
    # attention: K-EXAONE heads at tp 1 (64 q / 8 kv) and tp 8 (8 / 1), head_dim 128, pages of 16, and the
    # bench checkpoint (8 / 2, head_dim 64): decode, decode with split-K, prefill, for both pools
    for name, nq, nkv, d in (("K-EXAONE", 64, 8, 128), ("K-EXAONE tp8", 8, 1, 128), ("bench", 8, 2, 64)):
        cases += [
            (f"paged decode {name} B32", bf16, True, attention_case(nq, nkv, d, bf16, 32, 1)),
            (f"paged decode split {name} B1", bf16, True, attention_case(nq, nkv, d, bf16, 1, 1, splits=8)),
            (f"paged prefill {name}", bf16, True, attention_case(nq, nkv, d, bf16, 2, 512)),
            (f"ring decode {name} B32", bf16, True, attention_case(nq, nkv, d, bf16, 32, 1, ring=True)),
            (f"ring prefill {name}", bf16, True, attention_case(nq, nkv, d, bf16, 2, 512, ring=True)),
        ]
    cases.append(("rows K-EXAONE T8", bf16, True, rows_case(8, 6144, 18432, 64, 8, 128, bf16)))
    cases.append(("rows bench T8", bf16, True, rows_case(8, 512, 1536, 8, 2, 64, bf16)))
    # fp32 as the CUDA tests run it (tests/test_triton_engine.py's mid model: 16 q / 2 kv heads of 64, 32
    # experts of width 256, top-4, pages of 4): shared memory only
    cases.append(("moe mid fp32 M8", f32, False, moe_case(8, 32, 512, 256, 4, f32)))
    cases.append(("moe mid fp32 M256", f32, False, moe_case(256, 32, 512, 256, 4, f32)))
    for kind, ring in (("paged", False), ("ring", True)):
        cases.append((f"{kind} decode mid fp32", f32, False,
                      attention_case(16, 2, 64, f32, 4, 1, page=4, context=64, ring=ring, window=32)))
        cases.append((f"{kind} prefill mid fp32", f32, False,
                      attention_case(16, 2, 64, f32, 2, 16, page=4, context=64, ring=ring, window=32)))
    cases.append(("rows mid fp32", f32, False, rows_case(16, 512, 1024, 16, 2, 64, f32)))
    return cases


def compile_all(worker: int = 0, workers: int = 1) -> list[dict]:
    """Runs this worker's share of the cases compile-only (case families, the first word of a case name and
    its model, stay together: they share compiled kernels); one record per launch."""
    records: list[dict] = []
    context: dict = {}
    _install_stub(records, context)
    for name, dtype, production, run in _share(_cases(), worker, workers):
        context.clear()
        context.update(case=name, dtype=str(dtype).removeprefix("torch."), production=production)
        try:
            run()
        except Exception as e:
            records.append(dict(context, kernel="(host side)", error=f"{type(e).__name__}: {e}"[:2000]))
    return records


def _share(cases: list, worker: int, workers: int) -> list:
    families = list(dict.fromkeys(_family(name) for name, *_ in cases))
    mine = set(families[worker::workers])
    return [c for c in cases if _family(c[0]) in mine]


def _family(name: str) -> str:
    words = name.split()
    return " ".join([words[0], *(w for w in words[1:] if w in ("K-EXAONE", "tp8", "bench", "mid", "decode",
                                                               "prefill"))])


def kernel_names() -> set[str]:
    """The @triton.jit kernels of the Triton modules the engine uses (names starting with an underscore and
    ending in _kernel)."""
    src = Path(__file__).resolve().parent.parent / "kernels"
    names = set()
    for module in ("triton_moe", "triton_attention", "triton_norm"):
        names |= set(re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", (src / f"{module}.py").read_text()))
    return names


def _table(records: list[dict]) -> str:
    lines = [f"{'case':<34} {'dtype':<9} {'kernel':<24} {'smem':>7} {'regs':>5} {'spill':>5}  constexprs"]
    for r in records:
        if "error" in r or "ptxas_error" in r:
            lines.append(f"{r['case']:<34} {r['dtype']:<9} {r['kernel']:<24} ERROR "
                         f"{r.get('error') or r.get('ptxas_error')}")
            continue
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(f"{r['case']:<34} {r['dtype']:<9} {r['kernel']:<24} {r['shared']:>7} "
                     f"{r.get('registers', '-'):>5} {r.get('spill_bytes', '-'):>5}  w{r['num_warps']} "
                     f"s{r['num_stages']} {consts}")
    return "\n".join(lines)


# -- the test --------------------------------------------------------------------------------------------

def _records(tmp_dir: Path) -> list[dict]:
    """Compiles every case in parallel subprocesses (one per core, at most 4), sharing one Triton cache in
    tmp_dir."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_dir / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    workers = max(1, min(4, os.cpu_count() or 1))
    outs = [tmp_dir / f"sm90-{i}.json" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, str(out), str(i), str(workers)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i, out in enumerate(outs)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-4000:]
    return [r for out in outs for r in json.loads(out.read_text())]


def test_every_kernel_compiles_for_sm90_within_limits(tmp_path):
    import pytest
    pytest.importorskip("triton")
    records = _records(tmp_path)
    table = _table(records)
    failed = [r for r in records if "error" in r or "ptxas_error" in r]
    assert not failed, f"compile failures:\n{table}"
    too_big = [r for r in records if r["shared"] > sm90.SMEM_LIMIT]
    assert not too_big, f"shared memory over {sm90.SMEM_LIMIT} bytes:\n" + _table(too_big)
    spills = [r for r in records if r["production"] and r["spill_bytes"]]
    assert not spills, "register spills in bf16 production configs:\n" + _table(spills)
    missing = kernel_names() - {r["kernel"] for r in records}
    assert not missing, f"kernels no case compiles: {sorted(missing)}"
    assert {r["case"] for r in records} == {name for name, *_ in _cases()}


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="sm90-cache-"))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    share = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, 1)
    result = compile_all(*share)
    print(_table(result))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result))
