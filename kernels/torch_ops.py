"""Reference (torch) implementations of every compute op.

These are the numerical reference the Triton and C++ CPU kernels are tested against, and the path taken where
neither applies. Each op has the same signature as its public function in `kernels/__init__.py`.
"""
import torch
import torch.nn.functional as F

from exaserve.kernels import fp8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rms_norm(x + residual), x + residual): the pre-norm block's residual update fused with its norm."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T, computed in x's dtype (a weight stored narrower, e.g. bf16 beside fp32 activations, is
    widened first; an FP8 weight is dequantized with its block scales, kernels/fp8.py)."""
    _not_packed(weight)
    if weight.dtype == fp8.FP8:
        return F.linear(x, fp8.dequantize(weight, x.dtype))
    return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))


def _not_packed(weight) -> None:
    if getattr(weight, "exa_packed", False):
        raise RuntimeError("this weight is packed for the C++ CPU kernels (kernels/cpu_ops.py); the torch path "
                           "cannot read it (only a model built with the cpu backend's ops may be packed)")


def mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP: down(silu(gate x) * up x); gate_up [2I, H] holds the gate rows first."""
    return linear(silu_and_mul(linear(x, gate_up)), down)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE over the full head dim. x [T, n, d]; cos/sin [max_pos, d/2] fp32 tables."""
    half = x.shape[-1] // 2
    c = cos[positions].to(x.dtype)[:, None, :]
    s = sin[positions].to(x.dtype)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] holding gate then up -> silu(gate) * up [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_route(x, gate_weight, bias, top_k: int, n_group: int = 1, topk_group: int = 1,
              norm_topk_prob: bool = True, scaling: float = 1.0):
    """Sigmoid router with a selection-only correction bias (fp32).

    Returns (weights fp32 [T, k], expert ids int64 [T, k]).
    """
    scores = torch.sigmoid(F.linear(x.float(), gate_weight.float()))
    choice = scores + bias
    if n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of a 2-D tensor (int64)."""
    return x.argmax(dim=-1)


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    """Routed experts: sum_k w_k * down_e(silu(gate_e x) * up_e x), accumulated in fp32.

    x [T, H]; w13 [E, 2I, H] (gate rows first); w2 [E, H, I] (FP8 weights are dequantized expert by expert);
    topk_weights fp32 [T, k]; topk_ids [T, k], where -1 is an expert held by another rank (expert parallel):
    it contributes nothing.
    """
    _not_packed(w13)
    T, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids + 1, minlength=w13.shape[0] + 1).tolist()   # + 1: -1 counts first
    token_of = order // k
    xs = x[token_of]
    routed = torch.zeros(T * k, x.shape[1], dtype=torch.float32, device=x.device)
    start = counts[0]
    for e, n in enumerate(counts[1:]):
        if n == 0:
            continue
        end = start + n
        h = silu_and_mul(F.linear(xs[start:end], fp8.dequantize(w13, x.dtype, e)))
        routed[start:end] = F.linear(h, fp8.dequantize(w2, x.dtype, e)).float()
        start = end
    routed *= topk_weights.reshape(-1)[order, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, routed)
    return out.to(x.dtype)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Store k/v [T, nkv, d] at flat slots of a cache [..., slots_per_row, nkv, d]; slot -1 = skip the token."""
    kc = k_cache.view(-1, *k_cache.shape[-2:])
    vc = v_cache.view(-1, *v_cache.shape[-2:])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    kc.index_copy_(0, slot_mapping, k)
    vc.index_copy_(0, slot_mapping, v)


# Sequences whose new queries number at most this are attended together in one padded batch (decodes,
# draft verifications); longer prefill chunks are attended one by one.
SHORT_QUERY = 8


def _attend(q, k, v, mask, scale):
    """q [B, lq, nq, d]; k/v [B, lk, nkv, d]; mask [B, lq, lk] bool (True = visible) -> [B, lq, nq, d].

    Scores and the weighted sum run in q's dtype, the softmax in fp32 (as the reference model does)."""
    B, lq, nq, d = q.shape
    nkv, lk = k.shape[2], k.shape[1]
    g = nq // nkv
    # The g query heads of a KV head become extra query rows: broadcasting K/V over them instead would make
    # matmul materialise g copies of the keys.
    qh = q.view(B, lq, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(B, nkv, g * lq, d)
    kh = k.permute(0, 2, 3, 1)                                              # [B, nkv, d, lk]
    vh = v.permute(0, 2, 1, 3)                                              # [B, nkv, lk, d]
    scores = (torch.matmul(qh, kh) * scale).view(B, nkv, g, lq, lk)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(B, nkv, g * lq, lk), vh)                  # [B, nkv, g*lq, d]
    return out.view(B, nkv, g, lq, d).permute(0, 3, 1, 2, 4).reshape(B, lq, nq, d)


def _split(query_start_loc):
    """(starts, query lengths, indices of short sequences, indices of long ones)."""
    starts = query_start_loc.tolist()
    lens = [b - a for a, b in zip(starts, starts[1:])]
    short = [s for s, n in enumerate(lens) if 0 < n <= SHORT_QUERY]
    long = [s for s, n in enumerate(lens) if n > SHORT_QUERY]
    return starts, lens, short, long


def _gather_queries(q, starts, lens, seqs):
    """Padded [B, Qmax, nq, d] queries of the given sequences, the row of each, and which rows are real."""
    qmax = max(lens[s] for s in seqs)
    j = torch.arange(qmax, device=q.device)
    first = torch.tensor([starts[s] for s in seqs], device=q.device)
    n = torch.tensor([lens[s] for s in seqs], device=q.device)
    real = j[None, :] < n[:, None]
    rows = first[:, None] + torch.where(real, j[None, :], 0)
    return q[rows], rows, real, n


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """Causal attention of each sequence's new queries over its whole paged context (global layers, no RoPE).

    q [T, nq, d]; k/v_cache [num_blocks, block_size, nkv, d] already holding this step's keys;
    block_tables [S, max_blocks]; seq_lens [S] = context length after this step; query_start_loc [S+1].
    """
    out = torch.empty_like(q)
    bs = k_cache.shape[1]
    starts, lens, short, long = _split(query_start_loc)
    ctx = seq_lens.tolist()
    if short:
        qs, rows, real, n = _gather_queries(q, starts, lens, short)
        idx = torch.tensor(short, device=q.device)
        L = max(ctx[s] for s in short)
        blocks = block_tables[idx, : (L + bs - 1) // bs].long()
        k = k_cache[blocks].flatten(1, 2)[:, :L]
        v = v_cache[blocks].flatten(1, 2)[:, :L]
        qpos = seq_lens[idx, None] - n[:, None] + torch.arange(qs.shape[1], device=q.device)[None, :]
        mask = torch.arange(L, device=q.device)[None, None, :] <= qpos[:, :, None]
        out[rows[real]] = _attend(qs, k, v, mask, scale)[real]
    for s in long:
        a, b, L = starts[s], starts[s + 1], ctx[s]
        blocks = block_tables[s, : (L + bs - 1) // bs].long()
        k = k_cache[blocks].flatten(0, 1)[:L]
        v = v_cache[blocks].flatten(0, 1)[:L]
        qpos = torch.arange(L - (b - a), L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        out[a:b] = _attend(q[None, a:b], k[None], v[None], mask[None], scale)[0]
    return out


def ring_attention(q, k, v, k_ring, v_ring, ring_slots, query_start_loc, context_lens, window: int, scale):
    """Sliding-window attention: keys of earlier steps come from the ring, this chunk's from k/v.

    q [T, nq, d]; k/v [T, nkv, d] (this step, RoPE applied); k/v_ring [num_slots, ring_len, nkv, d], where
    position p of a sequence lives at row p % ring_len of its slot; context_lens [S] = tokens before this
    step. A query at position p sees keys p-window+1 .. p.
    """
    out = torch.empty_like(q)
    ring_len = k_ring.shape[1]
    starts, lens, short, long = _split(query_start_loc)
    dev = q.device
    if short:
        qs, rows, real, n = _gather_queries(q, starts, lens, short)
        idx = torch.tensor(short, device=dev)
        c = context_lens[idx].long()[:, None]
        old_pos = c - (window - 1) + torch.arange(window - 1, device=dev)[None, :]      # [B, window-1]
        slot = ring_slots[idx][:, None]
        k_all = torch.cat((k_ring[slot, old_pos % ring_len], k[rows]), dim=1)
        v_all = torch.cat((v_ring[slot, old_pos % ring_len], v[rows]), dim=1)
        qpos = c + torch.arange(qs.shape[1], device=dev)[None, :]
        kpos = torch.cat((old_pos, qpos), dim=1)
        kp, qp = kpos[:, None, :], qpos[:, :, None]
        mask = (kp <= qp) & (kp > qp - window) & (kp >= 0)
        out[rows[real]] = _attend(qs, k_all, v_all, mask, scale)[real]
    ctx = context_lens.tolist()
    slots = ring_slots.tolist()
    for s in long:
        a, b, c = starts[s], starts[s + 1], ctx[s]
        n_old = min(c, window - 1)
        old_pos = torch.arange(c - n_old, c, device=dev)
        rows_ = old_pos % ring_len
        kk = torch.cat((k_ring[slots[s], rows_], k[a:b]))
        vv = torch.cat((v_ring[slots[s], rows_], v[a:b]))
        kpos = torch.arange(c - n_old, c + (b - a), device=dev)
        qpos = torch.arange(c, c + (b - a), device=dev)
        mask = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
        out[a:b] = _attend(q[None, a:b], kk[None], vv[None], mask[None], scale)[0]
    return out
