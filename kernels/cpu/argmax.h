// Argmax: the plain row argmax, and the screened argmax of x @ lm_head^T (an int8 screen with a proven error
// bound decides which lm_head panels to recompute exactly; the proof is in the comment below).
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gemm.h"
#include "tuning.h"
#include "vec.h"

namespace {

// A token mask for S rows of V logits, as xgrammar's token bitmasks hold it: int32 [S, >= ceil(V / 32)], bit
// t % 32 of word t / 32 set when token t is allowed. Undefined or empty: every token allowed.
struct TokenMask {
  const int32_t* bits = nullptr;
  int64_t ld = 0;
  TokenMask(const torch::Tensor& m, int64_t S, int64_t V) {
    if (!m.defined() || m.numel() == 0) return;
    TORCH_CHECK(m.scalar_type() == at::kInt && m.dim() == 2 && m.device().is_cpu() && m.stride(1) == 1 &&
                    m.size(0) == S && m.size(1) * 32 >= V,
                "token mask: want a contiguous int32 CPU tensor [", S, ", >= ", cdiv(V, 32), "], got ", m.sizes(),
                " ", m.scalar_type());
    bits = m.data_ptr<int32_t>();
    ld = m.stride(0);
  }
  bool allowed(int64_t row, int64_t t) const {
    return !bits || (uint32_t(bits[row * ld + (t >> 5)]) >> (t & 31)) & 1u;
  }
  // masked logits set to -inf, in place (x [S, V] fp32, contiguous rows)
  void apply(torch::Tensor& x) const {
    if (!bits) return;
    float* xp = x.data_ptr<float>();
    const int64_t S = x.size(0), V = x.size(1), lx = x.stride(0);
    for (int64_t r = 0; r < S; ++r)
      for (int64_t t = 0; t < V; ++t)
        if (!allowed(r, t)) xp[r * lx + t] = -std::numeric_limits<float>::infinity();
  }
};

// Index of the largest value of each row of x [S, V] (the first one on ties; a NaN counts as largest, as in
// torch.argmax).
torch::Tensor argmax_rows(torch::Tensor x) {
  check_act(x, "x", 2);
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t S = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "argmax_rows: empty rows");
  auto out = torch::empty({S}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  const int64_t ld = x.stride(0);
  at::parallel_for(0, S, 1, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const float* row = xp + r * ld;
      typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
      vf mx = vf{} - std::numeric_limits<float>::infinity();
      vi nan{};
      int64_t i = 0;
      for (; i + VL <= V; i += VL) {
        const vf v = loadv(row + i);
        mx = v > mx ? v : mx;
        nan |= v != v;
      }
      bool any_nan = false;
      float m = mx[0];
      for (int j = 0; j < VL; ++j) {
        m = std::max(m, mx[j]);
        any_nan |= nan[j] != 0;
      }
      for (; i < V; ++i) {
        m = std::max(m, row[i]);
        any_nan |= row[i] != row[i];
      }
      int64_t idx = 0;
      for (int64_t j = 0; j < V; ++j)
        if (any_nan ? row[j] != row[j] : row[j] == m) {
          idx = j;
          break;
        }
      op[r] = idx;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Screened argmax. Greedy decoding reads the whole lm_head for one argmax per row; at batch 1 that is ~40% of
// the bytes of a step of the benchmark model. An int8 copy of the lm_head (half the bytes of bf16) gives each
// logit to within a proven bound; only the rows whose upper bound reaches the best lower bound are computed
// again from the real weights, by the same kernel as the plain batch-1 path, so the token is exactly the plain
// path's argmax, ties (first index) included. Nothing is approximated: the screen only decides what to skip.
//
// Row r of the lm_head: w_r = s_r q_r + e_r, s_r = max|w_r| / 127, q_r = round(w_r / s_r) in int8. For an
// fp32 input x, the plain logit L_r (an fp32 dot product) and the screen's A_r = s_r * fl(x . q_r) satisfy
//   |L_r - A_r| <= |x . e_r| + |L_r - x . w_r| + |s_r (x . q_r) - A_r|
//              <= |x| |e_r| + g |x| |w_r| + g s_r |x| |q_r| + u |A_r|           (Cauchy-Schwarz)
// where g = 2 (K + 1) 2^-24 bounds the relative error of a K-term fp32 dot product (any summation order,
// FMA or not; twice the classical gamma_K) and u = 2^-24 is one rounding. So with
// c_r = |e_r| + g (|w_r| + s_r |q_r|), computed in double and stored rounded up with a relative slack of
// 2^-16, and b_r = |x| c_r + 2^-18 |A_r| evaluated in fp32 (the slack covers its own roundings):
// L_r in [A_r - b_r, A_r + b_r]. The argmax r* has L_r* >= L_j >= A_j - b_j for every j, so
// A_r* + b_r* >= lo = max_j (A_j - b_j): every row that can win, or tie the winner, passes the screen.
//
// The screen's weights: (q packed like any weight, s [V] fp32, c [V] fp32) from an unpacked lm_head [V, K].
std::vector<torch::Tensor> argmax_screen(torch::Tensor w) {
  check_weight(w, "lm_head");
  TORCH_CHECK(w.dim() == 2, "argmax_screen: lm_head must be [V, K]");
  const int64_t V = w.size(0), K = w.size(1);
  TORCH_CHECK(V > 0 && K > 0 && K < (1 << 20), "argmax_screen: lm_head of shape ", w.sizes());
  auto q = torch::empty({V, K}, w.options().dtype(at::kChar));
  auto scale = torch::empty({V}, w.options().dtype(at::kFloat));
  auto bound = torch::empty({V}, w.options().dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float *sp = scale.data_ptr<float>(), *cp = bound.data_ptr<float>();
  const double g = 2.0 * double(K + 1) * std::ldexp(1.0, -24);
  std::atomic<bool> finite{true};  // cleared by any thread that meets a weight it cannot bound
  auto rows = [&](auto* wp) {
    at::parallel_for(0, V, 64, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        double amax = 0;
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(double(scalar(wp[r * K + k]))));
        if (!(amax < 1e15)) finite = false;  // keeps |logits| and their bounds far from fp32 overflow
        const float s = float(amax / 127);
        double e2 = 0, w2 = 0, q2 = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double wk = scalar(wp[r * K + k]);
          const double qk = s > 0 ? std::clamp(std::nearbyint(wk / s), -127.0, 127.0) : 0.0;
          qp[r * K + k] = int8_t(qk);
          e2 += (wk - double(s) * qk) * (wk - double(s) * qk);
          w2 += wk * wk;
          q2 += qk * qk;
        }
        const double c = (std::sqrt(e2) + g * (std::sqrt(w2) + double(s) * std::sqrt(q2))) * (1 + std::ldexp(1.0, -16));
        sp[r] = s;
        cp[r] = std::nextafter(float(c), std::numeric_limits<float>::infinity());
      }
    });
  };
  if (w.scalar_type() == at::kBFloat16)
    rows(reinterpret_cast<const bf16*>(w.data_ptr()));
  else
    rows(w.data_ptr<float>());
  TORCH_CHECK(finite, "argmax_screen: the lm_head has weights that are not finite or beyond 1e15");
  return {pack(q, V), scale, bound};
}

// Argmax of x [M, K] @ lm_head^T per row, through the screen (see above); lm_head packed, bf16 or fp32.
// Each work item runs the int8 GEMM over a run of panels and, while its output is in L1, reduces every
// (row, panel) to the panel's largest upper and lower bound; a row then recomputes only the panels whose
// upper bound reaches its best lower bound.
// With a token mask (see TokenMask) the argmax is over the allowed tokens only: the token
// argmax_rows(masked logits) gives when masked logits are -inf. A panel with no allowed token has no bounds
// and is skipped; a row with none at all recomputes every panel and so ends, as the plain path does, at 0.
template <typename W>
void screened_argmax_impl(const torch::Tensor& x, const int8_t* qp, const float* sp, const float* cp,
                          const W* wp, int64_t V, const TokenMask& mask, int64_t* out) {
  const int M = x.size(0), K = x.size(1), P = cdiv(V, PW);
  const int64_t ldx = x.stride(0);
  const float* xp = x.data_ptr<float>();
  // |x| rounded up. An input that is not finite, or so large that a logit could overflow, takes every panel
  // (weights are below 1e15 and K below 2^20, so below 1e18 every |A_r| + b_r stays under 1e37).
  std::vector<float> nx(M);
  std::vector<uint8_t> screen(M);
  for (int m = 0; m < M; ++m) {
    double n2 = 0;
    for (int k = 0; k < K; ++k) n2 += double(xp[m * ldx + k]) * xp[m * ldx + k];
    nx[m] = std::nextafter(float(std::sqrt(n2)), std::numeric_limits<float>::infinity());
    screen[m] = std::isfinite(nx[m]) && nx[m] < 1e18f;
  }
  std::vector<float> hi(size_t(M) * P), lo(size_t(M) * P);  // per (row, panel): max of A + b, of A - b
  const float slack = std::ldexp(1.0f, -18);
  const int mb = cdiv(M, BM), pp = panels_per_item(int64_t(P) * mb, GEMM_PANELS_PER_ITEM), nb = cdiv(P, pp);
  parallel_items(int64_t(mb) * nb, [&](int64_t item) {
    const int m0 = (item % mb) * BM, p0 = (item / mb) * pp;
    const int bm = std::min(BM, M - m0), p1 = std::min(P, p0 + pp), n = std::min<int64_t>(V, int64_t(p1) * PW) - p0 * PW;
    const float* rows[BM];
    for (int i = 0; i < bm; ++i) rows[i] = xp + (m0 + i) * ldx;
    thread_local std::vector<float> approx;
    approx.resize(size_t(bm) * n);
    gemm_panels(rows, bm, qp, int(V), K, p0, p1, approx.data(), n);
    for (int i = 0; i < bm; ++i) {
      const float* a = approx.data() + size_t(i) * n;
      for (int p = p0; p < p1; ++p) {
        float h = -std::numeric_limits<float>::infinity(), l = h;
        for (int64_t r = p * PW; r < std::min<int64_t>(V, int64_t(p + 1) * PW); ++r) {
          if (!mask.allowed(m0 + i, r)) continue;
          const float A = sp[r] * a[r - p0 * PW], b = nx[m0 + i] * cp[r] + slack * std::fabs(A);
          h = std::max(h, A + b);
          l = std::max(l, A - b);
        }
        hi[size_t(m0 + i) * P + p] = h;
        lo[size_t(m0 + i) * P + p] = l;
      }
    }
  });
  // the plain batch-1 path's logits of the panels that passed; first maximum wins, NaN counts as largest
  auto row_argmax = [&](int64_t m) {
    const float* xr = xp + m * ldx;
    const float* h = hi.data() + m * P;
    const float best_lo = *std::max_element(lo.data() + m * P, lo.data() + (m + 1) * P);
    float best = 0, logits[PW];
    int64_t idx = -1;
    for (int p = 0; p < P; ++p) {
      if (screen[m] && !(h[p] >= best_lo)) continue;
      gemm_panels(&xr, 1, wp, int(V), K, p, p + 1, logits, PW);
      for (int j = 0; j < PW && p * PW + j < V; ++j) {
        const float v = mask.allowed(m, p * PW + j) ? logits[j] : -std::numeric_limits<float>::infinity();
        if (idx < 0 || (v != v && best == best) || v > best) {
          best = v;
          idx = p * PW + j;
        }
      }
    }
    out[m] = idx;
  };
  if (M == 1)
    row_argmax(0);
  else
    parallel_items(M, row_argmax);
}

torch::Tensor screened_argmax(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bound,
                              torch::Tensor lm_head, const torch::Tensor& token_mask) {
  check_act(x, "x", 2);
  check_weight(lm_head, "lm_head");
  const int64_t V = lm_head.size(0), K = lm_head.size(1);
  TORCH_CHECK(x.size(1) == K && q.scalar_type() == at::kChar && q.sizes() == lm_head.sizes() &&
                  scale.numel() == V && bound.numel() == V,
              "screened_argmax: x ", x.sizes(), ", screen ", q.sizes(), " and lm_head ", lm_head.sizes(),
              " do not match");
  if (x.stride(1) != 1) x = x.contiguous();
  const TokenMask mask(token_mask, x.size(0), V);
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.size(0) == 0) return out;
  const float *sp = scale.data_ptr<float>(), *cp = bound.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  if (lm_head.scalar_type() == at::kBFloat16)
    screened_argmax_impl(x, qp, sp, cp, reinterpret_cast<const bf16*>(lm_head.data_ptr()), V, mask, out.data_ptr<int64_t>());
  else
    screened_argmax_impl(x, qp, sp, cp, lm_head.data_ptr<float>(), V, mask, out.data_ptr<int64_t>());
  return out;
}

}  // namespace
