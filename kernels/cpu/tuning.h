// Tuning constants of the CPU kernels, in one place, each with why it has its value. The EXA_* macros can be
// set without editing: EXASERVE_CPU_EXT_CFLAGS=-DEXA_PREFETCH=64 builds (in its own folder) with that value.
// The at::parallel_for grain sizes of the small elementwise ops and ukernel's register tiles (gemm.h: VL, MR_MAX)
// stay at their use sites (they follow from the loop, not from measurement).
#pragma once

namespace {

// ----- GEMM on packed weights (gemm.h) -----

// Columns per panel of the packed layout: two 16-float vectors per k-row, so the kernel broadcasts x[m][k]
// against 32 weights at a time (layout in gemm.h).
constexpr int PW = 32;  // panel width
// 1: full-width bf16 panels interleave their two halves (bf16_slot), widened by one shift and one mask per
// 64-byte load instead of two shuffles and two shifts (see the layout comment in gemm.h); 0: plain order.
#ifndef EXA_BF16_PAIRS
#define EXA_BF16_PAIRS 1
#endif
// Software prefetch distance in panel rows (k steps): with two threads, hardware prefetch alone leaves ~20%
// of the DRAM bandwidth unused when weights stream past once (decode).
#ifndef EXA_PREFETCH
#define EXA_PREFETCH 128
#endif
constexpr int PREFETCH = EXA_PREFETCH;
#ifndef EXA_PF_LOCALITY
#define EXA_PF_LOCALITY 2  // prefetcht1: into L2, which frees the fill buffers sooner than t0 (A/B: -7% per step)
#endif
// From this many rows, a bf16 panel is widened to fp32 once instead of in registers per row tile.
#ifndef EXA_WIDEN_ROWS
#define EXA_WIDEN_ROWS 48
#endif
constexpr int WIDEN_ROWS = EXA_WIDEN_ROWS;
// From this many rows, an FP8 panel is widened (and scaled) to fp32 once instead of in registers per row tile:
// its conversion costs ~3x a bf16 one, and the FP8 register kernel tiles at most 4 rows.
#ifndef EXA_FP8_WIDEN_ROWS
#define EXA_FP8_WIDEN_ROWS 16
#endif
constexpr int FP8_WIDEN_ROWS = EXA_FP8_WIDEN_ROWS;
// Rows of x per work item: the block of x stays in L2 while the item's panels stream past it.
constexpr int BM = 256;
// Work items per thread when panels are split between threads (dynamic scheduling evens out the threads).
constexpr int ITEMS_PER_THREAD = 8;
// The most panels in one work item: in dense GEMMs and the argmax screen, and in the MoE block's expert groups
// (smaller items there, where each expert's group of rows is short).
constexpr int GEMM_PANELS_PER_ITEM = 16;
constexpr int MOE_PANELS_PER_ITEM = 4;

// ----- Attention (attention.h) -----

// A run of QB queries of one (sequence, kv head) shares one list of key/value row pointers.
constexpr int QB = 16;  // queries per work item

}  // namespace
