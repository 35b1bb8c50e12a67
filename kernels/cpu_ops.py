"""The CPU path of each op through the C++ kernels (kernels/cpu/exa_cpu.cpp): fp32 activations, weights in fp32
or bf16. Same signatures as kernels/torch_ops.py; dispatch in kernels/__init__.py sends fp32 CPU tensors here
when the extension is built.

The GEMMs read weights in a packed layout (panels of 32 rows stored k-major; same shape, elements reordered).
The engine packs its parameters once after loading (`pack_parameter`, which marks them `exa_packed`); any
other weight is packed on the fly per call, which is correct but slow (tests, ad-hoc use).
"""
import torch

from kernels import cpu

_NONE = torch.empty(0)


def _ext():
    return cpu.load()


def pack_parameter(param: torch.Tensor, part: int | None = None) -> None:
    """Reorder a weight [..., N, K] in place into the packed layout, in parts of `part` rows (default N: one
    part; w13 and gate_up use their gate width, so gate and up rows are separate parts)."""
    if getattr(param, "exa_packed", False):
        return
    param.data.copy_(_ext().pack(param.data, part or param.shape[-2]))
    param.exa_packed = True


def _packed(w, part=None):
    return w if getattr(w, "exa_packed", False) else _ext().pack(w.contiguous(), part or w.shape[-2])


def is_packed(w) -> bool:
    return getattr(w, "exa_packed", False)


def linear(x, w):
    return _ext().linear(x, _packed(w))


def rms_norm(x, weight, eps):
    return _ext().rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    h, s = _ext().add_rms_norm(x, residual, weight, eps)
    return h, s


def qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin, use_rope):
    q, k = _ext().qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin, use_rope)
    return q, k


def _experts(gate_up, down):
    """Packed (gate_up in gate/up parts, down in one part) versions of one expert's or a stack's weights."""
    return _packed(gate_up, gate_up.shape[-2] // 2), _packed(down)


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    return _ext().moe(x, *_experts(w13, w2), topk_weights, topk_ids, _NONE, _NONE)


def moe(x, w13, w2, topk_weights, topk_ids, shared_gate_up=None, shared_down=None):
    shared = (_NONE, _NONE) if shared_gate_up is None else _experts(shared_gate_up, shared_down)
    return _ext().moe(x, *_experts(w13, w2), topk_weights, topk_ids, *shared)


def mlp(x, gate_up, down):
    return _ext().moe(x, _NONE, _NONE, _NONE, _NONE, *_experts(gate_up, down))


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    _ext().write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    return _ext().paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def ring_attention(q, k, v, k_ring, v_ring, ring_slots, query_start_loc, context_lens, window, scale):
    return _ext().ring_attention(q, k, v, k_ring, v_ring, ring_slots, query_start_loc, context_lens, window, scale)


def moe_route(x, gate_weight, bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0):
    w, ids = _ext().moe_route(x, gate_weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling)
    return w, ids


def argmax(x):
    """Row-wise argmax of a 2-D fp32 tensor (int64)."""
    return _ext().argmax_rows(x)
