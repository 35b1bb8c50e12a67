"""The CPU path of each op through the C++ kernels (kernels/cpu/exa_cpu.cpp): fp32 activations, weights in fp32,
bf16 or block FP8 (kernels/fp8.py). Same signatures as kernels/torch_ops.py: the `cpu` backend's op table
(kernels/__init__.py).

The GEMMs read weights in a packed layout (panels of 32 rows stored k-major; same shape, elements reordered).
The engine packs its parameters once after loading (engine/cpu_model.py, `pack_parameter`, which marks them
`exa_packed`); any other weight is packed on the fly per call, which is correct but slow (tests, ad-hoc use).
"""
import torch

from exaserve.kernels import cpu, fp8

_NONE = torch.empty(0)


def _ext():
    return cpu.load()


def is_packed(w) -> bool:
    return getattr(w, "exa_packed", False)


def pack_parameter(param: torch.Tensor, part: int | None = None) -> None:
    """Reorder a weight [..., N, K] into the packed layout, in parts of `part` rows (default N: one part; w13
    and gate_up use their gate width, so gate and up rows are separate parts). The parameter keeps its shape."""
    if is_packed(param):
        return
    param.data = _ext().pack(param.data, part or param.shape[-2])
    param.exa_packed = True
    if fp8.parts(param) is not None:
        param.exa_scale = _kernel_scale(param)


def _kernel_scale(w):
    """The C++ kernels' copy of an FP8 weight's scales: times the power of two their FP8 loads need
    (kernels/cpu/gemm.h: FP8_SCALE_EXP)."""
    return (fp8.parts(w)[0] * 2.0 ** _ext().fp8_scale_exp()).contiguous()


def _packed(w, part=None):
    return w if is_packed(w) else _ext().pack(w.contiguous(), part or w.shape[-2])


def _weight(w, part=None):
    """(packed weight, its kernel scales or an empty tensor, block size or 0): how the C++ ops take a weight."""
    p = fp8.parts(w)
    if p is None:
        return _packed(w, part), _NONE, 0
    return _packed(w, part), w.exa_scale if is_packed(w) else _kernel_scale(w), p[1]


def linear(x, w):
    return _ext().linear(x, *_weight(w))


def rms_norm(x, weight, eps):
    return _ext().rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    return tuple(_ext().add_rms_norm(x, residual, weight, eps))


def qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin, use_rope):
    return tuple(_ext().qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin, use_rope))


_NO_EXPERTS = ((_NONE, _NONE, 0), (_NONE, _NONE, 0))


def _experts(gate_up, down):
    """_weight of one expert's or a stack's weights: gate_up packed in gate/up parts, down in one part."""
    return _weight(gate_up, gate_up.shape[-2] // 2), _weight(down)


def _moe(x, routed, topk_weights, topk_ids, shared):
    """The C++ moe call: routed and shared are _experts pairs (or _NO_EXPERTS)."""
    (w13, s13, b13), (w2, s2, b2) = routed
    (sg, ssg, bg), (sd, ssd, bd) = shared
    return _ext().moe(x, w13, w2, topk_weights, topk_ids, sg, sd, s13, s2, ssg, ssd, max(b13, b2, bg, bd))


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    return _moe(x, _experts(w13, w2), topk_weights, topk_ids, _NO_EXPERTS)


def moe(x, w13, w2, topk_weights, topk_ids, shared_gate_up=None, shared_down=None):
    shared = _NO_EXPERTS if shared_gate_up is None else _experts(shared_gate_up, shared_down)
    return _moe(x, _experts(w13, w2), topk_weights, topk_ids, shared)


def mlp(x, gate_up, down):
    return _moe(x, _NO_EXPERTS, _NONE, _NONE, _experts(gate_up, down))


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    _ext().write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    return _ext().paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def ring_attention(q, k, v, k_ring, v_ring, ring_slots, query_start_loc, context_lens, window, scale):
    return _ext().ring_attention(q, k, v, k_ring, v_ring, ring_slots, query_start_loc, context_lens, window, scale)


def moe_route(x, gate_weight, bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0):
    return tuple(_ext().moe_route(x, gate_weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling))


def argmax(x):
    """Row-wise argmax of a 2-D fp32 tensor (int64)."""
    return _ext().argmax_rows(x)


def argmax_screen(lm_head: torch.Tensor):
    """The int8 screen of an lm_head [V, H] (unpacked, bf16 or fp32) for `screened_argmax`: a tuple of the
    packed int8 copy, the row scales and the row error bounds (see exa_cpu.cpp: Screened argmax)."""
    return tuple(_ext().argmax_screen(lm_head.contiguous()))


def screened_argmax(x, screen, lm_head, token_mask=None):
    """Row-wise argmax of x @ lm_head^T (x [M, H] fp32, lm_head packed) through its screen; the same tokens
    as `argmax(linear(x_row, lm_head))` row by row, reading about half of the lm_head's bytes. token_mask: an
    xgrammar token bitmask [M, ceil(V / 32)] int32 (bit set = allowed); the argmax is then the one of the
    logits with the masked ones at -inf."""
    return _ext().screened_argmax(x, *screen, _packed(lm_head), _mask(token_mask))


def _mask(token_mask):
    return _NO_MASK if token_mask is None else token_mask


_NO_MASK = torch.empty(0, dtype=torch.int32)


def make_layer(attn_norm, post_norm, attn, mlp_weights: dict, *, window: int, pool_index: int, route: dict | None):
    """A C++ decoder layer (kernels/cpu/exa_cpu.cpp: Layer) over the module's packed weights (shared storage).

    attn: the Attention module (qkv, o, q_norm, k_norm, nq, nkv, d, scale, eps, sliding, use_rope);
    mlp_weights: router, bias, w13, w2, shared_gate_up, shared_down (MoE) or shared_gate_up, shared_down
    (a dense MLP); route: top_k, n_group, topk_group, norm_topk_prob, scaling (MoE only)."""
    L = _ext().Layer()
    L.input_norm, L.post_norm = attn_norm, post_norm
    L.q_norm, L.k_norm = attn.q_norm, attn.k_norm
    for name, t in {"qkv": attn.qkv, "o": attn.o, **mlp_weights}.items():
        setattr(L, name, t)
        if fp8.parts(t) is not None:    # FP8: its kernel scales beside it, one block size per layer
            setattr(L, f"{name}_s", t.exa_scale)
            L.bk = fp8.parts(t)[1]
    L.nq, L.nkv, L.d = attn.nq, attn.nkv, attn.d
    L.window, L.pool_index = window or 0, pool_index
    L.sliding, L.use_rope, L.eps, L.scale = attn.sliding, attn.use_rope, attn.eps, attn.scale
    for name, value in (route or {}).items():
        setattr(L, name, value)
    return L


def _step_inputs(positions, meta, kv, rope):
    s = _ext().StepInputs()
    s.positions, s.cos, s.sin = positions, *rope
    s.query_start_loc, s.context_lens, s.seq_lens = meta.query_start_loc, meta.context_lens, meta.seq_lens
    s.block_tables, s.slot_mapping = meta.block_tables, meta.slot_mapping
    s.ring_slots, s.ring_mapping = meta.ring_slots, meta.ring_mapping
    s.ring_k, s.ring_v, s.paged_k, s.paged_v = kv.ring.k, kv.ring.v, kv.paged.k, kv.paged.v
    return s


def forward_layers(layers, x, positions, meta, kv, rope, before=None):
    """Run C++ decoder layers in sequence over the residual stream x [T, H]; meta is the step's AttnMetadata.
    `before` (optional) is called last thing before the C++ call, which releases the GIL for its duration."""
    s = _step_inputs(positions, meta, kv, rope)
    if before is not None:
        before()
    return _ext().forward_layers(layers, x, s)


def rows_step(layers, embed, input_ids, positions, meta, kv, rope, norm, eps, lm_head, rows, argmax, before=None,
              screen=(), token_mask=None):
    """A whole step in one C++ call: embedding, the layers, final norm and lm_head of `rows` (int64 tensor),
    and with `argmax` the argmax (through `screen`, the lm_head's argmax_screen, when given; over the tokens
    `token_mask` allows, as in screened_argmax, when given). Returns the logits [len(rows), V] fp32, or with
    `argmax` the tokens (int64)."""
    s = _step_inputs(positions, meta, kv, rope)
    if before is not None:
        before()
    return _ext().rows_step(layers, embed, input_ids, s, norm, eps, _packed(lm_head), rows, argmax, screen,
                            _mask(token_mask))
