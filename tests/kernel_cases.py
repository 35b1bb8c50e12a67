"""Inputs shared by the kernel tests (Triton: tests/test_kernels.py, C++ CPU: tests/test_cpu_kernels.py): random
tensors, the MoE and attention edge-case batches, and the error check. `device` defaults to CUDA when there is
one."""
import contextlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def check(out, expected, dtype):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert not out.isnan().any(), "unwritten (NaN) elements"
    err = ((out.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e}"


def qkv_views(T, nq, nkv, d, dtype):
    """q, k, v as the engine makes them: column slices of one fused projection, viewed per head (strided)."""
    qkv = randn(T, (nq + 2 * nkv) * d, dtype=dtype)
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    return q.reshape(T, nq, d), k.reshape(T, nkv, d), v.reshape(T, nkv, d)


def rope_tables(max_pos, d):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=DEVICE) / d))
    f = torch.arange(max_pos, dtype=torch.float32, device=DEVICE)[:, None] * inv
    return f.cos(), f.sin()


def routing(T, E, k, used=None):
    """Distinct experts per token, drawn from the first `used` experts (the rest get no tokens)."""
    scores = torch.rand(T, E, device=DEVICE)
    if used is not None:
        scores[:, used:] = -1.0
    ids = scores.topk(k, dim=-1).indices
    return torch.rand(T, k, device=DEVICE) + 0.1, ids


MOE_CASES = {
    # name: (T, E, k, H, I, experts used)   H, I never multiples of the tile (interpreter tiles 16x32x32)
    "ragged": (13, 8, 2, 48, 24, None),
    "decode": (1, 8, 2, 40, 24, None),
    "empty_experts": (5, 16, 2, 48, 40, 3),
    "one_expert": (21, 4, 1, 40, 24, 1),
    "many_tiles": (40, 4, 2, 56, 40, None),
}


def qsl_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def paged_batch(seqs, nq, nkv, d, page, dtype):
    """seqs: (tokens already cached, new tokens) per sequence; pages scattered over the pool, tables padded
    with block 0 like the runner's."""
    lens = [c + n for c, n in seqs]
    need = [-(-L // page) for L in lens]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks).tolist()
    width = max(need)
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n] + [0] * (width - n))
        at += n
    T = sum(n for _, n in seqs)
    return (randn(T, nq, d, dtype=dtype), randn(num_blocks, page, nkv, d, dtype=dtype),
            randn(num_blocks, page, nkv, d, dtype=dtype),
            torch.tensor(tables, dtype=torch.int32, device=DEVICE),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE), qsl_of([n for _, n in seqs]))


PAGED_CASES = {
    # name: (seqs, page): prefill from 0, a chunk continuing a cached prefix, decode at position 0, a long
    # decode; lengths cross page boundaries
    "mixed": ([(0, 9), (12, 5), (0, 1), (36, 1)], 4),
    "decode_only": ([(0, 1), (7, 1), (40, 1)], 4),
    "page16": ([(3, 20), (16, 1), (31, 2)], 16),
}
GQA = {"g1": (2, 2), "g8": (8, 1), "g3": (6, 2)}


def ring_batch(seqs, window, ring_len, nq, nkv, d, dtype):
    """seqs: (context before this step, new tokens); the ring holds whatever earlier steps left in it."""
    S = len(seqs)
    q, k, v = qkv_views(sum(n for _, n in seqs), nq, nkv, d, dtype)
    ring = randn(S + 1, ring_len, nkv, d, dtype=dtype), randn(S + 1, ring_len, nkv, d, dtype=dtype)
    slots = torch.randperm(S + 1, device=DEVICE)[:S]
    ctx = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=DEVICE)
    return q, k, v, *ring, slots, qsl_of([n for _, n in seqs]), ctx, window


RING_CASES = {
    # window 6, ring_len 8. "mixed": a prefill longer than the window, a decode, a decode at position 0, a
    # decode and a chunk past the ring wrap-around; "window_edge": queries whose window starts exactly at
    # the first cached / first fresh key.
    "mixed": [(0, 9), (3, 1), (0, 1), (20, 1), (13, 4)],
    "window_edge": [(5, 1), (6, 1), (7, 3), (2, 7)],
    "decode_only": [(0, 1), (9, 1), (30, 1)],
}


@contextlib.contextmanager
def poisoned():
    """torch.empty / torch.empty_like hand out NaN-filled floats while the kernel wrapper runs."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like
