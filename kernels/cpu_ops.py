"""The CPU path of each op through the C++ kernels (kernels/cpu/exa_cpu.cpp): fp32 activations, weights in fp32
or bf16. Same signatures as kernels/torch_ops.py; dispatch in kernels/__init__.py sends fp32 CPU tensors here
when the extension is built."""
import torch

from kernels import cpu

_NONE = torch.empty(0)


def _ext():
    return cpu.load()


def linear(x, w):
    y = _ext().linear(x.reshape(-1, x.shape[-1]), w)
    return y.view(*x.shape[:-1], w.shape[0])


def rms_norm(x, weight, eps):
    return _ext().rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)


def add_rms_norm(x, residual, weight, eps):
    h, s = _ext().add_rms_norm(x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1]), weight, eps)
    return h.view(x.shape), s.view(x.shape)


def qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin, use_rope):
    q, k = _ext().qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos, sin, use_rope)
    return q, k


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    return _ext().moe(x, w13, w2, topk_weights, topk_ids, _NONE, _NONE)


def moe(x, w13, w2, topk_weights, topk_ids, shared_gate_up=None, shared_down=None):
    if shared_gate_up is None:
        shared_gate_up = shared_down = _NONE
    return _ext().moe(x, w13, w2, topk_weights, topk_ids, shared_gate_up, shared_down)


def mlp(x, gate_up, down):
    return _ext().moe(x, _NONE, _NONE, _NONE, _NONE, gate_up, down)


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
