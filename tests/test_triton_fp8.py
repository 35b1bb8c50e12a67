"""The block-FP8 Triton kernels (kernels/triton_fp8.py) against a dequantize-then-matmul reference written here.

What the Triton 3.9 interpreter does with float8e4nv: loads, e4m3 x e4m3 tl.dot and e4m3 -> fp32 casts are exact;
the fp32 -> e4m3 cast is not (ties round away from zero, and a rounding carry into the exponent is lost:
126.06 -> 64.0), so under the interpreter the kernels round in integer arithmetic, and test_quantize_exact's
crafted ties and carries check that rounding bit for bit against torch's cast. On a GPU the kernels use the cast
instruction; test_kernels_compile_for_sm90 compiles every production tile config for an H200 (no GPU needed)
and checks that instruction is the round-to-nearest-even one, and the shared memory and register spills.

Tolerances (error = max |out - ref| / max |ref|): against a reference that quantizes activations the same way
(per token, groups of BK, amax / 448) TIGHT[dtype] (fp32: summation order only); against unquantized activations
the norm of the error relative to the reference's stays under 6% for a linear and 10% for the MoE (x and h both
quantized; e4m3 keeps 3 mantissa bits).
"""
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import sm90  # noqa: E402  (tests/sm90.py)
from kernel_cases import poisoned  # noqa: E402

from exaserve import kernels  # noqa: E402
from exaserve.engine import LLM, SamplingParams  # noqa: E402
from exaserve.kernels import fp8, torch_ops, triton_fp8, triton_moe  # noqa: E402
from exaserve.kernels.triton_fp8 import FP8, FP8_MAX, MIN_AMAX, ROW_GROUP  # noqa: E402
from exaserve.testing import make_hf_checkpoint, quantize_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TIGHT = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHARED_MEMORY = sm90.SMEM_LIMIT   # bytes per block on an H200 (sm_90)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# -- the reference ----------------------------------------------------------------------------------------------

def ref_quantize(x: torch.Tensor, bk: int):
    """(e4m3 q, float32 scale [M, groups]): scale = max(amax, MIN_AMAX) / 448 per row and group of bk."""
    M, K = x.shape
    groups = -(-K // bk)
    padded = torch.zeros(M, groups * bk, device=x.device)
    padded[:, :K] = x.float()
    scale = padded.view(M, groups, bk).abs().amax(-1).clamp_min(MIN_AMAX) / FP8_MAX
    return (x.float() / scale.repeat_interleave(bk, 1)[:, :K]).to(FP8), scale


def ref_fake_quant(x: torch.Tensor, bk: int) -> torch.Tensor:
    q, scale = ref_quantize(x, bk)
    return q.float() * scale.repeat_interleave(bk, 1)[:, :x.shape[1]]


def dequantize(q: torch.Tensor, scale: torch.Tensor, bk: int) -> torch.Tensor:
    n, k = q.shape[-2:]
    return q.float() * scale.repeat_interleave(ROW_GROUP, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :k]


def fp8_weight(*shape, bk: int):
    """Random e4m3 values with scales spread over two decades per (32-row, bk-column) group, so a scale read
    from the wrong group shows."""
    q = (torch.randn(*shape, device=DEVICE) * 40).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    groups = (*shape[:-2], -(-shape[-2] // ROW_GROUP), -(-shape[-1] // bk))
    scale = 10 ** (torch.rand(groups, device=DEVICE) * 2 - 3.5)
    return q, scale


def rel(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def rel_norm(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def ref_moe(x, w13, w2, topk_weights, topk_ids, quant_bk=None):
    """Per token, per chosen expert (id >= 0): down(silu(gate x) * up x) * weight, in fp32 on dequantized
    weights; with quant_bk, x and h quantized per token in groups of quant_bk first."""
    N = w2.shape[-1]
    xs = ref_fake_quant(x, quant_bk) if quant_bk else x.float()
    out = torch.zeros(x.shape, device=x.device)
    for t in range(x.shape[0]):
        for j, e in enumerate(topk_ids[t].tolist()):
            if e < 0:
                continue
            gu = xs[t:t + 1] @ w13[e].T
            h = F.silu(gu[:, :N]) * gu[:, N:]
            if quant_bk:
                h = ref_fake_quant(h, quant_bk)
            out[t] += topk_weights[t, j] * (h @ w2[e].T)[0]
    return out.to(x.dtype)


# -- activation quantization ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bk", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_exact(bk, dtype):
    K = 4 * bk + 8                                   # a partial last group
    x = torch.randn(6, K, device=DEVICE) * 3
    x[1] = 0.0                                       # an all-zero row
    # amax 448 makes scale 1: the rest are e4m3 ties (to even: 1.0625 -> 1, 1.1875 -> 1.25, 3 * 2^-10 -> 2^-8,
    # 2^-10 -> 0), rounding carries into the exponent (15.5 -> 16, 126.06 -> 128), subnormals, -0
    crafted = torch.tensor([448.0, 1.0625, 1.1875, 15.5, -15.5, 126.06, -7.9, 3 * 2**-10, 2**-10, 2**-9, 0.01,
                            -0.0, 240.0, 248.0, 447.0, 2**-6 * 1.0625])
    x[2, :16] = crafted
    x[2, bk:bk + 16] = -crafted * 2.0**-20           # a group whose scale is a power of two far below 1
    x[3] *= torch.logspace(-8, 2, K, device=DEVICE)  # magnitudes across the whole range in each group
    x[4, -3:] = 1e4                                  # the partial group holds the row's largest values
    x = x.to(dtype)
    with poisoned():
        q, scale = triton_fp8.quantize(x, bk)
    ref_q, ref_scale = ref_quantize(x, bk)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (6, 5)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_quantize_strided_rows():
    x = torch.randn(5, 100, device=DEVICE)[:, 10:74]          # rows 100 apart
    q, scale = triton_fp8.quantize(x, 32)
    ref_q, ref_scale = ref_quantize(x.contiguous(), 32)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale)


# -- dense GEMM -------------------------------------------------------------------------------------------------

LINEAR_CASES = [(32, torch.float32, 1), (32, torch.float32, 5), (32, torch.float32, 37),
                (128, torch.bfloat16, 1), (128, torch.bfloat16, 37), (128, torch.float16, 5)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused_quant", "pre_quant"])
@pytest.mark.parametrize("bk,dtype,M", LINEAR_CASES)
def test_linear_fp8(bk, dtype, M, fused):
    N, K = 70, 200                                   # a partial 32-row group, a partial K block for both bk
    w, scale = fp8_weight(N, K, bk=bk)
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    # GROUP_M 2 with 3 row tiles: a partial last group in the grouped launch order
    cfg = dict(triton_fp8.interpreter_config(bk), FUSED_QUANT=fused, GROUP_M=2 if M > 32 else 1)
    with poisoned():
        out = triton_fp8.linear_fp8(x, w, scale, bk, config=cfg)
    wd = dequantize(w, scale, bk)
    assert out.shape == (M, N) and out.dtype == dtype and not out.isnan().any()
    assert rel(out, (ref_fake_quant(x, bk) @ wd.T).to(dtype)) <= TIGHT[dtype]
    assert rel_norm(out, x.float() @ wd.T) <= 0.06


def test_linear_fp8_leading_dims_and_strided_rows():
    w, scale = fp8_weight(40, 64, bk=32)
    x = torch.randn(2, 3, 80, device=DEVICE)[..., :64]
    out = triton_fp8.linear_fp8(x, w, scale, 32)
    ref = ref_fake_quant(x.reshape(6, 64), 32) @ dequantize(w, scale, 32).T
    assert out.shape == (2, 3, 40) and rel(out.reshape(6, 40), ref) <= TIGHT[torch.float32]


def test_linear_fp8_errors():
    w, scale = fp8_weight(40, 64, bk=32)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"scale of the FP8 weight \[40, 64\].*float32 \[2, 2\]"):
        triton_fp8.linear_fp8(x, w, scale[:1], 32)
    with pytest.raises(ValueError, match="power of two"):
        triton_fp8.linear_fp8(x, w, scale, 48)
    with pytest.raises(ValueError, match="x has 63 columns"):
        triton_fp8.linear_fp8(x[:, :63], w, scale, 32)


# -- fused MoE --------------------------------------------------------------------------------------------------

MOE_CASES = [(32, torch.float32, 1), (32, torch.float32, 9), (128, torch.bfloat16, 1), (128, torch.bfloat16, 9),
             (32, torch.float16, 33)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused_quant", "pre_quant"])
@pytest.mark.parametrize("bk,dtype,T", MOE_CASES)
def test_fused_moe_fp8(bk, dtype, T, fused):
    # H and I not multiples of 32 or bk; the up rows of w13 start at row I = 40, inside a 32-row scale group
    E, k, H, I = 6, 2, 72, 40
    w13, s13 = fp8_weight(E, 2 * I, H, bk=bk)
    w2, s2 = fp8_weight(E, H, I, bk=bk)
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    topk_ids = torch.rand(T, E - 1, device=DEVICE).topk(k, dim=-1).indices     # expert E-1 gets no tokens
    topk_ids[0, 0] = -1                              # an expert on another rank
    if T > 1:
        topk_ids[1] = -1                             # a token with all its experts elsewhere: output 0
    topk_weights = torch.rand(T, k, device=DEVICE) + 0.1
    cfg = dict(triton_fp8.interpreter_config(bk), FUSED_QUANT=fused, GROUP_M=2 if T > 32 else 1)
    with poisoned():
        out = triton_fp8.fused_moe_fp8(x, w13, s13, w2, s2, topk_weights, topk_ids, bk, config=cfg)
    w13d, w2d = dequantize(w13, s13, bk), dequantize(w2, s2, bk)
    assert out.shape == (T, H) and out.dtype == dtype and not out.isnan().any()
    assert rel(out, ref_moe(x, w13d, w2d, topk_weights, topk_ids, quant_bk=bk)) <= TIGHT[dtype]
    assert rel_norm(out, ref_moe(x, w13d, w2d, topk_weights, topk_ids)) <= 0.10
    if T > 1:
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_fused_moe_fp8_errors():
    w13, s13 = fp8_weight(2, 64, 32, bk=32)
    w2, s2 = fp8_weight(2, 32, 32, bk=32)
    x, tw, ids = torch.randn(3, 32), torch.rand(3, 1), torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"scale of w2 \[2, 32, 32\]"):
        triton_fp8.fused_moe_fp8(x, w13, s13, w2, s2[:1], tw, ids, 32)
    with pytest.raises(ValueError, match="BLOCK_N 32 must be a multiple of the block width 64"):
        triton_fp8.fused_moe_fp8(x, w13, s13[..., :1], w2, s2[..., :1], tw, ids, 64,
                                 config=dict(triton_fp8.interpreter_config(32)))


# -- op table -----------------------------------------------------------------------------------------------------

def test_linear_dispatch():
    w, scale = fp8_weight(40, 64, bk=32)
    x = torch.randn(3, 64, device=DEVICE)
    assert torch.equal(triton_fp8.linear(x, fp8.attach(w, scale, 32)), triton_fp8.linear_fp8(x, w, scale, 32))
    plain = torch.randn(40, 64, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(triton_fp8.linear(x, plain), torch_ops.linear(x, plain))


def test_fused_moe_dispatch():
    E, k, H, I, T = 4, 2, 48, 32, 5
    x = torch.randn(T, H, device=DEVICE)
    tw, ids = torch.rand(T, k, device=DEVICE), torch.rand(T, E, device=DEVICE).topk(k, -1).indices
    w13, s13 = fp8_weight(E, 2 * I, H, bk=32)
    w2, s2 = fp8_weight(E, H, I, bk=32)
    got = triton_fp8.fused_moe(x, fp8.attach(w13, s13, 32), fp8.attach(w2, s2, 32), tw, ids)
    assert torch.equal(got, triton_fp8.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids, 32))
    p13, p2 = torch.randn(E, 2 * I, H, device=DEVICE), torch.randn(E, H, I, device=DEVICE)
    assert torch.equal(triton_fp8.fused_moe(x, p13, p2, tw, ids), triton_moe.fused_moe(x, p13, p2, tw, ids))
    with pytest.raises(ValueError, match="both be FP8"):
        triton_fp8.fused_moe(x, w13, p2, tw, ids)


def test_triton_backend_uses_the_fp8_entry_points():
    ops = kernels.select("triton", DEVICE)
    assert ops.linear is triton_fp8.linear and ops.fused_moe is triton_fp8.fused_moe


def test_engine_runs_an_fp8_checkpoint_through_these_kernels(tmp_path, monkeypatch):
    """A block-FP8 checkpoint on the triton backend: its linear weights and expert stacks reach linear_fp8 and
    fused_moe_fp8 as FP8 with their scales, and every call's output equals the reference on the same inputs."""
    make_hf_checkpoint(tmp_path / "base", seed=5, intermediate_size=64, moe_intermediate_size=32)
    quantize_fp8(tmp_path / "base", tmp_path / "fp8", tmp_path / "deq")
    calls = []

    def recorded(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.append((fn.__name__, args, out))
            return out
        return run

    monkeypatch.setattr(triton_fp8, "linear_fp8", recorded(triton_fp8.linear_fp8))
    monkeypatch.setattr(triton_fp8, "fused_moe_fp8", recorded(triton_fp8.fused_moe_fp8))
    llm = LLM(str(tmp_path / "fp8"), dtype="float32", kernels="triton", max_num_seqs=2, max_num_batched_tokens=16)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)     # one step: the interpreter
        llm.generate([[5, 17, 33, 2, 71, 40, 9], [44, 21, 7]], params, use_tqdm=False)
    finally:
        llm.engine.close()
    # per layer: qkv and o, then the dense MLP's two linears or the shared expert's two and the routed experts
    assert {name for name, *_ in calls} == {"linear_fp8", "fused_moe_fp8"}
    for name, args, out in calls:
        if name == "linear_fp8":
            x, w, scale, bk = args
            ref = ref_fake_quant(x, bk) @ dequantize(w, scale, bk).T
        else:
            x, w13, s13, w2, s2, topk_weights, topk_ids, bk = args
            ref = ref_moe(x, dequantize(w13, s13, bk), dequantize(w2, s2, bk), topk_weights, topk_ids, quant_bk=bk)
        assert rel(out, ref) <= TIGHT[torch.float32], (name, [tuple(a.shape) for a in args[:2]])


# -- tile configs ---------------------------------------------------------------------------------------------------

def test_config_lookup(monkeypatch):
    small, big, tuned = ({"BLOCK_M": m} for m in (16, 128, 64))
    table = {"linear": {"default": {"16": small, "4096": big}, "N=70,K=200,bk=32,dtype=float32": {"8": tuned}},
             "moe": {"default": {"4": small}}}
    monkeypatch.setattr(triton_fp8, "config_table", lambda device: table)
    assert triton_fp8.pick("linear", "N=1,K=1,bk=32,dtype=float32", 1, "x") is small
    assert triton_fp8.pick("linear", "N=1,K=1,bk=32,dtype=float32", 17, "x") is big
    assert triton_fp8.pick("linear", "N=1,K=1,bk=32,dtype=float32", 10**6, "x") is big
    assert triton_fp8.pick("linear", "N=70,K=200,bk=32,dtype=float32", 100, "x") is tuned
    assert triton_fp8.pick("moe", "E=8,N=1,K=1,bk=32,dtype=float32", 0.5, "x") is small


def test_production_configs_are_well_formed():
    keys = {"BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages", "FUSED_QUANT"}
    for op, tables in triton_fp8.config_table(triton_fp8.FALLBACK_DEVICE).items():
        for cfg in (c for table in tables.values() for c in table.values()):
            assert set(cfg) == keys, (op, cfg)
            if op == "moe":
                assert cfg["BLOCK_N"] % 128 == 0, f"moe BLOCK_N {cfg['BLOCK_N']} must hold whole 128-column groups"


# -- sm_90 compilation ------------------------------------------------------------------------------------------------

def test_kernels_compile_for_sm90(tmp_path):
    """Every production tile config (kernels/configs/fp8_NVIDIA_H200.json) compiles for sm_90a through Triton's
    NVIDIA backend and ptxas (this file run as a script: a stub driver, launches only compile), within an H200's
    shared memory per block and without register spills; the kernels that quantize use the rounding cast."""
    if sm90.ptxas_path() is None:
        pytest.skip("the triton wheel has no ptxas: cannot compile for sm_90 here")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, __file__, "sm90"], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = {name for name in vars(triton_fp8) if name.endswith("_kernel")}
    records = [r for r in json.loads(res.stdout.strip().splitlines()[-1]) if r["kernel"] in ours]  # not align's
    assert {r["kernel"] for r in records} == ours
    for r in records:
        where = f"{r['kernel']} {r['config']}"
        assert r["shared"] <= SHARED_MEMORY, f"{where}: {r['shared']} bytes of shared memory"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills registers: {r}"
        if r["quantizes"]:
            assert r["rounding_cast"] and r["div_rn"], f"{where} does not use cvt.rn.satfinite / div.rn: {r}"


def _sm90_main():
    """Compile-only launches for sm_90: prints one JSON line of records (kernel, config, shared memory, ptxas
    registers and spills, whether the PTX quantizes with cvt.rn.satfinite and div.rn)."""
    from triton.runtime.jit import JITFunction

    sm90.install_driver()
    records, config = [], {}
    compile_and_launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = compile_and_launch(self, *args, grid=grid, warmup=True, **kwargs)
        ptx = kernel.asm["ptx"]
        info = sm90.ptxas_info(ptx)
        if "ptxas_error" in info:
            raise RuntimeError(f"ptxas on {self.fn.__name__}: {info['ptxas_error']}")
        quantizes = self.fn.__name__ in ("_quantize_kernel", "_gate_up_kernel") or kwargs.get("FUSED_QUANT", False)
        records.append(dict(kernel=self.fn.__name__, config=config.get("cfg"), shared=kernel.metadata.shared,
                            **info, quantizes=quantizes,
                            rounding_cast="cvt.rn.satfinite.e4m3x2.f32" in ptx, div_rn="div.rn.f32" in ptx))

    JITFunction.run = compile_only
    assert not triton_fp8.INTERPRET
    table = triton_fp8.config_table(triton_fp8.FALLBACK_DEVICE)
    H, N, I, E, bk = 6144, 4096, 2048, 2, 128        # K-EXAONE's hidden size and expert width; two experts
    w, ws = torch.zeros(N, H, dtype=FP8), torch.ones(N // 32, H // bk)
    w13, s13 = torch.zeros(E, 2 * I, H, dtype=FP8), torch.ones(E, 2 * I // 32, H // bk)
    w2, s2 = torch.zeros(E, H, I, dtype=FP8), torch.ones(E, H // 32, I // bk)
    for cfg in {json.dumps(c, sort_keys=True): c for c in table["linear"]["default"].values()}.values():
        config["cfg"] = cfg
        triton_fp8.linear_fp8(torch.zeros(64, H, dtype=torch.bfloat16), w, ws, bk, config=cfg)
    for cfg in {json.dumps(c, sort_keys=True): c for c in table["moe"]["default"].values()}.values():
        config["cfg"] = cfg
        T, k = 16, 8
        triton_fp8.fused_moe_fp8(torch.zeros(T, H, dtype=torch.bfloat16), w13, s13, w2, s2, torch.zeros(T, k),
                                 torch.zeros(T, k, dtype=torch.int32), bk, config=cfg)
    print(json.dumps(records))


if __name__ == "__main__" and sys.argv[1:] == ["sm90"]:
    _sm90_main()
