// CPU kernels for exaserve: GEMM with fp32, bf16 or block-FP8 weights (fp32 activations and accumulation), the whole
// MoE block (routed experts + shared expert) in one call, sliding-window ring attention, paged attention,
// KV writes, RMSNorm and the q/k norm + RoPE front of attention.
//
// Why: on a CPU without bf16 matrix units, torch runs bf16 GEMMs far slower than fp32, and fp32 weights
// double the bytes a decode step reads. Here bf16 weights are widened in registers (exact), so a step reads
// half the bytes and computes in fp32. And each op is one call instead of tens of small torch ops, which
// at small batch cost more in dispatch than in arithmetic.
//
// Vectors use GCC vector extensions (16 floats = one AVX-512 register; the compiler splits them on
// narrower ISAs), so the file builds for whatever -march=native offers. Threads: OpenMP, linked against
// the libgomp torch already loaded, so kernels share torch's thread team instead of adding a second one.
//
// The one translation unit: the kernels live in the headers below, by concern (each opens with what it holds),
// and this file holds the Python bindings.
#include <torch/extension.h>

#include <vector>

#include "tuning.h"     // tuning constants
#include "vec.h"        // vector helpers
#include "gemm.h"       // packing, GEMM, linear, work items, argument checks
#include "moe.h"        // MoE block and router
#include "argmax.h"     // argmax, screened argmax
#include "norm_rope.h"  // RMSNorm, q/k norm + RoPE
#include "attention.h"  // KV writes, ring and paged attention
#include "layer.h"      // decoder layers, whole steps

// Entry points that compute release the GIL: the HTTP thread can serialise tokens meanwhile.
#ifdef EXA_HOLD_GIL
#define EXA_COMPUTE_GUARD
#else
#define EXA_COMPUTE_GUARD , py::call_guard<py::gil_scoped_release>()
#endif
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "packed copy of a weight [..., N, K] in parts of `part` rows");
  m.def("fp8_scale_exp", [] { return FP8_SCALE_EXP; }, "the power of two FP8 weights' kernel scales carry");
  m.def("linear", &linear_op, "x [M, K] fp32 @ w [N, K] (packed; fp32, bf16, or FP8 with scales)^T -> [M, N] fp32"
        EXA_COMPUTE_GUARD);
  m.def("moe", &moe, "routed + shared experts in one call" EXA_COMPUTE_GUARD);
  m.def("moe_route", &moe_route EXA_COMPUTE_GUARD);
  m.def("argmax_rows", &argmax_rows EXA_COMPUTE_GUARD);
  m.def("argmax_screen", &argmax_screen, "int8 screen of an unpacked lm_head: (packed q, scales, bounds)");
  m.def("screened_argmax", &screened_argmax, "argmax of x @ lm_head^T through its screen" EXA_COMPUTE_GUARD);
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("qk_norm_rope", &qk_norm_rope);
  m.def("write_kv", &write_kv);
  m.def("ring_attention", &ring_attention EXA_COMPUTE_GUARD);
  m.def("paged_attention", &paged_attention EXA_COMPUTE_GUARD);
  py::class_<Layer>(m, "Layer")
      .def(py::init<>())
      .def_readwrite("input_norm", &Layer::input_norm)
      .def_readwrite("post_norm", &Layer::post_norm)
      .def_readwrite("qkv", &Layer::qkv)
      .def_readwrite("o", &Layer::o)
      .def_readwrite("q_norm", &Layer::q_norm)
      .def_readwrite("k_norm", &Layer::k_norm)
      .def_readwrite("router", &Layer::router)
      .def_readwrite("bias", &Layer::bias)
      .def_readwrite("w13", &Layer::w13)
      .def_readwrite("w2", &Layer::w2)
      .def_readwrite("shared_gate_up", &Layer::shared_gate_up)
      .def_readwrite("shared_down", &Layer::shared_down)
      .def_readwrite("qkv_s", &Layer::qkv_s)
      .def_readwrite("o_s", &Layer::o_s)
      .def_readwrite("w13_s", &Layer::w13_s)
      .def_readwrite("w2_s", &Layer::w2_s)
      .def_readwrite("shared_gate_up_s", &Layer::shared_gate_up_s)
      .def_readwrite("shared_down_s", &Layer::shared_down_s)
      .def_readwrite("bk", &Layer::bk)
      .def_readwrite("nq", &Layer::nq)
      .def_readwrite("nkv", &Layer::nkv)
      .def_readwrite("d", &Layer::d)
      .def_readwrite("window", &Layer::window)
      .def_readwrite("pool_index", &Layer::pool_index)
      .def_readwrite("top_k", &Layer::top_k)
      .def_readwrite("n_group", &Layer::n_group)
      .def_readwrite("topk_group", &Layer::topk_group)
      .def_readwrite("sliding", &Layer::sliding)
      .def_readwrite("use_rope", &Layer::use_rope)
      .def_readwrite("norm_topk_prob", &Layer::norm_topk_prob)
      .def_readwrite("eps", &Layer::eps)
      .def_readwrite("scale", &Layer::scale)
      .def_readwrite("scaling", &Layer::scaling);
  py::class_<StepInputs>(m, "StepInputs")
      .def(py::init<>())
      .def_readwrite("positions", &StepInputs::positions)
      .def_readwrite("query_start_loc", &StepInputs::query_start_loc)
      .def_readwrite("context_lens", &StepInputs::context_lens)
      .def_readwrite("seq_lens", &StepInputs::seq_lens)
      .def_readwrite("block_tables", &StepInputs::block_tables)
      .def_readwrite("slot_mapping", &StepInputs::slot_mapping)
      .def_readwrite("ring_slots", &StepInputs::ring_slots)
      .def_readwrite("ring_mapping", &StepInputs::ring_mapping)
      .def_readwrite("cos", &StepInputs::cos)
      .def_readwrite("sin", &StepInputs::sin)
      .def_readwrite("ring_k", &StepInputs::ring_k)
      .def_readwrite("ring_v", &StepInputs::ring_v)
      .def_readwrite("paged_k", &StepInputs::paged_k)
      .def_readwrite("paged_v", &StepInputs::paged_v);
#ifdef EXA_TIMERS
  m.def("stage_ns", [] { return std::vector<double>(stage_ns, stage_ns + 10); });
#endif
  m.def("rows_step", &rows_step, "embedding, layers, norm, lm_head of `rows` (and argmax)" EXA_COMPUTE_GUARD);
  m.def("embed_rows", &embed_rows);
  m.def("forward_layers", &forward_layers, "decoder layers in sequence; returns the residual stream after them" EXA_COMPUTE_GUARD);
}
