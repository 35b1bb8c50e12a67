// Whole decoder layers and whole steps from C++: the Layer struct (one layer's weights and shape), StepInputs
// (the per-step tensors), forward_layers, embed_rows and rows_step; EXA_TIMERS profiling builds time each stage.
#pragma once

#include <torch/extension.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include "argmax.h"
#include "attention.h"
#include "gemm.h"
#include "moe.h"
#include "norm_rope.h"
#include "vec.h"

namespace {

// ---------------------------------------------------------------------------------------------------------
// Whole decoder layers from C++: the ops above in sequence with no Python in between (at batch 1, the
// Python dispatch between ~10 ops per layer costs as much as some of the ops).

struct Layer {
  // attention
  torch::Tensor input_norm, post_norm, qkv, o, q_norm, k_norm;
  // MLP: a MoE block (router defined) with an optional shared expert, or a dense MLP in shared_*
  torch::Tensor router, bias, w13, w2, shared_gate_up, shared_down;
  // FP8 weights' scales (kernels/cpu/gemm.h: check_fp8; undefined for other weights) and block size
  torch::Tensor qkv_s, o_s, w13_s, w2_s, shared_gate_up_s, shared_down_s;
  int64_t bk = 0;
  int64_t nq = 0, nkv = 0, d = 0, window = 0, pool_index = 0, top_k = 0, n_group = 1, topk_group = 1;
  bool sliding = false, use_rope = true, norm_topk_prob = true;
  double eps = 1e-5, scale = 1.0, scaling = 1.0;
};

// The per-step tensors every layer reads (built by the model runner).
struct StepInputs {
  torch::Tensor positions, query_start_loc, context_lens, seq_lens, block_tables, slot_mapping, ring_slots,
      ring_mapping, cos, sin, ring_k, ring_v, paged_k, paged_v;
};

const torch::Tensor& none() {
  static const torch::Tensor t = torch::empty({0});
  return t;
}

torch::Tensor or_none(const torch::Tensor& t) { return t.defined() ? t : none(); }

#ifdef EXA_TIMERS  // per-stage wall time of layer_forward, for profiling builds (EXASERVE_CPU_EXT_CFLAGS=-DEXA_TIMERS)
double stage_ns[10];  // 0-7: layer_forward's stages, 8: embedding, 9: final norm and lm_head / argmax
struct Stage {
  int i;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  ~Stage() { stage_ns[i] += std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count(); }
};
#define EXA_STAGE(i, ...) [&] { Stage s_{i}; return __VA_ARGS__; }()
#else
#define EXA_STAGE(i, ...) __VA_ARGS__
#endif

// The layer's attention over its pool, with this step's keys and values stored.
torch::Tensor attention(const Layer& L, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const StepInputs& in) {
  if (L.sliding) {  // attend first, then store (a long chunk would overwrite ring rows its own queries read)
    auto kc = in.ring_k.select(0, L.pool_index), vc = in.ring_v.select(0, L.pool_index);
    auto o = ring_attention(q, k, v, kc, vc, in.ring_slots, in.query_start_loc, in.context_lens, L.window, L.scale);
    write_kv(k, v, kc, vc, in.ring_mapping);
    return o;
  }
  auto kc = in.paged_k.select(0, L.pool_index), vc = in.paged_v.select(0, L.pool_index);
  write_kv(k, v, kc, vc, in.slot_mapping);
  return paged_attention(q, kc, vc, in.block_tables, in.seq_lens, in.query_start_loc, L.scale);
}

torch::Tensor layer_forward(const Layer& L, const torch::Tensor& x, const StepInputs& in) {
  const int64_t T = x.size(0), qd = L.nq * L.d, kd = L.nkv * L.d;
  auto xn = EXA_STAGE(0, rms_norm(x, L.input_norm, L.eps));
  auto qkv = EXA_STAGE(1, linear_op(xn, L.qkv, L.qkv_s, L.bk));
  auto q = qkv.narrow(1, 0, qd).view({T, L.nq, L.d});
  auto k = qkv.narrow(1, qd, kd).view({T, L.nkv, L.d});
  auto v = qkv.narrow(1, qd + kd, kd).view({T, L.nkv, L.d});
  auto qk = EXA_STAGE(2, qk_norm_rope(q, k, L.q_norm, L.k_norm, L.eps, in.positions, in.cos, in.sin, L.use_rope));
  auto o = EXA_STAGE(3, attention(L, qk[0], qk[1], v, in));
  auto hs = EXA_STAGE(4, add_rms_norm(linear_op(o.view({T, qd}), L.o, L.o_s, L.bk), x, L.post_norm, L.eps));  // {normed, residual}
  torch::Tensor mlp;
  if (L.router.defined()) {
    auto r = EXA_STAGE(5, moe_route(hs[0], L.router, L.bias, L.top_k, L.n_group, L.topk_group, L.norm_topk_prob,
                                    L.scaling));
    mlp = EXA_STAGE(6, moe(hs[0], L.w13, L.w2, r[0], r[1], or_none(L.shared_gate_up), or_none(L.shared_down), L.w13_s,
                           L.w2_s, L.shared_gate_up_s, L.shared_down_s, L.bk));
  } else {
    mlp = EXA_STAGE(6, moe(hs[0], none(), none(), none(), none(), L.shared_gate_up, L.shared_down, L.w13_s, L.w2_s,
                           L.shared_gate_up_s, L.shared_down_s, L.bk));
  }
  return EXA_STAGE(7, hs[1].add_(mlp));
}

torch::Tensor forward_layers(const std::vector<const Layer*>& layers, torch::Tensor x, const StepInputs& in) {
  check_act(x, "x", 2);
  for (const Layer* L : layers) x = layer_forward(*L, x, in);
  return x;
}

// Rows of an embedding table [V, H] (fp32 or bf16) as fp32 [T, H].
torch::Tensor embed_rows(const torch::Tensor& table, const torch::Tensor& ids_) {
  check_weight(table, "embed");
  TORCH_CHECK(table.dim() == 2 && ids_.dim() == 1, "embed: table ", table.sizes(), " / ids ", ids_.sizes());
  auto ids = ids_.to(at::kLong).contiguous();
  const int64_t T = ids.size(0), V = table.size(0), H = table.size(1);
  auto out = torch::empty({T, H}, table.options().dtype(at::kFloat));
  const int64_t* ip = ids.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(ip[t] >= 0 && ip[t] < V, "embed: token id ", ip[t], " out of range [0, ", V, ")");
    if (table.scalar_type() == at::kBFloat16) {
      const bf16* row = reinterpret_cast<const bf16*>(table.data_ptr()) + ip[t] * H;
      for (int64_t h = 0; h < H; ++h) op[t * H + h] = scalar(row[h]);
    } else {
      std::memcpy(op + t * H, table.data_ptr<float>() + ip[t] * H, H * sizeof(float));
    }
  }
  return out;
}

// One whole step on the C++ path: embedding, decoder layers, final norm and lm_head of the given rows, and
// with `argmax` the argmax of each row. Returns the logits [R, V] fp32, or with `argmax` the tokens (int64
// [R]; -1 for a row whose hidden state is not finite: it has no argmax, and the caller fails that request
// instead of emitting a token); with no Python between these ops, a decode step at batch 1 runs ~0.3 ms less
// Python.
// `screen`: the lm_head's argmax screen (argmax_screen), or empty to compute every logit.
// `token_mask`: a TokenMask of the rows (the argmax is over the tokens it allows), or empty for none.
torch::Tensor rows_step(const std::vector<const Layer*>& layers, torch::Tensor embed, torch::Tensor ids,
                        const StepInputs& in, torch::Tensor norm, double eps, torch::Tensor lm_head,
                        torch::Tensor rows, bool argmax, const std::vector<torch::Tensor>& screen,
                        const torch::Tensor& token_mask) {
  const TokenMask mask(token_mask, rows.numel(), lm_head.size(0));  // checked before the step runs
  auto x = forward_layers(layers, EXA_STAGE(8, embed_rows(embed, ids)), in);
  auto h = EXA_STAGE(9, rms_norm(x.index_select(0, rows.to(at::kLong)), norm, eps));
  if (!argmax) return EXA_STAGE(9, linear_op(h, lm_head, torch::Tensor(), 0));
  auto masked_argmax = [&] {
    auto logits = linear_op(h, lm_head, torch::Tensor(), 0);
    mask.apply(logits);
    return argmax_rows(logits);
  };
  auto tokens = EXA_STAGE(9, screen.size() == 3 ? screened_argmax(h, screen[0], screen[1], screen[2], lm_head, token_mask)
                                                : masked_argmax());
  auto bad = h.isfinite().logical_not().any(1);  // [R, H]: a read of what was just written, ~1 us per row
  if (bad.any().item<bool>()) tokens.masked_fill_(bad, -1);
  return tokens;
}

}  // namespace
