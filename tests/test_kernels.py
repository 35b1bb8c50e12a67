"""Every Triton kernel against its torch path (kernels/torch_ops.py).

Runs on CUDA when there is one, else in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Inputs are fresh per case (seeded from the test id, so a failure replays); every buffer the kernel wrapper
allocates is filled with NaN first, so an element the kernel forgets to write shows up. Error is
max |out - ref| / max |ref|.
"""
import subprocess
import sys
import zlib

import pytest
import torch

pytest.importorskip("triton")

from kernel_cases import (  # noqa: E402
    GQA,
    MOE_CASES,
    PAGED_CASES,
    RING_CASES,
    check,
    paged_batch,
    poisoned,
    qkv_views,
    randn,
    ring_batch,
    rope_tables,
    routing,
)

from exaserve import kernels  # noqa: E402
from exaserve.kernels import fused_ops, triton_attention, triton_moe, triton_norm  # noqa: E402
from exaserve.kernels import torch_ops as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32_F16 = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def run(fn, *args, **kwargs):
    with poisoned():
        return fn(*args, **kwargs)


# -- row-wise ops -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", F32_F16)
@pytest.mark.parametrize("layout", ["rows", "heads"])
def test_rms_norm(dtype, layout):
    x = randn(7, 48, dtype=dtype) if layout == "rows" else qkv_views(5, 4, 2, 24, dtype)[0]
    w = randn(x.shape[-1], dtype=dtype)
    check(run(triton_norm.rms_norm, x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", F32_F16)
def test_add_rms_norm(dtype):
    x, r, w = randn(9, 40, dtype=dtype), randn(9, 40, dtype=dtype), randn(40, dtype=dtype)
    out, s = run(triton_norm.add_rms_norm, x, r, w, 1e-5)
    ref_out, ref_s = ref.add_rms_norm(x, r, w, 1e-5)
    check(out, ref_out, dtype)
    check(s, ref_s, dtype)


@pytest.mark.parametrize("dtype", F32_F16)
def test_rope(dtype):
    _, k, _ = qkv_views(6, 2, 3, 16, dtype)
    pos = torch.tensor([0, 1, 2, 17, 40, 63], device=DEVICE)
    cos, sin = rope_tables(64, 16)
    check(run(triton_norm.rope, k, pos, cos, sin), ref.rope(k, pos, cos, sin), dtype)


@pytest.mark.parametrize("dtype", F32_F16)
def test_silu_and_mul(dtype):
    x = randn(5, 2 * 40, dtype=dtype, scale=2.0)
    check(run(triton_norm.silu_and_mul, x), ref.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", F32_F16)
@pytest.mark.parametrize("use_rope", [True, False])
def test_qk_norm_rope(dtype, use_rope):
    q, k, _ = qkv_views(5, 8, 2, 16, dtype)
    qw, kw = randn(16, dtype=dtype), randn(16, dtype=dtype)
    pos = torch.tensor([0, 3, 4, 9, 30], device=DEVICE)
    cos, sin = rope_tables(32, 16)
    got = run(triton_norm.qk_norm_rope, q, k, qw, kw, 1e-5, pos, cos, sin, use_rope)
    want = fused_ops.qk_norm_rope(q, k, qw, kw, 1e-5, pos, cos, sin, use_rope)
    for g, w in zip(got, want):
        check(g, w, dtype)


# -- MoE ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", MOE_CASES)
def test_fused_moe(case, dtype):
    T, E, k, H, I, used = MOE_CASES[case]
    x = randn(T, H, dtype=dtype)
    w13, w2 = randn(E, 2 * I, H, dtype=dtype, scale=0.2), randn(E, H, I, dtype=dtype, scale=0.2)
    weights, ids = routing(T, E, k, used)
    check(run(triton_moe.fused_moe, x, w13, w2, weights, ids), ref.fused_moe(x, w13, w2, weights, ids), dtype)


def _check_alignment(ids, E, bm):
    """align's contract: every pair with an expert id >= 0 exactly once, in pair order within its expert; each
    tile one expert's pairs and never empty; tiles past the end -1; padding rows hold T*k."""
    pairs, experts = triton_moe.align(ids, E, bm)
    flat = ids.reshape(-1).cpu()
    pairs, experts = pairs.cpu(), experts.cpu()
    P = flat.numel()
    assert pairs.numel() == experts.numel() * bm
    assert ((pairs >= 0) & (pairs <= P)).all()
    # every live pair exactly once, grouped by expert, in pair order within its expert
    live = [i for i in sorted(range(P), key=lambda i: (flat[i].item(), i)) if flat[i] >= 0]
    assert pairs[pairs < P].tolist() == live
    seen_end = False
    for b, e in enumerate(experts.tolist()):
        tile = pairs[b * bm:(b + 1) * bm]
        tile = tile[tile < P]
        if e < 0:
            seen_end = True
            assert tile.numel() == 0
        else:
            assert not seen_end, "a live tile after the end marker"
            assert tile.numel() > 0 and (flat[tile.long()] == e).all()  # one expert per tile, no empty tiles
    return pairs, experts


@pytest.mark.parametrize("T,E,k,bm,used", [(11, 6, 2, 4, 4), (1, 8, 2, 16, None), (70, 5, 3, 4, None),
                                           (40, 200, 8, 16, None)])
def test_moe_align(T, E, k, bm, used):
    """Chunks of the single-program kernel: 70*3 pairs cross several; 200 experts pad to 256 columns."""
    _, ids = routing(T, E, k, used=used)
    _check_alignment(ids, E, bm)


def test_moe_align_skips_other_ranks_experts():
    """Expert parallel: id -1 marks an expert on another rank; its pair is not placed and no tile is spent on it."""
    _, ids = routing(9, 6, 3)
    ids[::2, 0] = -1
    ids[4] = -1
    _, experts = _check_alignment(ids, 6, 4)
    live = ids[ids >= 0]
    assert (experts >= 0).sum().item() == sum(-(-int((live == e).sum()) // 4) for e in range(6))
    everything_elsewhere = torch.full_like(ids, -1)
    pairs, experts = triton_moe.align(everything_elsewhere, 6, 4)
    assert (experts.cpu() == -1).all() and (pairs.cpu() == ids.numel()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_other_ranks_experts(dtype):
    """Pairs with expert -1 add nothing: the same output as routing them to any expert with weight 0."""
    T, E, k, H, I = 7, 6, 3, 40, 24
    x = randn(T, H, dtype=dtype)
    w13, w2 = randn(E, 2 * I, H, dtype=dtype, scale=0.2), randn(E, H, I, dtype=dtype, scale=0.2)
    weights, ids = routing(T, E, k)
    elsewhere = torch.rand(T, k, device=DEVICE) < 0.4
    elsewhere[0] = True                                  # a token with no local expert at all
    got = run(triton_moe.fused_moe, x, w13, w2, weights, torch.where(elsewhere, -1, ids))
    want = ref.fused_moe(x, w13, w2, torch.where(elsewhere, 0.0, weights), ids)
    check(got, want, dtype)
    assert (got[0] == 0).all()


@pytest.mark.parametrize("k,E,norm,groups", [(2, 8, True, 1), (8, 40, True, 1), (3, 16, False, 1), (4, 16, True, 4)])
def test_moe_route(k, E, norm, groups):
    """Sigmoid scores, top-k by score + bias, unbiased weights normalised and scaled: the torch path's choice
    (as a set per token) and weights; group-limited routing (n_group > 1) is the torch path's."""
    T, H = 9, 32
    x, gate, bias = randn(T, H), randn(E, H, scale=0.5), randn(E, scale=0.3)
    got_w, got_ids = run(triton_moe.moe_route, x, gate, bias, k, groups, min(groups, 2), norm, 2.5)
    want_w, want_ids = ref.moe_route(x, gate, bias, k, groups, min(groups, 2), norm, 2.5)
    assert got_ids.dtype == want_ids.dtype and got_w.dtype == want_w.dtype == torch.float32
    got_order, want_order = got_ids.sort(-1), want_ids.sort(-1)
    assert torch.equal(got_order.values, want_order.values)
    check(got_w.gather(1, got_order.indices), want_w.gather(1, want_order.indices), torch.float32)


def test_moe_tuned_config(monkeypatch):
    """A tuned table is looked up by (E, N, dtype) and the nearest M bucket at or above M (a table of another
    dtype is never used); a non-default tile (with launch-order grouping) computes the same thing."""
    table = {"E=8,N=24,dtype=float32": {"4": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4,
                                "num_stages": 2},
                          "64": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4,
                                 "num_stages": 2}}}
    monkeypatch.setattr(triton_moe, "_config_file", lambda name: table)
    triton_moe.get_config.cache_clear()
    try:
        f32 = torch.float32
        assert triton_moe.get_config(3, 8, 24, 2, f32)["BLOCK_M"] == 32
        assert triton_moe.get_config(5, 8, 24, 2, f32)["BLOCK_K"] == 64
        assert triton_moe.get_config(500, 8, 24, 2, f32)["BLOCK_K"] == 64
        assert triton_moe.get_config(5, 8, 48, 2, f32) == triton_moe.default_config(5, 8, 48, 2, f32)
        assert triton_moe.get_config(5, 8, 24, 2, torch.bfloat16) == triton_moe.default_config(5, 8, 24, 2,
                                                                                                torch.bfloat16)
        T, E, k, H, I = 37, 8, 2, 40, 24
        x = randn(T, H)
        w13, w2 = randn(E, 2 * I, H, scale=0.2), randn(E, H, I, scale=0.2)
        weights, ids = routing(T, E, k)
        expected = ref.fused_moe(x, w13, w2, weights, ids)
        check(run(triton_moe.fused_moe, x, w13, w2, weights, ids), expected, torch.float32)
        grouped = table["E=8,N=24,dtype=float32"]["4"]
        check(run(triton_moe.fused_moe, x, w13, w2, weights, ids, config=grouped), expected, torch.float32)
    finally:
        triton_moe.get_config.cache_clear()


# -- attention ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", F32_F16)
@pytest.mark.parametrize("case,gqa", [("mixed", "g1"), ("mixed", "g8"), ("mixed", "g3"), ("decode_only", "g8"),
                                      ("decode_only", "g1"), ("page16", "g8")])
def test_paged_attention(case, gqa, dtype):
    seqs, page = PAGED_CASES[case]
    nq, nkv = GQA[gqa]
    args = paged_batch(seqs, nq, nkv, 16, page, dtype)
    check(run(triton_attention.paged_attention, *args, 0.25), ref.paged_attention(*args, 0.25), dtype)


@pytest.mark.parametrize("dtype", F32_F16)
@pytest.mark.parametrize("splits", [2, 5])
def test_paged_attention_split_k(splits, dtype):
    """The split-K path (partials + merge kernel), on decodes and on a mixed batch; some splits are empty."""
    args = paged_batch([(70, 1), (0, 1), (33, 1), (20, 6)], 8, 2, 16, 4, dtype)
    out = run(triton_attention.paged_attention, *args, 0.25, num_splits=splits)
    check(out, ref.paged_attention(*args, 0.25), dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="long contexts are too slow for the interpreter")
def test_paged_attention_long_decode_auto_split():
    args = paged_batch([(8191, 1), (3000, 1)], 64, 8, 128, 16, torch.bfloat16)
    check(run(triton_attention.paged_attention, *args, 128 ** -0.5), ref.paged_attention(*args, 128 ** -0.5),
          torch.bfloat16)


@pytest.mark.parametrize("dtype", F32_F16)
@pytest.mark.parametrize("case,gqa", [("mixed", "g1"), ("mixed", "g8"), ("mixed", "g3"), ("window_edge", "g8"),
                                      ("decode_only", "g8"), ("decode_only", "g1")])
def test_ring_attention(case, gqa, dtype):
    nq, nkv = GQA[gqa]
    args = ring_batch(RING_CASES[case], 6, 8, nq, nkv, 16, dtype)
    check(run(triton_attention.ring_attention, *args, 0.25), ref.ring_attention(*args, 0.25), dtype)


@pytest.mark.parametrize("dtype", F32_F16)
@pytest.mark.parametrize("pool", ["paged", "ring"])
def test_write_kv(pool, dtype):
    _, k, v = qkv_views(7, 4, 2, 16, dtype)
    shape = (5, 4, 2, 16) if pool == "paged" else (3, 8, 2, 16)   # [blocks, page] or [slots, ring_len]
    kc, vc = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    slots = torch.tensor([3, -1, 17, 0, -1, 19, 8], device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    triton_attention.write_kv(k, v, kc, vc, slots)
    ref.write_kv(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


# -- the backend registry -----------------------------------------------------------------------------------

def test_backend_tables():
    """Each backend's table holds its own kernels and the torch path for ops it has none of; auto picks triton on
    CUDA and the C++ kernels on a CPU (torch where they did not build)."""
    torch_ops = kernels.select("torch", DEVICE)
    assert torch_ops.name == "torch" and torch_ops.rms_norm is ref.rms_norm and torch_ops.moe_route is ref.moe_route
    tri = kernels.select("triton", DEVICE)              # on a CPU: TRITON_INTERPRET=1 (tests/conftest.py)
    assert tri.name == "triton" and tri.rms_norm is triton_norm.rms_norm
    assert tri.fused_moe.__module__.startswith("exaserve.kernels.triton_")   # triton_moe's, or FP8's in front
    assert tri.paged_attention is triton_attention.paged_attention
    assert tri.moe_route is triton_moe.moe_route and tri.argmax is ref.argmax   # argmax: no Triton kernel
    auto = kernels.select("auto", DEVICE).name
    assert auto == ("triton" if DEVICE == "cuda" else "cpu" if kernels.cpu.available() else "torch")


def test_composite_ops_use_their_backends_kernels(monkeypatch):
    """mlp and moe of a backend without fused versions are made of that backend's own kernels."""
    calls = []
    silu = triton_norm.silu_and_mul
    monkeypatch.setattr(triton_norm, "silu_and_mul", lambda x: calls.append(x.shape) or silu(x))
    tri = kernels.select("triton", DEVICE)
    x, gate_up, down = randn(3, 16), randn(32, 16), randn(16, 16)
    check(tri.mlp(x, gate_up, down), ref.mlp(x, gate_up, down), torch.float32)
    assert calls == [(3, 32)]


def test_a_backend_that_cannot_run_here_is_a_clear_error(monkeypatch):
    with pytest.raises(kernels.BackendError, match="unknown kernel backend 'cuda'"):
        kernels.select("cuda", DEVICE)
    with pytest.raises(kernels.BackendError, match="the cpu backend runs on the CPU"):
        kernels.select("cpu", "cuda")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(kernels.BackendError, match="need a CUDA device"):
            kernels.select("triton", "cpu")


def test_kernels_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\nfrom exaserve import kernels\n"
            "assert not kernels.HAS_TRITON\n"
            "try:\n    kernels.select('triton', 'cpu')\nexcept kernels.BackendError as e:\n    print(e)\n"
            "print(kernels.select('auto', 'cpu').rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5).sum().item())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    message, total = res.stdout.strip().splitlines()
    assert "triton is not installed" in message
    assert float(total) == pytest.approx(8.0, rel=1e-4)
