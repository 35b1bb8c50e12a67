// RMSNorm (plain and fused with the residual add), and the q/k RMSNorm per head + NeoX RoPE front of attention.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "gemm.h"
#include "vec.h"

namespace {

// ---------------------------------------------------------------------------------------------------------
// Norms

template <typename W>
void rms_row(const float* x, const W* w, float eps, float* y, int n) {
  const float r = 1.0f / std::sqrt(dot(x, x, n) / n + eps);
  for (int i = 0; i < n; ++i) y[i] = scalar(w[i]) * (x[i] * r);
}

template <typename W>
void rms_rows(const float* x, int64_t ldx, const W* w, float eps, float* y, int64_t T, int H) {
  at::parallel_for(0, T, 64, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) rms_row(x + t * ldx, w, eps, y + t * H, H);
  });
}

// x [..., H], weight [H] fp32 or bf16.
torch::Tensor rms_norm(torch::Tensor x_, torch::Tensor w, double eps) {
  check_weight(w, "weight");
  auto x = rows_of(x_, "x");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "rms_norm: weight ", w.sizes(), " for x ", x_.sizes());
  auto y = torch::empty(x_.sizes(), x.options());
  if (w.scalar_type() == at::kBFloat16)
    rms_rows(x.data_ptr<float>(), x.stride(0), reinterpret_cast<const bf16*>(w.data_ptr()), eps,
             y.data_ptr<float>(), x.size(0), x.size(1));
  else
    rms_rows(x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), eps, y.data_ptr<float>(), x.size(0),
             x.size(1));
  return y;
}

std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x ", x.sizes(), " residual ", residual.sizes());
  auto s = torch::add(x, residual);
  return {rms_norm(s, w, eps), s};
}

// ---------------------------------------------------------------------------------------------------------
// q/k RMSNorm per head + NeoX RoPE. q [T, nq, d], k [T, nkv, d] (any row/head strides, unit last stride).

template <typename W>
void norm_rope_rows(const torch::Tensor& src, const W* w, float eps, const int64_t* pos, const float* cosp,
                    const float* sinp, bool use_rope, torch::Tensor& dst) {
  const int64_t T = src.size(0), nh = src.size(1);
  const int d = src.size(2), half = d / 2;
  const int64_t st = src.stride(0), sh = src.stride(1);
  const float* s = src.data_ptr<float>();
  float* o = dst.data_ptr<float>();
  at::parallel_for(0, T * nh, 64, [&](int64_t a, int64_t b) {
    std::vector<float> y(d);
    for (int64_t i = a; i < b; ++i) {
      const int64_t t = i / nh, h = i % nh;
      float* out = o + i * d;
      rms_row(s + t * st + h * sh, w, eps, use_rope ? y.data() : out, d);
      if (!use_rope) continue;
      const float* c = cosp + pos[t] * half;
      const float* sn = sinp + pos[t] * half;
      for (int j = 0; j < half; ++j) {
        out[j] = y[j] * c[j] - y[j + half] * sn[j];
        out[j + half] = y[j + half] * c[j] + y[j] * sn[j];
      }
    }
  });
}

std::vector<torch::Tensor> qk_norm_rope(torch::Tensor q, torch::Tensor k, torch::Tensor qw, torch::Tensor kw,
                                        double eps, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                                        bool use_rope) {
  check_act(q, "q", 3);
  check_act(k, "k", 3);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "qk_norm_rope: q/k need unit stride in the head dim");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "qk_norm_rope: q ", q.sizes(), " k ", k.sizes());
  check_weight(qw, "q_weight");
  check_weight(kw, "k_weight");
  TORCH_CHECK(qw.scalar_type() == kw.scalar_type() && qw.is_contiguous() && kw.is_contiguous() &&
                  qw.numel() == q.size(2) && kw.numel() == q.size(2),
              "qk_norm_rope: norm weights must be [head_dim] of one dtype");
  auto pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == q.size(0), "qk_norm_rope: one position per token");
  const float *cp = nullptr, *sp = nullptr;
  torch::Tensor c, s;
  if (use_rope) {
    c = cos.to(at::kFloat).contiguous();
    s = sin.to(at::kFloat).contiguous();
    TORCH_CHECK(c.dim() == 2 && c.size(1) * 2 == q.size(2) && s.sizes() == c.sizes(),
                "qk_norm_rope: cos/sin must be [max_pos, head_dim/2]");
    const int64_t* pp = pos.data_ptr<int64_t>();
    for (int64_t i = 0; i < pos.numel(); ++i)
      TORCH_CHECK(pp[i] >= 0 && pp[i] < c.size(0), "qk_norm_rope: position ", pp[i], " beyond the RoPE table (",
                  c.size(0), ")");
    cp = c.data_ptr<float>();
    sp = s.data_ptr<float>();
  }
  auto qo = torch::empty(q.sizes(), q.options());
  auto ko = torch::empty(k.sizes(), k.options());
  const int64_t* pp = pos.data_ptr<int64_t>();
  if (qw.scalar_type() == at::kBFloat16) {
    norm_rope_rows(q, reinterpret_cast<const bf16*>(qw.data_ptr()), eps, pp, cp, sp, use_rope, qo);
    norm_rope_rows(k, reinterpret_cast<const bf16*>(kw.data_ptr()), eps, pp, cp, sp, use_rope, ko);
  } else {
    norm_rope_rows(q, qw.data_ptr<float>(), eps, pp, cp, sp, use_rope, qo);
    norm_rope_rows(k, kw.data_ptr<float>(), eps, pp, cp, sp, use_rope, ko);
  }
  return {qo, ko};
}

}  // namespace
