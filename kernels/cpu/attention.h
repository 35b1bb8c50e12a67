// KV cache writes, and attention: sliding-window ring attention and paged attention (GQA: the query heads of
// one kv head are scored together).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.h"
#include "tuning.h"
#include "vec.h"

namespace {

// ---------------------------------------------------------------------------------------------------------
// KV cache write: rows of k/v [T, nkv, d] (any strides, unit last) to flat slots of a cache [..., nkv, d].

void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping) {
  check_act(k, "k", 3);
  check_act(v, "v", 3);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "write_kv: caches must be contiguous float32");
  const int64_t T = k.size(0), nkv = k.size(1), d = k.size(2);
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && v.sizes() == k.sizes(), "write_kv: k/v layout");
  TORCH_CHECK(k_cache.size(-1) == d && k_cache.size(-2) == nkv, "write_kv: cache ", k_cache.sizes(), " for k ",
              k.sizes());
  const int64_t row = nkv * d, rows = k_cache.numel() / row;
  auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == T, "write_kv: one slot per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = sp[t];
    if (s < 0) continue;
    TORCH_CHECK(s < rows, "write_kv: slot ", s, " beyond the cache (", rows, " rows)");
    for (int64_t h = 0; h < nkv; ++h) {
      std::memcpy(kc + s * row + h * d, kp + t * k.stride(0) + h * k.stride(1), d * sizeof(float));
      std::memcpy(vc + s * row + h * d, vp + t * v.stride(0) + h * v.stride(1), d * sizeof(float));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Attention. A work item is (sequence, kv head, a run of queries); for each query, the g query heads that
// share the kv head are scored against its keys together, keys located by a functor (ring, fresh or paged).


struct QueryRun {
  int seq, head, q0, q1;  // rows [q0, q1) of q
};

// out_gi = sum_u s[gi][u] v_u for the g query heads, NA vectors of accumulators in registers per pass over the
// keys (d / (NA VL) passes: with AVX2, 8 accumulators leave room for the loads in 16 registers).
template <int NA>
void weighted_sum(const float* sc, int L, int g, const float* const* vp, int d, float* out, int64_t out_head) {
  for (int gi = 0; gi < g; ++gi) {
    const float* s = sc + size_t(gi) * L;
    for (int c0 = 0; c0 < d; c0 += NA * VL) {
      vf acc[NA];
#pragma GCC unroll 8
      for (int c = 0; c < NA; ++c) acc[c] = vf{};
      for (int u = 0; u < L; ++u) {
        const float w = s[u];
#pragma GCC unroll 8
        for (int c = 0; c < NA; ++c) acc[c] += w * loadv(vp[u] + c0 + VL * c);
      }
#pragma GCC unroll 8
      for (int c = 0; c < NA; ++c) storev(out + gi * out_head + c0 + VL * c, acc[c]);
    }
  }
}

// One query position against L keys (row pointers kp/vp, oldest first), for the g query heads at q (heads
// d apart); writes the g output heads at out (out_head apart).
void attend_query(const float* q, int g, int d, float scale, const float* const* kp, const float* const* vp, int L,
                  float* out, int64_t out_head, std::vector<float>& sc) {
  sc.resize(size_t(g) * L);
  int j = 0;
  if (d % VL == 0) {  // scores VL keys at a time through the VL-way reduction
    for (; j + VL <= L; j += VL) {
      for (int gi = 0; gi < g; ++gi) {
        const float* qr = q + gi * d;
        vf a[VL];
        for (int u = 0; u < VL; ++u) a[u] = vf{};
        for (int c = 0; c < d; c += VL) {
          const vf qv = loadv(qr + c);
#pragma GCC unroll 16
          for (int u = 0; u < VL; ++u) a[u] += qv * loadv(kp[j + u] + c);
        }
        storev(sc.data() + size_t(gi) * L + j, reduce_lanes(a) * scale);
      }
    }
  }
  for (; j < L; ++j)
    for (int gi = 0; gi < g; ++gi) sc[size_t(gi) * L + j] = dot(q + gi * d, kp[j], d) * scale;
  for (int gi = 0; gi < g; ++gi) {
    float* s = sc.data() + size_t(gi) * L;
    float mx = -std::numeric_limits<float>::infinity();
    for (int u = 0; u < L; ++u) mx = std::max(mx, s[u]);
    const float inv = 1.0f / exp_sum(s, mx, s, L);
    for (int u = 0; u < L; ++u) s[u] *= inv;
  }
  if (d % (8 * VL) == 0) return weighted_sum<8>(sc.data(), L, g, vp, d, out, out_head);
  if (d % (4 * VL) == 0) return weighted_sum<4>(sc.data(), L, g, vp, d, out, out_head);
  for (int gi = 0; gi < g; ++gi) {
    float* o = out + gi * out_head;
    std::fill(o, o + d, 0.0f);
    for (int u = 0; u < L; ++u) axpy(sc[size_t(gi) * L + u], vp[u], o, d);
  }
}

std::vector<QueryRun> query_runs(const int32_t* qsl, int S, int nkv) {
  std::vector<QueryRun> runs;
  for (int s = 0; s < S; ++s)
    for (int h = 0; h < nkv; ++h)
      for (int a = qsl[s]; a < qsl[s + 1]; a += QB) runs.push_back({s, h, a, std::min(qsl[s + 1], a + QB)});
  return runs;
}

void check_attn(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc) {
  check_act(q, "q", 3);
  TORCH_CHECK(q.stride(2) == 1, "attention: q needs unit stride in the head dim");
  TORCH_CHECK(kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.sizes() == vc.sizes() && kc.dim() == 4,
              "attention: caches must be contiguous float32 [n, len, nkv, d] of one shape");
  TORCH_CHECK(kc.size(3) == q.size(2) && q.size(1) % kc.size(2) == 0, "attention: q ", q.sizes(), " cache ",
              kc.sizes());
}

// q [T, nq, d]; k/v [T, nkv, d] (this step's keys, RoPE applied); k/v_ring [slots, ring_len, nkv, d].
torch::Tensor ring_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_ring,
                             torch::Tensor v_ring, torch::Tensor ring_slots, torch::Tensor query_start_loc,
                             torch::Tensor context_lens, int64_t window, double scale) {
  check_attn(q, k_ring, v_ring);
  check_act(k, "k", 3);
  check_act(v, "v", 3);
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.sizes() == v.sizes() && k.size(0) == q.size(0),
              "ring_attention: k/v layout");
  const int nq = q.size(1), nkv = k_ring.size(2), d = q.size(2), g = nq / nkv, ring_len = k_ring.size(1);
  TORCH_CHECK(window >= 1 && window <= ring_len, "ring_attention: window ", window, " vs ring_len ", ring_len);
  auto qsl = query_start_loc.to(at::kInt).contiguous();
  auto ctx = context_lens.to(at::kInt).contiguous();   // the runner's int32: no conversion per layer
  auto slots = ring_slots.to(at::kLong).contiguous();
  const int S = ctx.numel();
  TORCH_CHECK(qsl.numel() == S + 1 && slots.numel() == S, "ring_attention: metadata sizes");
  const int32_t* qs = qsl.data_ptr<int32_t>();
  const int32_t* cp = ctx.data_ptr<int32_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int s = 0; s < S; ++s)
    TORCH_CHECK(sp[s] >= 0 && sp[s] < k_ring.size(0), "ring_attention: ring slot ", sp[s], " out of range");
  auto out = torch::empty(q.sizes(), q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *kr = k_ring.data_ptr<float>(), *vr = v_ring.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t row = int64_t(nkv) * d;
  auto runs = query_runs(qs, S, nkv);
  parallel_items(runs.size(), [&](int64_t it) {
    const QueryRun r = runs[it];
    const int64_t c = cp[r.seq], a = qs[r.seq];
    const float* kbase = kr + sp[r.seq] * ring_len * row + r.head * d;
    const float* vbase = vr + sp[r.seq] * ring_len * row + r.head * d;
    // key positions of the whole run: from the first query's window start to the last query
    const int64_t first = std::max<int64_t>(0, c + (r.q0 - a) - window + 1), last = c + (r.q1 - 1 - a);
    thread_local std::vector<const float*> kptr, vptr;
    thread_local std::vector<float> sc;
    kptr.resize(last - first + 1);
    vptr.resize(last - first + 1);
    int64_t slot_row = first % ring_len;
    for (int64_t j = first; j <= last; ++j) {
      if (j < c) {  // from the ring: row j % ring_len, advanced without a division per key
        kptr[j - first] = kbase + slot_row * row;
        vptr[j - first] = vbase + slot_row * row;
        if (++slot_row == ring_len) slot_row = 0;
      } else {      // this step's fresh keys
        const int64_t t = a + (j - c);
        kptr[j - first] = kp + t * k.stride(0) + r.head * k.stride(1);
        vptr[j - first] = vp + t * v.stride(0) + r.head * v.stride(1);
      }
    }
    for (int i = r.q0; i < r.q1; ++i) {
      const int64_t p = c + (i - a), lo = std::max<int64_t>(0, p - window + 1);
      attend_query(qp + i * q.stride(0) + int64_t(r.head) * g * d, g, d, scale, kptr.data() + (lo - first),
                   vptr.data() + (lo - first), p - lo + 1, op + (int64_t(i) * nq + r.head * g) * d, d, sc);
    }
  });
  return out;
}

// q [T, nq, d]; k/v_cache [num_blocks, block_size, nkv, d] already holding this step's keys;
// block_tables [S, max_blocks] int32; seq_lens [S] (context after this step); query_start_loc [S+1].
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start_loc,
                              double scale) {
  check_attn(q, k_cache, v_cache);
  const int nq = q.size(1), nkv = k_cache.size(2), d = q.size(2), g = nq / nkv, bs = k_cache.size(1);
  auto qsl = query_start_loc.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();      // the runner's int32: no conversion per layer
  auto bt = block_tables.to(at::kInt).contiguous();
  const int S = lens.numel();
  TORCH_CHECK(qsl.numel() == S + 1 && bt.dim() == 2 && bt.size(0) == S, "paged_attention: metadata sizes");
  const int32_t *qs = qsl.data_ptr<int32_t>(), *btp = bt.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int64_t nblk = bt.size(1);
  for (int s = 0; s < S; ++s) {
    TORCH_CHECK((lp[s] + bs - 1) / bs <= nblk, "paged_attention: sequence ", s, " of ", lp[s],
                " tokens has too few blocks");
    TORCH_CHECK(qs[s + 1] - qs[s] <= lp[s], "paged_attention: more queries than context");
    for (int64_t b = 0; b < (lp[s] + bs - 1) / bs; ++b)
      TORCH_CHECK(btp[s * nblk + b] >= 0 && btp[s * nblk + b] < k_cache.size(0), "paged_attention: block id ",
                  btp[s * nblk + b], " out of range");
  }
  auto out = torch::empty(q.sizes(), q.options());
  const float *qp = q.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t row = int64_t(nkv) * d;
  auto runs = query_runs(qs, S, nkv);
  parallel_items(runs.size(), [&](int64_t it) {
    const QueryRun r = runs[it];
    const int32_t* table = btp + r.seq * nblk;
    const int64_t n = qs[r.seq + 1] - qs[r.seq];
    const int64_t last = lp[r.seq] - n + (r.q1 - 1 - qs[r.seq]);  // the run's last query position
    thread_local std::vector<const float*> kptr, vptr;
    thread_local std::vector<float> sc;
    kptr.resize(last + 1);
    vptr.resize(last + 1);
    for (int64_t b = 0, j = 0; j <= last; ++b)
      for (int64_t o = 0; o < bs && j <= last; ++o, ++j) {
        const int64_t off = (int64_t(table[b]) * bs + o) * row + r.head * d;
        kptr[j] = kc + off;
        vptr[j] = vc + off;
      }
    for (int i = r.q0; i < r.q1; ++i) {
      const int64_t p = lp[r.seq] - n + (i - qs[r.seq]);
      attend_query(qp + i * q.stride(0) + int64_t(r.head) * g * d, g, d, scale, kptr.data(), vptr.data(), p + 1,
                   op + (int64_t(i) * nq + r.head * g) * d, d, sc);
    }
  });
  return out;
}

}  // namespace
