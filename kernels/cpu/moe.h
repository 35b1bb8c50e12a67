// MoE: the whole block (routed experts + optional shared expert, or a dense MLP) in one call, and the router
// (sigmoid scores, grouped top-k selection with bias).
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "gemm.h"
#include "tuning.h"
#include "vec.h"

namespace {

// ---------------------------------------------------------------------------------------------------------
// MoE: routed experts + optional shared expert, out[t] = sum_j w_tj * down_e(silu(gate_e x) * up_e x) + shared

struct Group {       // one expert and the token rows routed to it
  const void* w13;   // [2I, H]: gate rows then up rows
  const void* w2;    // [H, I]
  const float* s13 = nullptr;  // FP8 only: the scales of w13 [2I / PW, KB13] and of w2 [H / PW, KB2]
  const float* s2 = nullptr;
  int I;
  std::vector<int> tok;      // token of each row
  std::vector<float> scale;  // routing weight of each row
  std::vector<int> dest;     // row of the partial-output buffer it writes
  int64_t inter_off = 0;     // its rows in the intermediate buffer
};

// W: the weights' element type (uint8_t: FP8 in blocks of bk columns)
template <typename W>
void run_groups(const float* x, int64_t ldx, int H, std::vector<Group>& groups, float* inter, float* part,
                int bk) {
  int64_t total = 0;
  for (const Group& G : groups) total += cdiv(G.I, PW);
  const int JP = panels_per_item(total, MOE_PANELS_PER_ITEM);
  const int HP = panels_per_item(int64_t(groups.size()) * cdiv(H, PW), MOE_PANELS_PER_ITEM);
  const int JB = JP * PW, HB = HP * PW;
  // phase 1: inter = silu(x W_gate^T) * (x W_up^T); w13 packed in two parts (gate, up) of I rows
  std::vector<std::pair<int, int>> items;
  for (int g = 0; g < (int)groups.size(); ++g)
    for (int p = 0; p < cdiv(groups[g].I, PW); p += JP) items.emplace_back(g, p);
  parallel_items(items.size(), [&](int64_t it) {
    const Group& G = groups[items[it].first];
    const int p0 = items[it].second, p1 = std::min(cdiv(G.I, PW), p0 + JP), M = G.tok.size();
    const int j0 = p0 * PW, bj = std::min(G.I, p1 * PW) - j0;
    const auto w13 = WeightOf<W>::make(G.w13, G.s13, bk ? cdiv(H, bk) : 0, bk);
    thread_local std::vector<const float*> rows;
    thread_local std::vector<float> gate, up;
    rows.resize(M);
    gate.resize(size_t(std::min(M, BM)) * JB);
    up.resize(size_t(std::min(M, BM)) * JB);
    for (int m = 0; m < M; ++m) rows[m] = x + int64_t(G.tok[m]) * ldx;
    float* dst = inter + G.inter_off;
    prefetch_head(advance(w13, G.I, H), p0, H);  // the up stream's head, while the gate stream starts
    for (int m0 = 0; m0 < M; m0 += BM) {
      const int bm = std::min(BM, M - m0);
      gemm_panels(rows.data() + m0, bm, w13, G.I, H, p0, p1, gate.data(), JB);
      gemm_panels(rows.data() + m0, bm, advance(w13, G.I, H), G.I, H, p0, p1, up.data(), JB);
      for (int m = 0; m < bm; ++m)
        silu_mul(gate.data() + m * JB, up.data() + m * JB, dst + int64_t(m0 + m) * G.I + j0, bj);
    }
  });
  // phase 2: part[dest] = scale * (inter W_down^T); w2 packed with one part of H rows
  items.clear();
  for (int g = 0; g < (int)groups.size(); ++g)
    for (int p = 0; p < cdiv(H, PW); p += HP) items.emplace_back(g, p);
  parallel_items(items.size(), [&](int64_t it) {
    const Group& G = groups[items[it].first];
    const int p0 = items[it].second, p1 = std::min(cdiv(H, PW), p0 + HP), M = G.tok.size();
    const int h0 = p0 * PW, bh = std::min(H, p1 * PW) - h0;
    const auto w2 = WeightOf<W>::make(G.w2, G.s2, bk ? cdiv(G.I, bk) : 0, bk);
    thread_local std::vector<const float*> rows;
    thread_local std::vector<float> buf;
    rows.resize(M);
    buf.resize(size_t(std::min(M, BM)) * HB);
    for (int m = 0; m < M; ++m) rows[m] = inter + G.inter_off + int64_t(m) * G.I;
    for (int m0 = 0; m0 < M; m0 += BM) {
      const int bm = std::min(BM, M - m0);
      gemm_panels(rows.data() + m0, bm, w2, H, G.I, p0, p1, buf.data(), HB);
      for (int m = 0; m < bm; ++m) {
        float* d = part + int64_t(G.dest[m0 + m]) * H + h0;
        const float sc = G.scale[m0 + m];
        for (int h = 0; h < bh; ++h) d[h] = sc * buf[m * HB + h];
      }
    }
  });
}

// x [T, H]; w13 [E, 2I, H] packed in parts of I rows; w2 [E, H, I] packed (part H); topk_weights [T, k] fp32;
// topk_ids [T, k] int64, where -1 is an expert another rank holds (expert parallel): it adds nothing and costs
// nothing; shared_gate_up [2Is, H] (parts of Is) and shared_down [H, Is] (part H) optional (an empty tensor =
// none). E may be 0 (dense MLP). FP8 weights (all of them or none) come with their scales (check_fp8) in *_s
// and their block size bk.
torch::Tensor moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor topk_weights,
                  torch::Tensor topk_ids, torch::Tensor shared_gate_up, torch::Tensor shared_down,
                  torch::Tensor w13_s, torch::Tensor w2_s, torch::Tensor shared_gate_up_s,
                  torch::Tensor shared_down_s, int64_t bk) {
  check_act(x, "x", 2);
  if (x.stride(1) != 1) x = x.contiguous();
  const int T = x.size(0), H = x.size(1);
  const bool has_shared = shared_gate_up.numel() > 0;
  const bool has_routed = w13.numel() > 0 && topk_ids.numel() > 0;
  TORCH_CHECK(has_shared || has_routed, "moe: neither routed nor shared experts given");
  at::ScalarType wtype = has_routed ? w13.scalar_type() : shared_gate_up.scalar_type();
  std::vector<Group> groups;
  int k = 0;
  if (has_routed) {
    check_weight(w13, "w13");
    check_weight(w2, "w2");
    TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(2) == H && w2.size(1) == H &&
                    w13.size(1) == 2 * w2.size(2) && w13.size(0) == w2.size(0),
                "moe: w13 ", w13.sizes(), " / w2 ", w2.sizes(), " do not match x ", x.sizes());
    TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous(), "moe: expert weights must be contiguous");
    TORCH_CHECK(w2.scalar_type() == wtype, "moe: w13 and w2 dtypes differ");
    if (is_fp8(w13)) {
      check_fp8(w13.select(0, 0), w13_s.defined() && w13_s.dim() == 3 ? w13_s.select(0, 0) : torch::Tensor(), bk,
                "moe w13");
      check_fp8(w2.select(0, 0), w2_s.defined() && w2_s.dim() == 3 ? w2_s.select(0, 0) : torch::Tensor(), bk,
                "moe w2");
      TORCH_CHECK(w13_s.size(0) == w13.size(0) && w2_s.size(0) == w2.size(0) && w13.size(1) / 2 % PW == 0,
                  "moe: FP8 expert scales ", w13_s.sizes(), " / ", w2_s.sizes(), " do not match the experts");
    }
    TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes(),
                "moe: topk_ids ", topk_ids.sizes(), " / topk_weights ", topk_weights.sizes(), " for ", T,
                " tokens");
    auto ids = topk_ids.to(at::kLong).contiguous();
    auto wts = topk_weights.to(at::kFloat).contiguous();
    const int E = w13.size(0), I = w2.size(2);
    k = ids.size(1);
    const int64_t* idp = ids.data_ptr<int64_t>();
    const float* wp = wts.data_ptr<float>();
    std::vector<int> group_of(E, -1);
    const size_t es = w13.element_size();
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j) {
        const int64_t e = idp[t * k + j];
        TORCH_CHECK(e >= -1 && e < E, "moe: expert id ", e, " out of range [-1, ", E, ")");
        if (e < 0) continue;  // another rank's expert: its row of the partial sums stays 0
        if (group_of[e] < 0) {
          group_of[e] = groups.size();
          Group G;
          G.w13 = static_cast<const char*>(w13.data_ptr()) + e * w13.stride(0) * es;
          G.w2 = static_cast<const char*>(w2.data_ptr()) + e * w2.stride(0) * es;
          if (is_fp8(w13)) {
            G.s13 = w13_s.data_ptr<float>() + e * w13_s.stride(0);
            G.s2 = w2_s.data_ptr<float>() + e * w2_s.stride(0);
          }
          G.I = I;
          groups.push_back(std::move(G));
        }
        Group& G = groups[group_of[e]];
        G.tok.push_back(t);
        G.scale.push_back(wp[t * k + j]);
        G.dest.push_back(t * k + j);
      }
  }
  if (has_shared) {
    check_weight(shared_gate_up, "shared_gate_up");
    check_weight(shared_down, "shared_down");
    TORCH_CHECK(shared_gate_up.scalar_type() == wtype && shared_down.scalar_type() == wtype,
                "moe: shared and routed expert dtypes differ");
    TORCH_CHECK(shared_gate_up.is_contiguous() && shared_down.is_contiguous() && shared_gate_up.dim() == 2 &&
                    shared_gate_up.size(1) == H && shared_down.dim() == 2 && shared_down.size(0) == H &&
                    shared_gate_up.size(0) == 2 * shared_down.size(1),
                "moe: shared expert ", shared_gate_up.sizes(), " / ", shared_down.sizes(), " do not match x ",
                x.sizes());
    Group G;
    G.w13 = shared_gate_up.data_ptr();
    G.w2 = shared_down.data_ptr();
    if (is_fp8(shared_gate_up)) {
      check_fp8(shared_gate_up, shared_gate_up_s, bk, "moe shared_gate_up");
      check_fp8(shared_down, shared_down_s, bk, "moe shared_down");
      TORCH_CHECK(shared_down.size(1) % PW == 0, "moe: FP8 shared expert width ", shared_down.size(1),
                  " is not a multiple of ", PW);
      G.s13 = shared_gate_up_s.data_ptr<float>();
      G.s2 = shared_down_s.data_ptr<float>();
    }
    G.I = shared_down.size(1);
    for (int t = 0; t < T; ++t) {
      G.tok.push_back(t);
      G.scale.push_back(1.0f);
      G.dest.push_back(T * k + t);
    }
    groups.push_back(std::move(G));
  }
  int64_t inter_rows = 0;
  for (auto& G : groups) {
    G.inter_off = inter_rows;
    inter_rows += int64_t(G.tok.size()) * G.I;
  }
  const int P = T * k + (has_shared ? T : 0);
  std::vector<float> inter(inter_rows), part(int64_t(P) * H);
  if (T > 0) {
    if (wtype == at::kBFloat16)
      run_groups<bf16>(x.data_ptr<float>(), x.stride(0), H, groups, inter.data(), part.data(), 0);
    else if (wtype == at::kFloat8_e4m3fn)
      run_groups<uint8_t>(x.data_ptr<float>(), x.stride(0), H, groups, inter.data(), part.data(), int(bk));
    else
      run_groups<float>(x.data_ptr<float>(), x.stride(0), H, groups, inter.data(), part.data(), 0);
  }
  auto out = torch::empty({T, H}, x.options());
  float* op = out.data_ptr<float>();
  const float* pp = part.data();
  const int per_tok = k + (has_shared ? 1 : 0);
  at::parallel_for(0, T, 16, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      float* o = op + t * H;
      std::fill(o, o + H, 0.0f);
      for (int j = 0; j < k; ++j) axpy(1.0f, pp + (t * k + j) * H, o, H);
      if (per_tok > k) axpy(1.0f, pp + (int64_t(T) * k + t) * H, o, H);
    }
  });
  return out;
}

// Router: sigmoid scores, selection by score + bias (optionally within the best groups), weights from the raw
// scores, renormalised and scaled. Returns (weights fp32 [T, k], ids int64 [T, k]); ids in descending order of
// score + bias, ties to the lower expert id.
std::vector<torch::Tensor> moe_route(torch::Tensor x, torch::Tensor gate, torch::Tensor bias, int64_t top_k,
                                     int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling) {
  check_act(x, "x", 2);
  TORCH_CHECK(gate.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && gate.dim() == 2 &&
                  gate.size(1) == x.size(1) && bias.numel() == gate.size(0),
              "moe_route: router ", gate.sizes(), " / bias ", bias.sizes(), " for x ", x.sizes());
  const int64_t T = x.size(0), E = gate.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= E && n_group >= 1 && E % n_group == 0 && topk_group >= 1 &&
                  topk_group <= n_group,
              "moe_route: bad top_k / n_group / topk_group");
  if (x.stride(1) != 1) x = x.contiguous();
  auto g = gate.contiguous();
  auto b = bias.contiguous();
  auto logits = torch::empty({T, E}, x.options());
  {
    const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>();
    float* lp = logits.data_ptr<float>();
    const int H = x.size(1);
    const int64_t ldx = x.stride(0);
    at::parallel_for(0, T * E, 256, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) lp[i] = dot(xp + (i / E) * ldx, gp + (i % E) * H, H);
    });
  }
  auto weights = torch::empty({T, top_k}, x.options());
  auto ids = torch::empty({T, top_k}, x.options().dtype(at::kLong));
  const float *lp = logits.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t per_group = E / n_group;
  at::parallel_for(0, T, 16, [&](int64_t a, int64_t e_) {
    std::vector<float> score(E), choice(E), gscore(n_group);
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t t = a; t < e_; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        score[e] = 1.0f / (1.0f + std::exp(-lp[t * E + e]));
        choice[e] = score[e] + bp[e];
      }
      if (n_group > 1) {  // keep the topk_group groups whose two best choices sum highest
        for (int64_t gi = 0; gi < n_group; ++gi) {
          float b1 = ninf, b2 = ninf;
          for (int64_t e = gi * per_group; e < (gi + 1) * per_group; ++e) {
            const float c = choice[e];
            if (c > b1) {
              b2 = b1;
              b1 = c;
            } else if (c > b2) {
              b2 = c;
            }
          }
          gscore[gi] = per_group >= 2 ? b1 + b2 : b1;
        }
        std::vector<char> keep(n_group, 0);
        for (int64_t r = 0; r < topk_group; ++r) {
          int64_t best = -1;
          for (int64_t gi = 0; gi < n_group; ++gi)
            if (!keep[gi] && (best < 0 || gscore[gi] > gscore[best])) best = gi;
          keep[best] = 1;
        }
        for (int64_t e = 0; e < E; ++e)
          if (!keep[e / per_group]) choice[e] = ninf;
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (choice[e] == choice[e] && (best < 0 || choice[e] > choice[best])) best = e;
        if (best < 0) best = 0;  // all NaN: nothing sensible to pick
        choice[best] = std::numeric_limits<float>::quiet_NaN();  // taken
        ip[t * top_k + j] = best;
        wp[t * top_k + j] = score[best];
        sum += score[best];
      }
      const float div = norm_topk_prob ? sum + 1e-20f : 1.0f;
      for (int64_t j = 0; j < top_k; ++j) wp[t * top_k + j] = wp[t * top_k + j] / div * float(scaling);
    }
  });
  return {weights, ids};
}

}  // namespace
