// GEMM on packed weights: the packed layout and pack(), the register-tiled kernel (fp32 / bf16 / int8 / FP8 weights,
// fp32 activations and accumulation), linear; plus the helpers every op uses: OpenMP work items and the
// argument checks of tensors coming from Python.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tuning.h"
#include "vec.h"

namespace {

// ---------------------------------------------------------------------------------------------------------
// GEMM on packed weights: out[m][n] = sum_k x_m[k] * w[n][k], x rows by pointer (fp32), w fp32, bf16, int8 or
// FP8 (with scales, below).
//
// Layout: a weight [N, K] (or each [N, K] matrix of a stack) is split into parts of `part` rows (w13: the gate
// rows, then the up rows) and each part into panels of 32 rows, the last one possibly narrower. A panel of
// width r is stored as [K][r] (column j = row j of the panel), at offset panel * 32 * K from the part's start.
// The tensor keeps its shape: only the order of the elements inside each part changes. A panel is one
// contiguous stream for the prefetcher, and the kernel broadcasts x[m][k] against 32 weights at a time, so
// no horizontal sums are needed.
//
// A full-width bf16 panel interleaves its two halves: column j of a k-row sits at 2 (j % 16) + j / 16. A load
// of 32-bit lanes then holds column i in the low and column 16 + i in the high half of lane i, widened to fp32
// by one shift and one mask, instead of zero-extending shuffles and shifts: fewer uops on the ports the FMAs
// need, which matters where few rows share each weight (MoE experts at ~4 tokens).
//
// The kernel works in the machine's own vector width (VL floats: 16 with AVX-512, 8 with AVX2), a k-row of a
// panel being NV = 32 / VL vectors, and tiles rows to what its registers hold: with AVX2's 16 registers, two
// rows of 32 columns (8 accumulators); AVX-512's 32 hold twelve. Wider tiles spill accumulators to the stack
// on every k step (measured on a Zen 3 host: 12-row tiles built for AVX-512 ran at ~2 GFLOP/s with AVX2).
inline int bf16_slot(int j) { return EXA_BF16_PAIRS ? 2 * (j % 16) + j / 16 : j; }

// MR_MAX: the widest row tile; PH2_ROWS: tiles of up to this many rows keep two k-phases of accumulators
// (shorter FMA dependency chains). VL, vf: vec.h.
#if defined(__AVX512F__)
constexpr int MR_MAX = 12, PH2_ROWS = 4;
#else
constexpr int MR_MAX = 2, PH2_ROWS = 1;
#endif
constexpr int NV = PW / VL;  // vectors per k-row of a full-width panel

// One k-row of a full-width panel as NV vectors of fp32: w[v] holds columns v * VL .. v * VL + VL - 1. FP8
// values come times 2^-8 (load_fp8; the 2^8 is in their scales).
inline void load_row(const float* p, vf* w) {
  for (int v = 0; v < NV; ++v) w[v] = loadv(p + v * VL);
}
inline void load_row(const bf16* p, vf* w) {
#if EXA_BF16_PAIRS
  for (int c = 0; c < NV / 2; ++c) {  // lane i of chunk c: columns c VL + i (low half) and 16 + c VL + i (high)
    vu u;
    std::memcpy(&u, p + c * 2 * VL, sizeof u);
    const vu lo = u << 16, hi = u & 0xFFFF0000u;
    std::memcpy(&w[c], &lo, sizeof lo);
    std::memcpy(&w[c + NV / 2], &hi, sizeof hi);
  }
#else
  typedef uint16_t vh __attribute__((vector_size(VL * sizeof(uint16_t))));
  for (int v = 0; v < NV; ++v) {
    vh h;
    std::memcpy(&h, p + v * VL, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
    std::memcpy(&w[v], &u, sizeof u);
  }
#endif
}
inline void load_row(const int8_t* p, vf* w) {  // the int8 screen of an lm_head (argmax.h)
  for (int v = 0; v < NV; ++v) {
#if defined(__AVX512F__)
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + v * VL))));
#elif defined(__AVX2__)
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + v * VL))));
#else
    float f[VL];
    for (int i = 0; i < VL; ++i) f[i] = p[v * VL + i];
#endif
    std::memcpy(&w[v], &f, sizeof w[v]);
  }
}
// FP8 e4m3 rows. The values come scaled by 2^FP8_LOAD_EXP (exactly: only the exponent moves); the kernels'
// scales carry 2^FP8_SCALE_EXP (cpu_ops multiplies them in) and outputs are multiplied by FP8_OUT, which undoes
// both. The byte 0x7f / 0xff (e4m3's NaN) reads as a finite value: quantized weights never hold NaN.
#if defined(__x86_64__) && defined(__AVX2__) && !defined(__AVX512F__)
// AVX2: 32 bytes to 32 fp32 in 10 single-uop instructions, shifts and masks only (no shuffles: on Zen 3 the
// shuffle ports are the ones the FMAs share). In each 16-bit lane (bytes 2i, 2i+1), the high byte shifted right
// arithmetically by 4 and masked leaves bf16 bits: the sign, e4m3's 4 exponent bits as the low 4 of bf16's 8, its
// 3 mantissa bits on top: 2^-120 times the value, normal and subnormal alike (bias 127 against 7); the low byte
// does the same after a shift left by 8. A 32-bit lane then holds two such bf16, which become fp32 by a shift
// left 16 (the lower one) or a mask (the upper one), as with bf16 pairs. So vector v brings out bytes 4i + v of
// the k-row, and a full panel's k-row stores column 8v + i there (fp8_slot).
// Subnormal e4m3 values (|q| < 2^-6, rare in block-scaled weights) become fp32 denormals: exact unless the
// process flushes denormals (DAZ), where they read as 0. Scales 2^60 and outputs 2^60 keep every product and
// partial sum in the normal range.
constexpr int FP8_LOAD_EXP = -120, FP8_SCALE_EXP = 60;
inline int fp8_slot(int j) { return 4 * (j % 8) + j / 8; }
inline void load_row(const uint8_t* p, vf* w) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m = _mm256_set1_epi32(int32_t(0x87F00000u));  // sign, exponent, 3 mantissa bits of the upper bf16
  const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(x, 8), 4);  // bytes 4i (low half), 4i + 2 (high half)
  const __m256i odd = _mm256_srai_epi16(x, 4);                         // bytes 4i + 1, 4i + 3 (low bits: junk)
  const __m256i r[4] = {_mm256_and_si256(_mm256_slli_epi32(even, 16), m),
                        _mm256_and_si256(_mm256_slli_epi32(odd, 16), m), _mm256_and_si256(even, m),
                        _mm256_and_si256(odd, m)};
  std::memcpy(w, r, sizeof r);
}
#else
// AVX-512 (or elsewhere): a sign-extended byte shifted left 7 is an fp16 with the byte's sign, its 4 exponent bits
// in the low 4 of the 5 and its 3 mantissa bits on top: 2^-8 times the value, normal and subnormal alike (bias 15
// against 7); bit 14 holds a copy of the sign, cleared. F16C widens fp16 exactly. Columns in plain order.
constexpr int FP8_LOAD_EXP = -8, FP8_SCALE_EXP = 8;
inline int fp8_slot(int j) { return j; }
inline void load_row(const uint8_t* p, vf* w) {
  for (int c = 0; c < PW / 16; ++c) {  // 16 columns at a time
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__F16C__)
    const __m256i h = _mm256_and_si256(
        _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c))), 7),
        _mm256_set1_epi16(int16_t(0xBFFF)));
    const __m512 f = _mm512_cvtph_ps(h);
    std::memcpy(&w[c], &f, sizeof f);
#else
    float f[16];
    for (int i = 0; i < 16; ++i) {  // the same values without F16C: sign, exponent e, mantissa m
      const int b = p[16 * c + i], e = (b >> 3) & 15, m = b & 7;
      const float mag = e ? std::ldexp(1.0f + m / 8.0f, e - 15) : std::ldexp(m / 8.0f, -14);
      f[i] = b & 0x80 ? -mag : mag;
    }
    std::memcpy(&w[c * 16 / VL], f, sizeof f);
#endif
  }
}
#endif
const float FP8_OUT = std::ldexp(1.0f, -FP8_LOAD_EXP - FP8_SCALE_EXP);

// MR rows of x against one full-width panel [K][32]; writes the first `ncols` columns. W = uint8_t: an FP8 panel
// with scales s[K / bk blocks]: each row's x is scaled per block (x * s, then times the weights).
template <int MR, typename W>
inline void ukernel(const float* const* x, const W* panel, int K, float* out, int64_t ldo, int ncols,
                    const float* s = nullptr, int bk = 0) {
  constexpr bool F8 = std::is_same_v<W, uint8_t>;
  constexpr int PH = MR <= PH2_ROWS ? 2 : 1;  // k-phases: independent accumulators shorten FMA chains
  vf acc[PH][MR][NV];
#pragma GCC unroll 16
  for (int p = 0; p < PH; ++p)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[p][m][v] = vf{};
  // FP8: each row's x times the panel's block scales, once per call, so the k loop broadcasts straight from memory
  // (a multiply and a broadcast per row and k-row fewer)
  const float* xr[MR];
  if constexpr (F8) {
    thread_local std::vector<float> scaled;
    scaled.resize(size_t(MR) * K);
    for (int m = 0; m < MR; ++m) {
      float* d = scaled.data() + size_t(m) * K;
      for (int k0 = 0, b = 0; k0 < K; k0 += bk, ++b) {
        const float sc = s[b];
        for (int k = k0; k < std::min(K, k0 + bk); ++k) d[k] = x[m][k] * sc;
      }
      xr[m] = d;
    }
  } else {
    for (int m = 0; m < MR; ++m) xr[m] = x[m];
  }
  int k = 0;
  for (; k + PH <= K; k += PH) {
    if constexpr (PREFETCH > 0)  // every cache line of the PH k-rows this iteration reads, PREFETCH rows ahead
      for (int b = 0; b < int(PH * PW * sizeof(W)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(panel + (k + PREFETCH) * PW) + b, 0, EXA_PF_LOCALITY);
#pragma GCC unroll 2
    for (int p = 0; p < PH; ++p) {
      vf w[NV];
      load_row(panel + (k + p) * PW, w);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {  // scalar * vector broadcasts (vf{} + s would cost an add: -0.0)
        const float xs = xr[m][k + p];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[p][m][v] += xs * w[v];
      }
    }
  }
  for (; k < K; ++k) {
    vf w[NV];
    load_row(panel + k * PW, w);
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[0][m][v] += xr[m][k] * w[v];
  }
  for (int m = 0; m < MR; ++m) {
    float tmp[PW];
    float* o = ncols == PW ? out + m * ldo : tmp;
    for (int v = 0; v < NV; ++v) {
      vf r = acc[0][m][v];
      if constexpr (PH == 2) r += acc[1][m][v];
      if constexpr (F8) r *= FP8_OUT;
      storev(o + v * VL, r);
    }
    if (ncols != PW) std::memcpy(out + m * ldo, tmp, ncols * sizeof(float));
  }
}

// All M rows of x against one full-width panel (FP8: with its scales).
template <typename W>
void panel_rows(const float* const* x, int M, const W* panel, int K, float* o, int64_t ldo, int width,
                const float* s = nullptr, int bk = 0) {
  int m = 0;
  if constexpr (MR_MAX >= 12) {
    for (; m + 12 <= M; m += 12) ukernel<12>(x + m, panel, K, o + m * ldo, ldo, width, s, bk);
    for (; m + 8 <= M; m += 8) ukernel<8>(x + m, panel, K, o + m * ldo, ldo, width, s, bk);
    if (M - m >= 4) {
      ukernel<4>(x + m, panel, K, o + m * ldo, ldo, width, s, bk);
      m += 4;
    }
  }
  for (; m + 2 <= M; m += 2) ukernel<2>(x + m, panel, K, o + m * ldo, ldo, width, s, bk);
  if (M - m >= 1) ukernel<1>(x + m, panel, K, o + m * ldo, ldo, width, s, bk);
}

// The first k-rows of the panel stream that starts at panel p0 of a part: the k loop prefetches PREFETCH rows
// ahead of itself, so without this the head of every work item's stream is read on demand, one miss after another
// (decode's work items are short: a third of an MoE item's bytes).
template <typename W>
inline void prefetch_head(const W* part, int p0, int K) {
  if constexpr (PREFETCH > 0) {
    const char* p = reinterpret_cast<const char*>(part + int64_t(p0) * PW * K);
    const int64_t bytes = int64_t(std::min(K, PREFETCH)) * PW * sizeof(W);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, EXA_PF_LOCALITY);
  }
}

// Columns [32 p0, min(32 p1, R)) of x @ part^T for M rows (part: R packed rows of K); out column 0 is column
// 32 p0. Single-threaded; callers split panels and rows between threads.
template <typename W>
void gemm_panels(const float* const* x, int M, const W* part, int R, int K, int p0, int p1, float* out,
                 int64_t ldo) {
  thread_local std::vector<W> pad;
  thread_local std::vector<float> wide;
  prefetch_head(part, p0, K);
  for (int p = p0; p < p1; ++p) {
    const int width = std::min(PW, R - p * PW);
    const W* panel = part + int64_t(p) * PW * K;
    if (width < PW) {  // the narrower last panel (plain [K][width]), zero-padded to a full-width one
      pad.assign(size_t(K) * PW, W(0));
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < width; ++j)
          pad[size_t(k) * PW + (std::is_same_v<W, bf16> ? bf16_slot(j) : j)] = panel[size_t(k) * width + j];
      panel = pad.data();
    }
    float* o = out + (p - p0) * PW;
    if constexpr (std::is_same_v<W, bf16>) {
      if (M >= WIDEN_ROWS) {  // widen the panel once rather than once per row tile
        wide.resize(size_t(K) * PW);
        for (size_t i = 0; i < size_t(K) * PW; i += PW) {
          if (PREFETCH > 0) __builtin_prefetch(panel + i + size_t(PREFETCH) * PW, 0, EXA_PF_LOCALITY);
          vf w[NV];
          load_row(panel + i, w);
          for (int v = 0; v < NV; ++v) storev(wide.data() + i + v * VL, w[v]);
        }
        panel_rows<float>(x, M, wide.data(), K, o, ldo, width);
        continue;
      }
    }
    panel_rows<W>(x, M, panel, K, o, ldo, width);
  }
}

// ---------------------------------------------------------------------------------------------------------
// FP8 weights (kernels/fp8.py): float8 e4m3 values in the packed layout (full-width panels in fp8_slot order; a
// weight in several parts has parts of whole panels) and one fp32 scale per panel and block of bk k-rows, times
// 2^FP8_SCALE_EXP (see load_row). A step reads one byte per weight and computes in fp32: the dequantized
// weights' result up to summation order.

struct Fp8W {
  const uint8_t* q;  // this part's panels
  const float* s;    // [panels][KB] scales of this part
  int KB, bk;
};

// The weight `rows` rows (a multiple of PW for FP8) further on.
template <typename W>
inline const W* advance(const W* w, int64_t rows, int64_t K) {
  return w + rows * K;
}
inline Fp8W advance(Fp8W w, int64_t rows, int64_t K) { return {w.q + rows * K, w.s + rows / PW * w.KB, w.KB, w.bk}; }
inline void prefetch_head(Fp8W w, int p0, int K) { prefetch_head(w.q, p0, K); }

// Handles of a weight of element type W (uint8_t: FP8, with its scales) from its storage.
template <typename W>
struct WeightOf {
  using H = const W*;
  static H make(const void* q, const float*, int, int) { return static_cast<H>(q); }
};
template <>
struct WeightOf<uint8_t> {
  using H = Fp8W;
  static H make(const void* q, const float* s, int KB, int bk) { return {static_cast<const uint8_t*>(q), s, KB, bk}; }
};

// gemm_panels for an FP8 part: few rows read the panel in registers; from FP8_WIDEN_ROWS rows it is widened (and
// scaled) to fp32 once and the fp32 kernel runs on it. A narrower last panel is zero-padded to full width.
inline void gemm_panels(const float* const* x, int M, Fp8W part, int R, int K, int p0, int p1, float* out,
                        int64_t ldo) {
  thread_local std::vector<float> wide, narrow_out;
  thread_local std::vector<uint8_t> pad;
  prefetch_head(part, p0, K);
  for (int p = p0; p < p1; ++p) {
    const int width = std::min(PW, R - p * PW);
    const uint8_t* panel = part.q + int64_t(p) * PW * K;
    const float* s = part.s + int64_t(p) * part.KB;
    if (width < PW) {  // plain [K][width] -> a full-width panel, zero-padded
      pad.assign(size_t(K) * PW, 0);
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < width; ++j) pad[size_t(k) * PW + fp8_slot(j)] = panel[size_t(k) * width + j];
      panel = pad.data();
    }
    float* o = out + (p - p0) * PW;
    if (M >= FP8_WIDEN_ROWS) {
      wide.resize(size_t(K) * PW);
      for (int k0 = 0, b = 0; k0 < K; k0 += part.bk, ++b) {
        const float sc = s[b];
        for (int k = k0; k < std::min(K, k0 + part.bk); ++k) {
          if (PREFETCH > 0) __builtin_prefetch(panel + (k + PREFETCH) * PW, 0, EXA_PF_LOCALITY);
          vf w[NV];
          load_row(panel + k * PW, w);
          for (int v = 0; v < NV; ++v) storev(wide.data() + size_t(k) * PW + v * VL, w[v] * sc * FP8_OUT);
        }
      }
      panel_rows<float>(x, M, wide.data(), K, o, ldo, width);
    } else {
      panel_rows<uint8_t>(x, M, panel, K, o, ldo, width, s, part.bk);
    }
  }
}

bool is_fp8(const torch::Tensor& w) { return w.defined() && w.scalar_type() == at::kFloat8_e4m3fn; }

// An FP8 weight [..., N, K] (packed) and its scales [..., ceil(N / PW), ceil(K / bk)] (times 2^8), as the
// kernels need them. A weight packed in several parts needs parts of whole panels (pack checks it).
void check_fp8(const torch::Tensor& w, const torch::Tensor& s, int64_t bk, const char* name) {
  TORCH_CHECK(bk >= 1, name, ": an FP8 weight needs its block size (bk >= 1)");
  std::vector<int64_t> want(w.sizes().begin(), w.sizes().end());
  want[want.size() - 2] = (w.size(-2) + PW - 1) / PW;
  want.back() = (w.size(-1) + bk - 1) / bk;
  TORCH_CHECK(s.defined() && s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                  s.sizes() == torch::IntArrayRef(want),
              name, ": the scales of an FP8 weight ", w.sizes(), " in blocks of ", bk, " must be contiguous fp32 ",
              torch::IntArrayRef(want));
}

void check_weight(const torch::Tensor& w, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || is_fp8(w), name,
              " must be float32, bfloat16 or float8_e4m3fn, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), name, " must be contiguous");
}

void check_act(const torch::Tensor& x, const char* name, int dim) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == dim, name, " must have ", dim, " dims, got ", x.dim());
}

int num_threads() { return std::max(1, at::get_num_threads()); }

template <typename F>
void parallel_items(int64_t n, F&& fn) {
  if (n <= 0) return;
  const int nt = n > 1 ? num_threads() : 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

int cdiv(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Panels per work item: about ITEMS_PER_THREAD items per thread, at most `hi` panels.
int panels_per_item(int64_t total_panels, int hi) {
  return std::clamp(cdiv(total_panels, ITEMS_PER_THREAD * num_threads()), 1, hi);
}


// slot_of: where column j of a full-width panel goes (bf16_slot, fp8_slot), plain order without
template <typename T>
void pack_impl(const T* src, T* dst, int64_t batch, int64_t N, int64_t K, int64_t part, int (*slot_of)(int) = nullptr) {
  const int64_t parts = N / part, panels = cdiv(part, PW);
  at::parallel_for(0, batch * parts * panels, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t p = i % panels, base = (i / panels) * part * K;  // (matrix, part) -> first element
      const int64_t width = std::min<int64_t>(PW, part - p * PW);
      const T* s = src + base + p * PW * K;
      T* d = dst + base + p * PW * K;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t slot = slot_of && width == PW ? slot_of(int(j)) : j;
        for (int64_t k = 0; k < K; ++k) d[k * width + slot] = s[j * K + k];
      }
    }
  });
}

// The packed copy of w [..., N, K] with parts of `part` rows (N % part == 0).
torch::Tensor pack(torch::Tensor w, int64_t part) {
  if (w.scalar_type() == at::kChar) {  // the int8 screen of an lm_head (screened argmax)
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), "pack: an int8 weight must be a contiguous CPU tensor");
  } else {
    check_weight(w, "weight");
  }
  TORCH_CHECK(w.dim() >= 2, "pack: weight must have at least 2 dims");
  const int64_t N = w.size(-2), K = w.size(-1);
  TORCH_CHECK(part >= 1 && N % part == 0, "pack: ", N, " rows do not split into parts of ", part);
  auto out = torch::empty_like(w);
  const int64_t batch = N * K ? w.numel() / (N * K) : 0;
  if (is_fp8(w))  // one scale row per panel: only the last panel of the last part may be narrower
    TORCH_CHECK(part == N || part % PW == 0, "pack: an FP8 weight in parts needs parts of a multiple of ", PW,
                " rows, got ", part);
  if (w.scalar_type() == at::kBFloat16)
    pack_impl(reinterpret_cast<const int16_t*>(w.data_ptr()), reinterpret_cast<int16_t*>(out.data_ptr()), batch,
              N, K, part, bf16_slot);
  else if (is_fp8(w))
    pack_impl(reinterpret_cast<const uint8_t*>(w.data_ptr()), reinterpret_cast<uint8_t*>(out.data_ptr()), batch, N,
              K, part, fp8_slot);
  else if (w.scalar_type() == at::kChar)
    pack_impl(w.data_ptr<int8_t>(), out.data_ptr<int8_t>(), batch, N, K, part);
  else
    pack_impl(w.data_ptr<float>(), out.data_ptr<float>(), batch, N, K, part);
  return out;
}

template <typename H>
void linear_impl(const torch::Tensor& x, H wp, int N, torch::Tensor& out) {
  const int M = x.size(0), K = x.size(1);
  const int64_t ldx = x.stride(0);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int mb = cdiv(M, BM), P = cdiv(N, PW);
  const int pp = panels_per_item(int64_t(P) * mb, GEMM_PANELS_PER_ITEM), nb = cdiv(P, pp);
  parallel_items(int64_t(mb) * nb, [&](int64_t item) {
    const int m0 = (item % mb) * BM, p0 = (item / mb) * pp;
    const int bm = std::min(BM, M - m0), p1 = std::min(P, p0 + pp);
    const float* rows[BM];
    for (int i = 0; i < bm; ++i) rows[i] = xp + (m0 + i) * ldx;
    gemm_panels(rows, bm, wp, N, K, p0, p1, op + int64_t(m0) * N + p0 * PW, N);
  });
}

// Leading dims of x flattened into rows: [..., K] -> [rows, K] (a view when the layout allows).
torch::Tensor rows_of(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dim");
  auto r = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

std::vector<int64_t> with_last(const torch::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

// x [..., K] fp32 @ w^T, w [N, K] packed with part = N; an FP8 w with its scales (check_fp8) and block size.
torch::Tensor linear_op(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t bk) {
  check_weight(w, "weight");
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && w.size(1) == x.size(-1), "linear: x ", x.sizes(), " and weight ",
              w.sizes(), " do not match");
  auto x2 = rows_of(x, "x");
  const int N = w.size(0);
  auto out = torch::empty(with_last(x, N), x.options());
  auto o2 = out.view({x2.size(0), N});
  if (is_fp8(w)) {
    check_fp8(w, scale, bk, "linear");
    linear_impl(x2, Fp8W{reinterpret_cast<const uint8_t*>(w.data_ptr()), scale.data_ptr<float>(),
                         int(scale.size(1)), int(bk)}, N, o2);
  } else if (w.scalar_type() == at::kBFloat16) {
    linear_impl(x2, reinterpret_cast<const bf16*>(w.data_ptr()), N, o2);
  } else {
    linear_impl(x2, w.data_ptr<float>(), N, o2);
  }
  return out;
}

}  // namespace
