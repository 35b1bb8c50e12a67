"""The C++ CPU kernels (kernels/cpu/exa_cpu.cpp) against the torch path, on the CPU.

Activations are fp32; weights fp32 or bf16 (the reference widens bf16 weights to fp32 first, so both are held
to the fp32 tolerance). Shapes are chosen to hit every tile shape of the GEMM (1, 2, 3, 4+ rows, tails in N
and K, the widened-weight path from 16 rows, row blocks of 64) and the attention edge cases shared with the
Triton tests (tests/kernel_cases.py).
"""
import zlib

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (
    GQA,
    MOE_CASES,
    PAGED_CASES,
    RING_CASES,
    check,
    paged_batch,
    qkv_views,
    ring_batch,
    rope_tables,
    routing,
)

from exaserve import kernels
from exaserve.kernels import cpu_ops, fused_ops
from exaserve.kernels import torch_ops as ref

pytestmark = pytest.mark.skipif(not kernels.cpu.available(), reason="C++ CPU kernels did not build here")
WEIGHTS = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def cpu(*tensors):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors]


def rn(*shape, scale=1.0):
    return torch.randn(*shape) * scale


def widened(w):
    return w.float()


# -- GEMM ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wdtype", WEIGHTS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 17, 70, 130])
@pytest.mark.parametrize("N,K", [(67, 40), (20, 64), (5, 200), (1, 16), (33, 7)])
def test_linear(M, N, K, wdtype):
    x = rn(M, K)
    w = rn(N, K).to(wdtype)
    check(cpu_ops.linear(x, w), F.linear(x, widened(w)), torch.float32)


def test_linear_strided_rows_and_batch_dims():
    base = rn(6, 50)
    x = base[:, 3:43]                            # row stride 50, unit column stride
    w = rn(24, 40).bfloat16()
    check(cpu_ops.linear(x, w), F.linear(x, w.float()), torch.float32)
    x3 = rn(2, 5, 40)
    check(cpu_ops.linear(x3, w), F.linear(x3, w.float()), torch.float32)


def test_linear_rejects_bad_input():
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_ops.linear(rn(3, 8), rn(4, 9))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float8_e4m3fn"):
        cpu_ops.linear(rn(3, 8), rn(4, 8).half())
    q = rn(4, 8).to(torch.float8_e4m3fn)    # FP8 without (or with misshapen) scales
    with pytest.raises(RuntimeError, match="needs its block size"):
        cpu_ops._ext().linear(rn(3, 8), cpu_ops._ext().pack(q, 4), torch.empty(0), 0)
    with pytest.raises(RuntimeError, match=r"scales of an FP8 weight .* must be contiguous fp32 \[1, 1\]"):
        cpu_ops._ext().linear(rn(3, 8), cpu_ops._ext().pack(q, 4), torch.ones(2, 1), 128)


# -- MoE ----------------------------------------------------------------------------------------------------

MOE_CPU_CASES = {**MOE_CASES,
                 # 70 tokens on one expert: the widened-weight tiles and two row blocks
                 "crowded": (70, 4, 1, 48, 40, 1),
                 "bench_like": (32, 32, 4, 64, 32, None)}


@pytest.mark.parametrize("wdtype", WEIGHTS)
@pytest.mark.parametrize("case", MOE_CPU_CASES)
def test_fused_moe(case, wdtype):
    T, E, k, H, I, used = MOE_CPU_CASES[case]
    x = rn(T, H)
    w13, w2 = rn(E, 2 * I, H, scale=0.2).to(wdtype), rn(E, H, I, scale=0.2).to(wdtype)
    weights, ids = cpu(*routing(T, E, k, used))
    check(cpu_ops.fused_moe(x, w13, w2, weights, ids), ref.fused_moe(x, widened(w13), widened(w2), weights, ids),
          torch.float32)


@pytest.mark.parametrize("wdtype", WEIGHTS)
@pytest.mark.parametrize("T", [1, 3, 19])
def test_moe_with_shared_expert_and_mlp(T, wdtype):
    E, k, H, I, Is = 6, 2, 48, 24, 40
    x = rn(T, H)
    w13, w2 = rn(E, 2 * I, H, scale=0.2).to(wdtype), rn(E, H, I, scale=0.2).to(wdtype)
    sgu, sd = rn(2 * Is, H, scale=0.2).to(wdtype), rn(H, Is, scale=0.2).to(wdtype)
    weights, ids = cpu(*routing(T, E, k))
    shared = ref.mlp(x, widened(sgu), widened(sd))
    check(cpu_ops.moe(x, w13, w2, weights, ids, sgu, sd),
          ref.fused_moe(x, widened(w13), widened(w2), weights, ids) + shared, torch.float32)
    check(cpu_ops.mlp(x, sgu, sd), shared, torch.float32)
    # the composite of backends without a fused MoE block (fused_moe + mlp), here the torch path's
    torch_moe = kernels.select("torch", "cpu").moe
    check(torch_moe(x, widened(w13), widened(w2), weights, ids, widened(sgu), widened(sd)),
          cpu_ops.moe(x, w13, w2, weights, ids, sgu, sd), torch.float32)


def test_moe_rejects_bad_expert_id():
    x, w13, w2 = rn(2, 16), rn(4, 16, 16), rn(4, 16, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.fused_moe(x, w13, w2, torch.ones(2, 1), torch.tensor([[1], [4]]))


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, True), (1, 1, False), (4, 2, True), (8, 3, True)])
def test_moe_route(n_group, topk_group, norm):
    T, E, H, k = 37, 32, 24, 4
    x, gate, bias = rn(T, H), rn(E, H, scale=0.3), rn(E, scale=0.1)
    w, ids = cpu_ops.moe_route(x, gate, bias, k, n_group, topk_group, norm, 2.5)
    rw, rids = ref.moe_route(x, gate, bias, k, n_group, topk_group, norm, 2.5)
    assert torch.equal(ids, rids)                # both in descending order of score + bias
    check(w, rw, torch.float32)


def test_argmax_ties_and_nan():
    x = rn(5, 1000)
    x[1, 7] = x[1, 900] = 50.0                     # tie: the first wins
    x[2, 333] = float("nan")                       # NaN counts as the largest, as in torch
    x[3, :] = -1.0
    x[4, 999] = 99.0                               # in the scalar tail
    assert torch.equal(cpu_ops.argmax(x), x.argmax(dim=-1))
    y = rn(3, 37)
    assert torch.equal(cpu_ops.argmax(y), y.argmax(dim=-1))


def plain_argmax(x, w):
    """The plain batch-1 path, row by row: every logit, then the argmax."""
    return torch.cat([cpu_ops.argmax(cpu_ops.linear(x[i:i + 1], w)) for i in range(x.shape[0])])


@pytest.mark.parametrize("wdtype", WEIGHTS)
@pytest.mark.parametrize("V,K", [(1000, 64), (77, 40), (5, 16), (300, 130)])
def test_screened_argmax_equals_plain_argmax(V, K, wdtype):
    """The int8 screen only decides which logits to skip: tokens equal the plain path's on every row, with
    exact ties (duplicate rows: the first wins), near-ties below the int8 step, and inputs of any scale."""
    w = rn(V, K, scale=0.05)
    near = list(range(4, V, 37)) + [V - 1]                # near-ties the int8 copy cannot tell apart, in
    if V > 10:                                             # many panels
        w[near] = w[4] + 1e-4 * rn(len(near), K)
        w[V // 2] = w[3]                                   # exact tie with an earlier row
    w = w.to(wdtype)
    screen = cpu_ops.argmax_screen(w)
    wp = w.clone()
    cpu_ops.pack_parameter(wp)
    x = rn(40, K) * torch.logspace(-3, 3, 40)[:, None]
    x[5] = 0.0                                             # all logits 0: the first row wins
    x[6:12] = w[3].float() * torch.linspace(0.5, 50, 6)[:, None]    # the duplicated row wins (its first copy)
    x[12:30] = w[4].float() + 1e-3 * rn(18, K)             # the near-tied rows compete
    want = plain_argmax(x, wp)
    for M in (1, 3, 17, 40):
        assert torch.equal(cpu_ops.screened_argmax(x[:M], screen, wp), want[:M])
    if V > 10:
        assert want[6] == 3 and {int(t) for t in want[12:30]} <= set(near)


def test_screened_argmax_bounds_hold_and_screen_out_most_rows():
    """The screen's per-row bound holds for every logit (the proof in exa_cpu.cpp), and it is tight enough to
    skip almost all of a random lm_head."""
    V, K = 4096, 256
    w = rn(V, K, scale=0.05).to(torch.bfloat16)
    q, scale, bound = screen = cpu_ops.argmax_screen(w)
    wf = w.double()
    codes = torch.clamp(torch.round(wf / scale.double()[:, None]), -127, 127)
    assert torch.equal(q, cpu_ops._ext().pack(codes.to(torch.int8), V))        # round-to-nearest int8 codes
    assert float(codes.abs().amax(dim=1).min()) == 127                      # each row spans the int8 range
    wp = w.clone()
    cpu_ops.pack_parameter(wp)
    x = rn(8, K)
    logits = cpu_ops.linear(x, wp).double()
    approx = scale.double() * (x.double() @ codes.T)
    slack = x.double().norm(dim=1, keepdim=True) * bound.double()
    assert bool(((logits - approx).abs() <= slack).all())
    passed = (approx + slack >= (approx - slack).amax(dim=1, keepdim=True)).sum(dim=1)
    assert int(passed.max()) < V // 100                                     # a handful of rows, not thousands
    assert torch.equal(cpu_ops.screened_argmax(x, screen, wp), plain_argmax(x, wp))


def bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """An xgrammar-style token bitmask (int32 [M, ceil(V / 32)], bit t % 32 of word t / 32) of a bool [M, V]."""
    M, V = allowed.shape
    bits = torch.zeros(M, (V + 31) // 32 * 32, dtype=torch.int64)
    bits[:, :V] = allowed.long()
    words = (bits.view(M, -1, 32) << torch.arange(32)).sum(dim=2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("V,K", [(1000, 64), (77, 40)])
def test_screened_argmax_under_a_token_mask(V, K):
    """With a grammar's token bitmask, the screened argmax is the argmax of the logits with the masked ones at
    -inf (xgrammar's apply_token_bitmask): the winner masked out, one allowed token, allowed tokens in one
    panel only, none allowed (index 0, as torch.argmax of all -inf), and rows with no mask."""
    w = rn(V, K, scale=0.05).to(torch.bfloat16)
    screen = cpu_ops.argmax_screen(w)
    wp = w.clone()
    cpu_ops.pack_parameter(wp)
    x = rn(8, K)
    logits = cpu_ops.linear(x, wp)
    allowed = torch.rand(8, V, generator=torch.Generator().manual_seed(1)) < 0.3
    allowed[0] = True                                      # no constraint
    allowed[1, logits[1].argmax()] = False                 # the free winner is masked out
    allowed[2] = False
    allowed[2, V - 1] = True                               # one token, in the tail panel
    allowed[3] = False
    allowed[3, 5:12] = True                                # a short run
    allowed[4] = False                                     # nothing allowed
    allowed[5, :] = False
    allowed[5, [3, V // 2]] = True
    x[5] = w[3].float() + w[V // 2].float()                # two allowed near-equals far apart
    masked = cpu_ops.linear(x, wp).masked_fill(~allowed, float("-inf"))
    want = masked.argmax(dim=-1)
    assert int(want[4]) == 0 and int(want[2]) == V - 1 and bool(allowed[torch.arange(8), want][[0, 1, 3, 5]].all())
    mask = bitmask(allowed)
    for M in (1, 5, 8):
        assert torch.equal(cpu_ops.screened_argmax(x[:M], screen, wp, mask[:M].contiguous()), want[:M])
    assert not torch.equal(cpu_ops.screened_argmax(x, screen, wp), want)    # the mask mattered
    with pytest.raises(RuntimeError, match="token mask"):
        cpu_ops.screened_argmax(x, screen, wp, mask[:3].contiguous())
    with pytest.raises(RuntimeError, match="token mask"):
        cpu_ops.screened_argmax(x, screen, wp, mask.long())


def test_screened_argmax_unscreenable_inputs_and_weights():
    w = rn(100, 32).to(torch.bfloat16)
    screen = cpu_ops.argmax_screen(w)
    wp = w.clone()
    cpu_ops.pack_parameter(wp)
    x = rn(4, 32)
    x[0, 3] = float("nan")                                 # every logit NaN: index 0, as torch.argmax
    x[1, 5] = float("inf")
    x[2] *= 1e30                                           # beyond the screen's range: every logit computed
    assert torch.equal(cpu_ops.screened_argmax(x, screen, wp), plain_argmax(x, wp))
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_ops.screened_argmax(rn(2, 31), screen, wp)
    bad = w.clone()
    bad[7, 1] = float("inf")
    with pytest.raises(RuntimeError, match="not finite"):
        cpu_ops.argmax_screen(bad)


# -- norms, q/k front, KV writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("wdtype", WEIGHTS)
@pytest.mark.parametrize("layout", ["rows", "heads"])
def test_rms_norm(layout, wdtype):
    x = rn(7, 48) if layout == "rows" else qkv_views(5, 4, 2, 24, torch.float32)[0].cpu()
    w = rn(x.shape[-1]).to(wdtype)
    check(cpu_ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, widened(w), 1e-5), torch.float32)


def test_add_rms_norm():
    x, r, w = rn(9, 40), rn(9, 40), rn(40)
    out, s = cpu_ops.add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_s = ref.add_rms_norm(x, r, w, 1e-5)
    check(out, ref_out, torch.float32)
    check(s, ref_s, torch.float32)


@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("use_rope", [True, False])
def test_qk_norm_rope(use_rope, d):
    q, k, _ = cpu(*qkv_views(5, 8, 2, d, torch.float32))
    qw, kw = rn(d), rn(d)
    pos = torch.tensor([0, 3, 4, 9, 30])
    cos, sin = cpu(*rope_tables(64, d))
    got = cpu_ops.qk_norm_rope(q, k, qw, kw, 1e-5, pos, cos, sin, use_rope)
    want = fused_ops.qk_norm_rope(q, k, qw, kw, 1e-5, pos, cos, sin, use_rope)
    for g, w in zip(got, want):
        check(g, w, torch.float32)
    with pytest.raises(RuntimeError, match="beyond the RoPE table"):
        cpu_ops.qk_norm_rope(q, k, qw, kw, 1e-5, pos + 40, cos, sin, True)


@pytest.mark.parametrize("pool", ["paged", "ring"])
def test_write_kv(pool):
    _, k, v = cpu(*qkv_views(7, 4, 2, 16, torch.float32))
    shape = (5, 4, 2, 16) if pool == "paged" else (3, 8, 2, 16)
    kc, vc = rn(*shape), rn(*shape)
    slots = torch.tensor([3, -1, 17, 0, -1, 19, 8])
    kc2, vc2 = kc.clone(), vc.clone()
    cpu_ops.write_kv(k, v, kc, vc, slots)
    ref.write_kv(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    with pytest.raises(RuntimeError, match="beyond the cache"):
        cpu_ops.write_kv(k, v, kc, vc, slots + 100)


# -- attention ----------------------------------------------------------------------------------------------

PAIRS = [("mixed", "g1"), ("mixed", "g8"), ("mixed", "g3"), ("decode_only", "g8"), ("decode_only", "g1")]


@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("case,gqa", PAIRS + [("page16", "g8")])
def test_paged_attention(case, gqa, d):
    seqs, page = PAGED_CASES[case]
    nq, nkv = GQA[gqa]
    args = cpu(*paged_batch(seqs, nq, nkv, d, page, torch.float32))
    check(cpu_ops.paged_attention(*args, 0.25), ref.paged_attention(*args, 0.25), torch.float32)


@pytest.mark.parametrize("d", [64, 128])
def test_paged_attention_long_context(d):
    """Contexts of hundreds of keys (the 16-key blocks and the vectorised softmax), a prefill chunk."""
    args = cpu(*paged_batch([(300, 1), (517, 1), (40, 70)], 8, 2, d, 16, torch.float32))
    check(cpu_ops.paged_attention(*args, 0.125), ref.paged_attention(*args, 0.125), torch.float32)


@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("case,gqa", PAIRS + [("window_edge", "g8")])
def test_ring_attention(case, gqa, d):
    nq, nkv = GQA[gqa]
    args = cpu(*ring_batch(RING_CASES[case], 6, 8, nq, nkv, d, torch.float32))
    check(cpu_ops.ring_attention(*args, 0.25), ref.ring_attention(*args, 0.25), torch.float32)


def test_ring_attention_window_128():
    """The real window: decodes far past the wrap-around and a 200-token chunk (longer than the window)."""
    args = cpu(*ring_batch([(1000, 1), (129, 1), (0, 200), (77, 3)], 128, 132, 8, 2, 64, torch.float32))
    check(cpu_ops.ring_attention(*args, 0.125), ref.ring_attention(*args, 0.125), torch.float32)


def test_attention_rejects_bad_metadata():
    args = cpu(*paged_batch([(3, 2)], 4, 2, 16, 4, torch.float32))
    q, kc, vc, tables, lens, qsl = args
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.paged_attention(q, kc, vc, tables + 100, lens, qsl, 0.25)
    with pytest.raises(RuntimeError, match="too few blocks"):
        cpu_ops.paged_attention(q, kc, vc, tables, lens + 20, qsl, 0.25)


# -- the engine ---------------------------------------------------------------------------------------------

def test_engine_bf16_weights_match_torch_path(tmp_path, monkeypatch):
    """A bf16 checkpoint on CPU: the C++ path keeps bf16 weights (half the bytes) and must give the torch
    path's greedy tokens (which upcasts the weights to fp32 at load), logprobs within 1e-4, in a batch mixing
    prefill chunks and decodes."""
    from exaserve.engine import LLM, SamplingParams
    from exaserve.engine.tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "m", preset="tiny", dtype="bfloat16", with_mtp=False)
    prompts = [[(7 * i + 3 * j) % 200 + 5 for j in range(n)] for i, n in enumerate([5, 23, 40, 9])]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)
    results = {}
    for mode in ("auto", "torch"):
        monkeypatch.setenv("EXASERVE_KERNELS", mode)
        llm = LLM(str(path), max_num_seqs=4, max_num_batched_tokens=32, block_size=4)
        wanted = torch.bfloat16 if mode == "auto" else torch.float32
        assert llm.engine.model.layers[1].attn.qkv.dtype == wanted
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        results[mode] = ([o.token_ids for o in outs], [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs])
    assert results["auto"][0] == results["torch"][0]
    diff = max(abs(a - b) for xs, ys in zip(results["auto"][1], results["torch"][1]) for a, b in zip(xs, ys))
    assert diff < 1e-4


def test_pack_layout_and_packed_parameters():
    """The packed layout: parts of `part` rows, panels of 32 rows stored k-major, a narrower last panel; a
    packed parameter is marked, read correctly by the C++ GEMM, and refused by the torch path."""
    w = torch.arange(2 * 40 * 3, dtype=torch.float32).view(1, 80, 3)       # one matrix, two parts of 40 rows
    packed = kernels.cpu.load().pack(w, 40)
    flat = packed.view(-1)
    for part in (0, 1):
        base = part * 40 * 3
        for row in range(40):
            panel, j = divmod(row, 32)
            width = 32 if panel == 0 else 8
            for k in range(3):
                assert flat[base + panel * 32 * 3 + k * width + j] == w[0, part * 40 + row, k]
    p = torch.nn.Parameter(rn(70, 24).bfloat16(), requires_grad=False)
    plain = p.detach().clone()
    cpu_ops.pack_parameter(p)
    assert cpu_ops.is_packed(p) and not torch.equal(p.detach(), plain)
    x = rn(5, 24)
    check(cpu_ops.linear(x, p), F.linear(x, plain.float()), torch.float32)
    with pytest.raises(RuntimeError, match="packed for the C\\+\\+ CPU kernels"):
        ref.linear(x, p)


def test_fused_layers_match_per_op_path(tmp_path):
    """The engine's one-call C++ decoder stack gives the per-op path's tokens and logprobs (a model with dense
    and MoE layers, shared and grouped routing, sliding and global attention)."""
    from exaserve.engine import LLM, SamplingParams
    from exaserve.testing import make_hf_checkpoint
    make_hf_checkpoint(tmp_path, num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=6,
                       num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    llm = LLM(str(tmp_path), dtype="float32", max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    runner = llm.engine.runner
    assert runner.cpu_model is not None
    prompts = [[(5 * i + 7 * j) % 90 + 3 for j in range(n)] for i, n in enumerate([3, 11, 20, 7])]
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=0, ignore_eos=True)

    def run():
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        return [o.token_ids for o in outs], [[lp[t] for lp, t in zip(o.logprobs, o.token_ids)] for o in outs]

    fused = run()
    runner.cpu_model, runner.forward = None, llm.engine.model.forward    # per op, over the same packed weights
    per_op = run()
    assert fused[0] == per_op[0]
    assert max(abs(a - b) for xs, ys in zip(fused[1], per_op[1]) for a, b in zip(xs, ys)) < 1e-4


def test_one_call_steps_match_forward_then_sampler(tmp_path, monkeypatch):
    """Steps whose batch needs no hidden states run as one C++ call (embedding to the sampled rows' logits, or
    to their argmax when all are plain greedy); tokens and logprobs equal those of forward + compute_logits +
    sampler, with prompts chunked so steps mix prefill and decode rows, for greedy, logprobs and seeded
    sampled requests in one batch."""
    from exaserve.engine import LLM, SamplingParams
    from exaserve.testing import make_hf_checkpoint
    make_hf_checkpoint(tmp_path, num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=6,
                       num_experts=8, num_experts_per_tok=2)
    llm = LLM(str(tmp_path), dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    runner = llm.engine.runner
    model, cpu_model = llm.engine.model, runner.cpu_model
    calls = []
    rows_step = cpu_model.rows_step
    prompts = [[(5 * i + 7 * j) % 90 + 3 for j in range(n)] for i, n in enumerate([3, 11, 20, 7])]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    mixed = [greedy, SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True), greedy,
             SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)]

    def run(params, one_call: bool):
        calls.clear()
        if one_call:
            monkeypatch.setattr(cpu_model, "rows_step", lambda *a: calls.append(a[5]) or rows_step(*a))
        else:  # the C++ decoder stack, then compute_logits and the sampler in Python
            monkeypatch.setattr(runner, "cpu_model", None)
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        return [o.token_ids for o in outs], [o.logprobs for o in outs]

    fused = run(greedy, True)
    assert len(calls) >= 12 and all(calls)                  # every step: argmax in C++
    assert len(cpu_model.screen) == 3                       # through the lm_head's int8 screen
    assert run(greedy, False) == fused
    assert not calls
    monkeypatch.undo()
    monkeypatch.setattr(cpu_model, "screen", ())            # every logit computed
    assert run(greedy, True) == fused
    monkeypatch.undo()
    tokens, logprobs = run(mixed, True)
    assert calls and not all(calls)                         # steps with the sampled rows: logits from C++
    ref_tokens, ref_logprobs = run(mixed, False)
    assert tokens == ref_tokens and tokens[0] == fused[0][0] and tokens[2] == fused[0][2]
    for got, want in zip(logprobs[1], ref_logprobs[1]):
        assert got.keys() == want.keys() and max(abs(got[t] - want[t]) for t in got) < 1e-5
    with pytest.raises(RuntimeError, match="token id 1000 out of range"):
        cpu_ops._ext().embed_rows(model.embed, torch.tensor([3, 1000]))


def test_build_kernels_command(capsys):
    from exaserve.cli import main
    assert main(["build-kernels"]) == 0
    assert "C++ CPU kernels ready" in capsys.readouterr().out


def test_stale_build_lock_is_cleared():
    """A build killed midway leaves torch's lock file behind; the next load must clear it, not wait forever."""
    import subprocess
    import sys
    from pathlib import Path
    where = kernels.cpu.build_dir([])
    (where / "lock").touch()
    code = "from exaserve.kernels import cpu; import sys; sys.exit(0 if cpu.load() is not None else 1)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "interrupted kernel build" in done.stderr
    assert not (where / "lock").exists()


def test_build_dir_is_per_environment(monkeypatch):
    """Two virtual environments with the same torch version must not share a build folder: torch's builder sees
    different include paths and rebuilds, so they would rebuild over each other on every start."""
    import sys
    here = kernels.cpu.build_dir([])
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-venv")
    assert kernels.cpu.build_dir([]) != here
    monkeypatch.undo()
    assert kernels.cpu.build_dir([]) == here  # and stable within one environment


def test_build_dir_is_per_source_folder(monkeypatch, tmp_path):
    """Two checkouts of one version (a benchmark's base worktree) must not share a build folder either: torch's
    builder rebuilds when the source path changes."""
    here = kernels.cpu.build_dir([])
    monkeypatch.setattr(kernels.cpu, "SOURCE", tmp_path / kernels.cpu.SOURCE.name)
    assert kernels.cpu.build_dir([]) != here
