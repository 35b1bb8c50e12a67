"""Triton attention over the two KV pools, and the KV write.

paged_attention and ring_attention share one kernel (the constexpr RING picks where keys come from). It
takes one flat batch mixing prefill chunks and decodes. A program owns a tile of BLOCK_Q consecutive queries
of one sequence times the G query heads of one KV head (GQA packing: the BLOCK_Q*G rows share every K/V tile
they load), walks the keys it may see in BLOCK_N steps with an online softmax in fp32 (exp2, the scale
folded with log2 e), and writes its rows. Tiles are numbered across the batch by a prefix sum of tiles per
sequence (decode-only batches skip it: one program per sequence); the grid is sized from an upper bound, so
there is no host sync.

Few variants compile: the constexprs are the model's shapes (heads, head_dim, page size), the dtype, and three
switches (ring or paged, decode-only or not, split or not); batch-dependent integers are run-time values that
Triton does not specialise on (do_not_specialize), so a new batch shape never stalls serving on a compile.

- paged (global layers, no RoPE): causal over the sequence's pages; a key position maps through the block
  table (page size a constexpr). For a few queries over long contexts the key range is split into
  num_splits parts (a run-time count, a power of two when chosen here) run by separate programs (split-K)
  and merged by a small reduction kernel.
- ring (sliding layers): keys before the chunk come from the sequence's ring slot (position p at row
  p % ring_len), the chunk's own keys from the fresh k/v; a query at p sees p-window+1 .. p. A tile walks the
  ring's keys, then the fresh ones: each key tile is read from one source.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from exaserve.kernels.triton_common import INTERPRET, cdiv, dot_precision, pow2

LOG2E = 1.4426950408889634


# Batch-dependent integers are not specialised (a value of 1 or a multiple of 16 would otherwise compile a
# variant of its own the first time a batch shape shows it).
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "split_len", "stab"])
def _attention_kernel(
        q_ptr, out_ptr, part_o_ptr, part_ml_ptr,
        k_ptr, v_ptr,             # paged: the caches [blocks, page, nkv, d]; ring: this step's k/v [T, nkv, d]
        kr_ptr, vr_ptr,           # ring: the pool [slots, ring_len, nkv, d] (unused when paged)
        seq_ptr,                  # paged: block tables [S, max_blocks]; ring: ring slot [S]
        lens_ptr,                 # paged: seq_lens (after the step); ring: context_lens (before it)
        qsl_ptr, cu_tiles_ptr, num_seqs, num_splits, qk_scale, window, split_len, ring_len,
        sqt, sqh, skb, skp, skh, svb, svp, svh, srs, srp, srh, svrs, svrp, svrh, sot, soh, stab,
        RING: tl.constexpr, PAGE: tl.constexpr, DECODE: tl.constexpr, SPLIT: tl.constexpr, G: tl.constexpr,
        G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr):
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        # one query per sequence: program = sequence
        s = tl.program_id(0)
        tile = 0
    else:
        # which sequence and which of its query tiles: cu_tiles is the prefix sum of tiles per sequence
        s = tl.program_id(0) * 0
        for base in range(0, num_seqs, 256):
            offs = base + tl.arange(0, 256)
            ends = tl.load(cu_tiles_ptr + 1 + offs, mask=offs < num_seqs, other=2147483647)
            s += tl.sum((ends <= tl.program_id(0)).to(tl.int32), axis=0)
        if s >= num_seqs:
            return
        tile = tl.program_id(0) - tl.load(cu_tiles_ptr + s)
    q_start = tl.load(qsl_ptr + s)
    qlen = tl.load(qsl_ptr + s + 1) - q_start
    if RING:
        c = tl.load(lens_ptr + s)
    else:
        c = tl.load(lens_ptr + s) - qlen          # tokens cached before this step's
    rows = tl.arange(0, BLOCK_Q * G_PAD)          # row = (query of the tile, head of the group)
    qi = tile * BLOCK_Q + rows // G_PAD
    head = kvh * G + rows % G_PAD
    row_ok = (qi < qlen) & (rows % G_PAD < G)
    qpos = c + qi
    tok = (q_start + qi).to(tl.int64)
    dims = tl.arange(0, D_PAD)
    d_ok = dims[None, :] < D
    q = tl.load(q_ptr + tok[:, None] * sqt + head[:, None] * sqh + dims[None, :], mask=row_ok[:, None] & d_ok,
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # keys this tile may see: causal up to its last query, a window back from its first (ring), one split
    first = c + tile * BLOCK_Q
    hi = tl.where(c + qlen < first + BLOCK_Q, c + qlen, first + BLOCK_Q)
    if RING:
        # two runs of key tiles, each read from one source: the ring's [lo, ring_end), then the step's own
        # [fresh_lo, hi)
        lo = tl.where(first - window + 1 > 0, first - window + 1, 0)
        ring_end = tl.where(c < hi, c, hi)
        fresh_lo = tl.where(lo > c, lo, c)
        n_ring = tl.where(ring_end > lo, (ring_end - lo + BLOCK_N - 1) // BLOCK_N, 0)
        n_tiles = n_ring + tl.where(hi > fresh_lo, (hi - fresh_lo + BLOCK_N - 1) // BLOCK_N, 0)
        slot = tl.load(seq_ptr + s).to(tl.int64)
    else:
        lo = split * split_len
        hi = tl.where(lo + split_len < hi, lo + split_len, hi)
        n_tiles = tl.where(hi > lo, (hi - lo + BLOCK_N - 1) // BLOCK_N, 0)
        table = seq_ptr + s.to(tl.int64) * stab
    m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_Q * G_PAD], 0.0, tl.float32)
    acc = tl.full([BLOCK_Q * G_PAD, D_PAD], 0.0, tl.float32)
    for i in range(0, n_tiles):
        if RING:
            if i < n_ring:      # keys before the step: the ring, position p at row p % ring_len
                kpos = lo + i * BLOCK_N + tl.arange(0, BLOCK_N)
                in_range = kpos < ring_end
                k_ok = in_range[:, None] & d_ok
                r = (kpos % ring_len).to(tl.int64)[:, None]
                k = tl.load(kr_ptr + slot * srs + r * srp + kvh * srh + dims[None, :], mask=k_ok, other=0.0)
                v = tl.load(vr_ptr + slot * svrs + r * svrp + kvh * svrh + dims[None, :], mask=k_ok, other=0.0)
            else:               # the step's own keys
                kpos = fresh_lo + (i - n_ring) * BLOCK_N + tl.arange(0, BLOCK_N)
                in_range = kpos < hi
                k_ok = in_range[:, None] & d_ok
                t = (q_start + kpos - c).to(tl.int64)[:, None]
                k = tl.load(k_ptr + t * skb + kvh * skh + dims[None, :], mask=k_ok, other=0.0)
                v = tl.load(v_ptr + t * svb + kvh * svh + dims[None, :], mask=k_ok, other=0.0)
            visible = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window) & in_range[None, :]
        else:
            kpos = lo + i * BLOCK_N + tl.arange(0, BLOCK_N)
            in_range = kpos < hi
            page = tl.load(table + kpos // PAGE, mask=in_range, other=0).to(tl.int64)[:, None]
            within = (kpos % PAGE)[:, None]
            k_ok = in_range[:, None] & d_ok
            k = tl.load(k_ptr + page * skb + within * skp + kvh * skh + dims[None, :], mask=k_ok, other=0.0)
            v = tl.load(v_ptr + page * svb + within * svp + kvh * svh + dims[None, :], mask=k_ok, other=0.0)
            visible = (kpos[None, :] <= qpos[:, None]) & in_range[None, :]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # online softmax in the log2 domain
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        sc = tl.where(visible, sc, float("-inf"))
        m_tile = tl.max(sc, axis=1)
        m_new = tl.where(m_tile > m_i, m_tile, m_i)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # rows that see nothing yet stay at zero
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    if SPLIT:
        # this split's unnormalised acc, running max and sum; _merge_splits_kernel combines the splits
        part = (tok * (tl.num_programs(1) * G) + head) * num_splits + split
        tl.store(part_o_ptr + part[:, None] * D_PAD + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok[:, None] * sot + head[:, None] * soh + dims[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)


MAX_SPLITS = 64


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_o_ptr, part_ml_ptr, out_ptr, nq, num_splits, sot, soh, MAX_SPLITS: tl.constexpr,
                         D: tl.constexpr, D_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)          # one (token, head)
    sp = tl.arange(0, MAX_SPLITS)
    dims = tl.arange(0, D_PAD)
    ok = sp < num_splits
    base = row * num_splits + sp
    m = tl.load(part_ml_ptr + base * 2, mask=ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + base * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    o = tl.load(part_o_ptr + base[:, None] * D_PAD + dims[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(w * l, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(total == 0.0, 1.0, total)
    ptrs = out_ptr + (row // nq) * sot + (row % nq) * soh + dims
    tl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=dims < D)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def auto_splits(num_tiles: int, nkv: int, max_ctx: int, sms: int) -> int:
    """Split-K parts for a paged decode of num_tiles query tiles over contexts up to max_ctx: enough programs to
    fill the SMs twice, each split at least 512 keys, a power of two (so few distinct buffer sizes) up to
    MAX_SPLITS; 1 when the grid already fills the device or contexts are short."""
    programs = num_tiles * nkv
    if max_ctx < 2048 or programs >= sms:
        return 1
    want = min(cdiv(2 * sms, programs), max_ctx // 512, MAX_SPLITS)
    return min(pow2(want), MAX_SPLITS)


def _launch(q, k, v, k_ring, v_ring, per_seq, lens, query_start_loc, scale, *, ring, window, page,
            num_splits, max_ctx):
    """Shared host side of paged_attention and ring_attention: tiling, split choice, the launch, the merge."""
    T, nq, d = q.shape
    S = lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or S == 0:
        return out
    nkv = k.shape[-2]
    G = nq // nkv
    g_pad = pow2(G)
    decode = T == S                                  # decode-only batches: one query per sequence
    rows = 16 if decode or INTERPRET else 64
    block_q = max(1, rows // g_pad)                  # BLOCK_Q * G_PAD rows >= 16, as tl.dot needs
    block_n = 16 if INTERPRET else 64
    d_pad = max(16, pow2(d))
    if decode:
        num_tiles, cu = S, query_start_loc
    else:
        qlens = query_start_loc[1:] - query_start_loc[:-1]
        cu = torch.zeros(S + 1, dtype=torch.int32, device=q.device)
        torch.cumsum((qlens + block_q - 1) // block_q, 0, out=cu[1:])
        num_tiles = min(T, cdiv(T, block_q) + S)     # a bound on sum(cdiv(qlen, BLOCK_Q)), known without a sync
    if num_splits is None:
        num_splits = 1
        if q.is_cuda and not ring and T <= 64:
            num_splits = auto_splits(num_tiles, nkv, max_ctx, _num_sms(q.device.index or 0))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits}: between 1 and {MAX_SPLITS}")
    split_len = cdiv(cdiv(max_ctx, num_splits), block_n) * block_n if num_splits > 1 else 1 << 30
    part_o = part_ml = out
    if num_splits > 1:
        part_o = torch.empty(T * nq * num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(T * nq * num_splits, 2, dtype=torch.float32, device=q.device)
    kr = k_ring if ring else k
    vr = v_ring if ring else v
    _attention_kernel[(num_tiles, nkv, num_splits)](
        q, out, part_o, part_ml, k, v, kr, vr, per_seq, lens, query_start_loc, cu, S, num_splits, scale * LOG2E,
        window, split_len, kr.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(-3), k.stride(-2), v.stride(0), v.stride(-3), v.stride(-2),
        kr.stride(0), kr.stride(1), kr.stride(2), vr.stride(0), vr.stride(1), vr.stride(2),
        out.stride(0), out.stride(1), per_seq.stride(0),
        RING=ring, PAGE=page, DECODE=decode, SPLIT=num_splits > 1, G=G, G_PAD=g_pad, BLOCK_Q=block_q,
        BLOCK_N=block_n, D=d, D_PAD=d_pad, UPCAST=INTERPRET and q.dtype != torch.float32, PREC=dot_precision(q.dtype))
    if num_splits > 1:
        _merge_splits_kernel[(T * nq,)](part_o, part_ml, out, nq, num_splits, out.stride(0), out.stride(1),
                                        MAX_SPLITS=MAX_SPLITS, D=d, D_PAD=d_pad)
    return out


def _contig_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, num_splits=None):
    """num_splits: force the split-K path (tests); by default it is chosen for a few queries over long
    contexts when the grid would leave SMs idle."""
    page = k_cache.shape[1]
    return _launch(_contig_last(q), k_cache, v_cache, None, None, block_tables, seq_lens, query_start_loc, scale,
                   ring=False, window=0, page=page, num_splits=num_splits,
                   max_ctx=max(1, block_tables.shape[1] * page))    # tables cover every context: a host-side bound


def ring_attention(q, k, v, k_ring, v_ring, ring_slots, query_start_loc, context_lens, window: int, scale):
    return _launch(_contig_last(q), _contig_last(k), _contig_last(v), k_ring, v_ring, ring_slots, context_lens,
                   query_start_loc, scale, ring=True, window=window, page=1, num_splits=1,
                   max_ctx=window)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, NH, D, skt, skh, svt, svh, skc, skch, svc, svch,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NH) & (cols < D)
    k = tl.load(k_ptr + t * skt + heads * skh + cols, mask=mask)
    v = tl.load(v_ptr + t * svt + heads * svh + cols, mask=mask)
    tl.store(kc_ptr + slot * skc + heads * skch + cols, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + slot * svc + heads * svch + cols, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    k, v = _contig_last(k), _contig_last(v)
    T, nkv, d = k.shape
    if T == 0:
        return
    kc = k_cache.view(-1, *k_cache.shape[-2:])
    vc = v_cache.view(-1, *v_cache.shape[-2:])
    _write_kv_kernel[(T,)](k, v, kc, vc, slot_mapping, nkv, d, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), BLOCK_H=pow2(nkv), BLOCK_D=pow2(d))
