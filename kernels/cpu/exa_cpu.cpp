// CPU kernels for exaserve: GEMM with fp32 or bf16 weights (fp32 activations and accumulation), the whole
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
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t u16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef float v2 __attribute__((vector_size(8)));

using bf16 = uint16_t;

inline v16 load(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline v16 load(const bf16* p) {  // 16 bf16 -> fp32: the bf16 bits are the high half of the fp32
  h16 h;
  std::memcpy(&h, p, sizeof h);
  u16 u = __builtin_convertvector(h, u16) << 16;
  v16 r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}
inline v16 load(const int8_t* p) {  // 16 int8 -> fp32 (exact)
#ifdef __AVX512F__  // GCC scalarises the generic conversion below: two instructions instead of ~50
  return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  typedef int8_t c16 __attribute__((vector_size(16)));
  c16 c;
  std::memcpy(&c, p, sizeof c);
  return __builtin_convertvector(c, v16);
#endif
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline float scalar(float x) { return x; }
inline float scalar(bf16 h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float hsum(v16 v) {
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  v2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

// Sixteen horizontal sums at once: lane i of the result is the sum of acc[i]'s lanes (15 two-source
// shuffles + adds instead of 16 separate reductions).
inline v16 reduce16(const v16* a) {
  v16 r1[8], r2[4], r3[2];
  for (int i = 0; i < 8; ++i)
    r1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                    31);
  for (int i = 0; i < 4; ++i)
    r2[i] = __builtin_shufflevector(r1[2 * i], r1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26,
                                    27) +
            __builtin_shufflevector(r1[2 * i], r1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                    31);
  for (int i = 0; i < 2; ++i)
    r3[i] = __builtin_shufflevector(r2[2 * i], r2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28,
                                    29) +
            __builtin_shufflevector(r2[2 * i], r2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                    31);
  return __builtin_shufflevector(r3[0], r3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(r3[0], r3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

inline float dot(const float* a, const float* b, int n) {
  v16 acc{};
  int i = 0;
  for (; i + 16 <= n; i += 16) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int n) {  // y += a * x
  int i = 0;
  for (; i + 16 <= n; i += 16) store(y + i, load(y + i) + a * load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

// e^x for 16 lanes: 2^n * e^r with n = round(x / ln2), |r| <= ln2/2, degree-6 Taylor for e^r (relative error
// ~2e-7); inputs clamped to the normal fp32 range (e^-87.3 ~ 1e-38 stands in for 0).
inline v16 vexp(v16 x) {
  const v16 lo = v16{} - 87.3f, hi = v16{} + 88.7f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v16 magic = v16{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const v16 n = (x * 1.44269504088896341f + magic) - magic;
  const v16 r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  v16 p = v16{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  typedef int32_t i16v __attribute__((vector_size(64)));
  const i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// y[i] = e^(x[i] - shift) for n values (in place allowed); returns their sum.
inline float exp_sum(const float* x, float shift, float* y, int n) {
  v16 acc{};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 e = vexp(load(x + i) - shift);
    store(y + i, e);
    acc += e;
  }
  float s = hsum(acc);
  if (i < n) {
    float buf[16] = {0};
    std::memcpy(buf, x + i, (n - i) * sizeof(float));
    const v16 e = vexp(load(buf) - shift);
    store(buf, e);
    for (int j = 0; j < n - i; ++j) {
      y[i + j] = buf[j];
      s += buf[j];
    }
  }
  return s;
}

// out[i] = silu(gate[i]) * up[i]
inline void silu_mul(const float* gate, const float* up, float* out, int n) {
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 g = load(gate + i);
    store(out + i, g / (1.0f + vexp(-g)) * load(up + i));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// ---------------------------------------------------------------------------------------------------------
// GEMM on packed weights: out[m][n] = sum_k x_m[k] * w[n][k], x rows by pointer (fp32), w fp32 or bf16.
//
// Layout: a weight [N, K] (or each [N, K] matrix of a stack) is split into parts of `part` rows (w13: the gate
// rows, then the up rows) and each part into panels of 32 rows, the last one possibly narrower. A panel of
// width r is stored as [K][r] (column j = row j of the panel), at offset panel * 32 * K from the part's start.
// The tensor keeps its shape: only the order of the elements inside each part changes. A panel is one
// contiguous stream for the prefetcher, and the kernel broadcasts x[m][k] against 32 weights at a time, so
// no horizontal sums are needed.
//
// A full-width bf16 panel interleaves its two halves: column j of a k-row sits at 2 (j % 16) + j / 16. One
// 64-byte load then holds columns 0-15 in the low and 16-31 in the high halves of its 32-bit lanes, widened
// to fp32 by one shift and one mask, instead of two zero-extending shuffles and two shifts: fewer uops on
// the ports the FMAs need, which matters where few rows share each weight (MoE experts at ~4 tokens).
constexpr int PW = 32;  // panel width
#ifndef EXA_BF16_PAIRS
#define EXA_BF16_PAIRS 1
#endif
inline int bf16_slot(int j) { return EXA_BF16_PAIRS ? 2 * (j % 16) + j / 16 : j; }

// Columns 0-15 and 16-31 of one k-row of a full-width panel, as fp32.
template <typename W>
inline void load_cols(const W* p, v16& lo, v16& hi) {
  lo = load(p);
  hi = load(p + 16);
}
inline void load_cols(const bf16* p, v16& lo, v16& hi) {
#if EXA_BF16_PAIRS
  u16 u, a, b;
  std::memcpy(&u, p, sizeof u);
  a = u << 16;
  b = u & 0xFFFF0000u;
  std::memcpy(&lo, &a, sizeof lo);
  std::memcpy(&hi, &b, sizeof hi);
#else
  lo = load(p);
  hi = load(p + 16);
#endif
}
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

// MR rows of x against one full-width panel [K][32]; writes the first `ncols` columns.
template <int MR, typename W>
inline void ukernel(const float* const* x, const W* panel, int K, float* out, int64_t ldo, int ncols) {
  constexpr int PH = MR <= 4 ? 2 : 1;  // k-phases: independent accumulators shorten FMA chains at small MR
  v16 acc[PH][MR][2];
#pragma GCC unroll 16
  for (int p = 0; p < PH; ++p)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[p][m][0] = acc[p][m][1] = v16{};
  int k = 0;
  for (; k + PH <= K; k += PH) {
    if constexpr (PREFETCH > 0) __builtin_prefetch(panel + (k + PREFETCH) * PW, 0, EXA_PF_LOCALITY);
#pragma GCC unroll 2
    for (int p = 0; p < PH; ++p) {
      v16 w0, w1;
      load_cols(panel + (k + p) * PW, w0, w1);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {  // scalar * vector broadcasts (v16{} + s would cost an add: -0.0)
        const float xs = x[m][k + p];
        acc[p][m][0] += xs * w0;
        acc[p][m][1] += xs * w1;
      }
    }
  }
  for (; k < K; ++k) {
    v16 w0, w1;
    load_cols(panel + k * PW, w0, w1);
    for (int m = 0; m < MR; ++m) {
      const float xs = x[m][k];
      acc[0][m][0] += xs * w0;
      acc[0][m][1] += xs * w1;
    }
  }
  for (int m = 0; m < MR; ++m) {
    v16 r0 = acc[0][m][0], r1 = acc[0][m][1];
    if constexpr (PH == 2) {
      r0 += acc[1][m][0];
      r1 += acc[1][m][1];
    }
    if (ncols == PW) {
      store(out + m * ldo, r0);
      store(out + m * ldo + 16, r1);
    } else {
      float tmp[PW];
      store(tmp, r0);
      store(tmp + 16, r1);
      std::memcpy(out + m * ldo, tmp, ncols * sizeof(float));
    }
  }
}

// All M rows of x against one full-width panel.
template <typename W>
void panel_rows(const float* const* x, int M, const W* panel, int K, float* o, int64_t ldo, int width) {
  {
    int m = 0;
    for (; m + 12 <= M; m += 12) ukernel<12>(x + m, panel, K, o + m * ldo, ldo, width);  // 24 accumulators
    for (; m + 8 <= M; m += 8) ukernel<8>(x + m, panel, K, o + m * ldo, ldo, width);
    if (M - m >= 4) {
      ukernel<4>(x + m, panel, K, o + m * ldo, ldo, width);
      m += 4;
    }
    if (M - m >= 2) {
      ukernel<2>(x + m, panel, K, o + m * ldo, ldo, width);
      m += 2;
    }
    if (M - m >= 1) ukernel<1>(x + m, panel, K, o + m * ldo, ldo, width);
  }
}

// Columns [32 p0, min(32 p1, R)) of x @ part^T for M rows (part: R packed rows of K); out column 0 is column
// 32 p0. Single-threaded; callers split panels and rows between threads.
template <typename W>
void gemm_panels(const float* const* x, int M, const W* part, int R, int K, int p0, int p1, float* out,
                 int64_t ldo) {
  thread_local std::vector<W> pad;
  thread_local std::vector<float> wide;
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
          v16 lo, hi;
          load_cols(panel + i, lo, hi);
          store(wide.data() + i, lo);
          store(wide.data() + i + 16, hi);
        }
        panel_rows<float>(x, M, wide.data(), K, o, ldo, width);
        continue;
      }
    }
    panel_rows<W>(x, M, panel, K, o, ldo, width);
  }
}


void check_weight(const torch::Tensor& w, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), name, " must be contiguous");
}

void check_act(const torch::Tensor& x, const char* name, int dim) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == dim, name, " must have ", dim, " dims, got ", x.dim());
}

template <typename F>
void parallel_items(int64_t n, F&& fn) {
  if (n <= 0) return;
  const int nt = n > 1 ? num_threads() : 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

int cdiv(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Panels per work item: about 8 items per thread, at most `hi` panels.
int panels_per_item(int64_t total_panels, int hi) {
  return std::clamp(cdiv(total_panels, 8 * num_threads()), 1, hi);
}

// Rows of x per work item: the block of x stays in L2 while the item's panels stream past it.
constexpr int BM = 256;

// pairs: full-width panels in the interleaved bf16 order (bf16_slot)
template <typename T>
void pack_impl(const T* src, T* dst, int64_t batch, int64_t N, int64_t K, int64_t part, bool pairs = false) {
  const int64_t parts = N / part, panels = cdiv(part, PW);
  at::parallel_for(0, batch * parts * panels, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t p = i % panels, base = (i / panels) * part * K;  // (matrix, part) -> first element
      const int64_t width = std::min<int64_t>(PW, part - p * PW);
      const T* s = src + base + p * PW * K;
      T* d = dst + base + p * PW * K;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t slot = pairs && width == PW ? bf16_slot(int(j)) : j;
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
  if (w.scalar_type() == at::kBFloat16)
    pack_impl(reinterpret_cast<const int16_t*>(w.data_ptr()), reinterpret_cast<int16_t*>(out.data_ptr()), batch,
              N, K, part, /*pairs=*/true);
  else if (w.scalar_type() == at::kChar)
    pack_impl(w.data_ptr<int8_t>(), out.data_ptr<int8_t>(), batch, N, K, part);
  else
    pack_impl(w.data_ptr<float>(), out.data_ptr<float>(), batch, N, K, part);
  return out;
}

template <typename W>
void linear_impl(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out) {
  const int M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t ldx = x.stride(0);
  const float* xp = x.data_ptr<float>();
  const W* wp = reinterpret_cast<const W*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  const int mb = cdiv(M, BM), P = cdiv(N, PW);
  const int pp = panels_per_item(int64_t(P) * mb, 16), nb = cdiv(P, pp);
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

// x [..., K] fp32 @ w^T, w [N, K] packed with part = N.
torch::Tensor linear_op(torch::Tensor x, torch::Tensor w) {
  check_weight(w, "weight");
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && w.size(1) == x.size(-1), "linear: x ", x.sizes(), " and weight ",
              w.sizes(), " do not match");
  auto x2 = rows_of(x, "x");
  auto out = torch::empty(with_last(x, w.size(0)), x.options());
  auto o2 = out.view({x2.size(0), w.size(0)});
  if (w.scalar_type() == at::kBFloat16)
    linear_impl<bf16>(x2, w, o2);
  else
    linear_impl<float>(x2, w, o2);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// MoE: routed experts + optional shared expert, out[t] = sum_j w_tj * down_e(silu(gate_e x) * up_e x) + shared

struct Group {       // one expert and the token rows routed to it
  const void* w13;   // [2I, H]: gate rows then up rows
  const void* w2;    // [H, I]
  int I;
  std::vector<int> tok;      // token of each row
  std::vector<float> scale;  // routing weight of each row
  std::vector<int> dest;     // row of the partial-output buffer it writes
  int64_t inter_off = 0;     // its rows in the intermediate buffer
};

template <typename W>
void run_groups(const float* x, int64_t ldx, int H, std::vector<Group>& groups, float* inter, float* part) {
  int64_t total = 0;
  for (const Group& G : groups) total += cdiv(G.I, PW);
  const int JP = panels_per_item(total, 4), HP = panels_per_item(int64_t(groups.size()) * cdiv(H, PW), 4);
  const int JB = JP * PW, HB = HP * PW;
  // phase 1: inter = silu(x W_gate^T) * (x W_up^T); w13 packed in two parts (gate, up) of I rows
  std::vector<std::pair<int, int>> items;
  for (int g = 0; g < (int)groups.size(); ++g)
    for (int p = 0; p < cdiv(groups[g].I, PW); p += JP) items.emplace_back(g, p);
  parallel_items(items.size(), [&](int64_t it) {
    const Group& G = groups[items[it].first];
    const int p0 = items[it].second, p1 = std::min(cdiv(G.I, PW), p0 + JP), M = G.tok.size();
    const int j0 = p0 * PW, bj = std::min(G.I, p1 * PW) - j0;
    const W* w13 = static_cast<const W*>(G.w13);
    thread_local std::vector<const float*> rows;
    thread_local std::vector<float> gate, up;
    rows.resize(M);
    gate.resize(size_t(std::min(M, BM)) * JB);
    up.resize(size_t(std::min(M, BM)) * JB);
    for (int m = 0; m < M; ++m) rows[m] = x + int64_t(G.tok[m]) * ldx;
    float* dst = inter + G.inter_off;
    for (int m0 = 0; m0 < M; m0 += BM) {
      const int bm = std::min(BM, M - m0);
      gemm_panels(rows.data() + m0, bm, w13, G.I, H, p0, p1, gate.data(), JB);
      gemm_panels(rows.data() + m0, bm, w13 + int64_t(G.I) * H, G.I, H, p0, p1, up.data(), JB);
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
    const W* w2 = static_cast<const W*>(G.w2);
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

// x [T, H]; w13 [E, 2I, H] packed in parts of I rows; w2 [E, H, I] packed (part H); topk_weights [T, k] fp32; topk_ids [T, k] int64;
// shared_gate_up [2Is, H] (parts of Is) and shared_down [H, Is] (part H) optional (an empty tensor = none). E may be 0 (dense MLP).
torch::Tensor moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor topk_weights,
                  torch::Tensor topk_ids, torch::Tensor shared_gate_up, torch::Tensor shared_down) {
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
        TORCH_CHECK(e >= 0 && e < E, "moe: expert id ", e, " out of range [0, ", E, ")");
        if (group_of[e] < 0) {
          group_of[e] = groups.size();
          Group G;
          G.w13 = static_cast<const char*>(w13.data_ptr()) + e * w13.stride(0) * es;
          G.w2 = static_cast<const char*>(w2.data_ptr()) + e * w2.stride(0) * es;
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
      run_groups<bf16>(x.data_ptr<float>(), x.stride(0), H, groups, inter.data(), part.data());
    else
      run_groups<float>(x.data_ptr<float>(), x.stride(0), H, groups, inter.data(), part.data());
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
      typedef int32_t i16v __attribute__((vector_size(64)));
      v16 mx = v16{} - std::numeric_limits<float>::infinity();
      i16v nan{};
      int64_t i = 0;
      for (; i + 16 <= V; i += 16) {
        const v16 v = load(row + i);
        mx = v > mx ? v : mx;
        nan |= v != v;
      }
      bool any_nan = false;
      float m = mx[0];
      for (int j = 0; j < 16; ++j) {
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
template <typename W>
void screened_argmax_impl(const torch::Tensor& x, const int8_t* qp, const float* sp, const float* cp,
                          const W* wp, int64_t V, int64_t* out) {
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
  const int mb = cdiv(M, BM), pp = panels_per_item(int64_t(P) * mb, 16), nb = cdiv(P, pp);
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
        const float v = logits[j];
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
                              torch::Tensor lm_head) {
  check_act(x, "x", 2);
  check_weight(lm_head, "lm_head");
  const int64_t V = lm_head.size(0), K = lm_head.size(1);
  TORCH_CHECK(x.size(1) == K && q.scalar_type() == at::kChar && q.sizes() == lm_head.sizes() &&
                  scale.numel() == V && bound.numel() == V,
              "screened_argmax: x ", x.sizes(), ", screen ", q.sizes(), " and lm_head ", lm_head.sizes(),
              " do not match");
  if (x.stride(1) != 1) x = x.contiguous();
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.size(0) == 0) return out;
  const float *sp = scale.data_ptr<float>(), *cp = bound.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  if (lm_head.scalar_type() == at::kBFloat16)
    screened_argmax_impl(x, qp, sp, cp, reinterpret_cast<const bf16*>(lm_head.data_ptr()), V, out.data_ptr<int64_t>());
  else
    screened_argmax_impl(x, qp, sp, cp, lm_head.data_ptr<float>(), V, out.data_ptr<int64_t>());
  return out;
}

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

constexpr int QB = 16;  // queries per work item

struct QueryRun {
  int seq, head, q0, q1;  // rows [q0, q1) of q
};

// out_gi = sum_u s[gi][u] v_u for the g query heads, accumulators in registers (ND = d / 16 vectors).
template <int ND>
void weighted_sum(const float* sc, int L, int g, const float* const* vp, int d, float* out, int64_t out_head) {
  for (int gi = 0; gi < g; ++gi) {
    const float* s = sc + size_t(gi) * L;
    v16 acc[ND];
#pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) acc[c] = v16{};
    for (int u = 0; u < L; ++u) {
      const float w = s[u];
#pragma GCC unroll 8
      for (int c = 0; c < ND; ++c) acc[c] += w * load(vp[u] + 16 * c);
    }
#pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) store(out + gi * out_head + 16 * c, acc[c]);
  }
}

// One query position against L keys (row pointers kp/vp, oldest first), for the g query heads at q (heads
// d apart); writes the g output heads at out (out_head apart).
void attend_query(const float* q, int g, int d, float scale, const float* const* kp, const float* const* vp, int L,
                  float* out, int64_t out_head, std::vector<float>& sc) {
  sc.resize(size_t(g) * L);
  int j = 0;
  if (d % 16 == 0) {  // scores 16 keys at a time through the sixteen-way reduction
    for (; j + 16 <= L; j += 16) {
      for (int gi = 0; gi < g; ++gi) {
        const float* qr = q + gi * d;
        v16 a[16];
        for (int u = 0; u < 16; ++u) a[u] = v16{};
        for (int c = 0; c < d; c += 16) {
          const v16 qv = load(qr + c);
#pragma GCC unroll 16
          for (int u = 0; u < 16; ++u) a[u] += qv * load(kp[j + u] + c);
        }
        store(sc.data() + size_t(gi) * L + j, reduce16(a) * scale);
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
  switch (d) {
    case 64: return weighted_sum<4>(sc.data(), L, g, vp, d, out, out_head);
    case 128: return weighted_sum<8>(sc.data(), L, g, vp, d, out, out_head);
    default:
      for (int gi = 0; gi < g; ++gi) {
        float* o = out + gi * out_head;
        std::fill(o, o + d, 0.0f);
        for (int u = 0; u < L; ++u) axpy(sc[size_t(gi) * L + u], vp[u], o, d);
      }
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

// ---------------------------------------------------------------------------------------------------------
// Whole decoder layers from C++: the ops above in sequence with no Python in between (at batch 1, the
// Python dispatch between ~10 ops per layer costs as much as some of the ops).

struct Layer {
  // attention
  torch::Tensor input_norm, post_norm, qkv, o, q_norm, k_norm;
  // MLP: a MoE block (router defined) with an optional shared expert, or a dense MLP in shared_*
  torch::Tensor router, bias, w13, w2, shared_gate_up, shared_down;
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
double stage_ns[8];
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
  auto qkv = EXA_STAGE(1, linear_op(xn, L.qkv));
  auto q = qkv.narrow(1, 0, qd).view({T, L.nq, L.d});
  auto k = qkv.narrow(1, qd, kd).view({T, L.nkv, L.d});
  auto v = qkv.narrow(1, qd + kd, kd).view({T, L.nkv, L.d});
  auto qk = EXA_STAGE(2, qk_norm_rope(q, k, L.q_norm, L.k_norm, L.eps, in.positions, in.cos, in.sin, L.use_rope));
  auto o = EXA_STAGE(3, attention(L, qk[0], qk[1], v, in));
  auto hs = EXA_STAGE(4, add_rms_norm(linear_op(o.view({T, qd}), L.o), x, L.post_norm, L.eps));  // {normed, residual}
  torch::Tensor mlp;
  if (L.router.defined()) {
    auto r = EXA_STAGE(5, moe_route(hs[0], L.router, L.bias, L.top_k, L.n_group, L.topk_group, L.norm_topk_prob,
                                    L.scaling));
    mlp = EXA_STAGE(6, moe(hs[0], L.w13, L.w2, r[0], r[1], or_none(L.shared_gate_up), or_none(L.shared_down)));
  } else {
    mlp = EXA_STAGE(6, moe(hs[0], none(), none(), none(), none(), L.shared_gate_up, L.shared_down));
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
// [R]); with no Python between these ops, a decode step at batch 1 runs ~0.3 ms less Python.
// `screen`: the lm_head's argmax screen (argmax_screen), or empty to compute every logit.
torch::Tensor rows_step(const std::vector<const Layer*>& layers, torch::Tensor embed, torch::Tensor ids,
                        const StepInputs& in, torch::Tensor norm, double eps, torch::Tensor lm_head,
                        torch::Tensor rows, bool argmax, const std::vector<torch::Tensor>& screen) {
  auto x = forward_layers(layers, embed_rows(embed, ids), in);
  auto h = rms_norm(x.index_select(0, rows.to(at::kLong)), norm, eps);
  if (argmax && screen.size() == 3) return screened_argmax(h, screen[0], screen[1], screen[2], lm_head);
  return argmax ? argmax_rows(linear_op(h, lm_head)) : linear_op(h, lm_head);
}

}  // namespace

// Entry points that compute release the GIL: the HTTP thread can serialise tokens meanwhile.
#ifdef EXA_HOLD_GIL
#define EXA_COMPUTE_GUARD
#else
#define EXA_COMPUTE_GUARD , py::call_guard<py::gil_scoped_release>()
#endif
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "packed copy of a weight [..., N, K] in parts of `part` rows");
  m.def("linear", &linear_op, "x [M, K] fp32 @ w [N, K] (packed, fp32 or bf16)^T -> [M, N] fp32" EXA_COMPUTE_GUARD);
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
  m.def("stage_ns", [] { return std::vector<double>(stage_ns, stage_ns + 8); });
#endif
  m.def("rows_step", &rows_step, "embedding, layers, norm, lm_head of `rows` (and argmax)" EXA_COMPUTE_GUARD);
  m.def("embed_rows", &embed_rows);
  m.def("forward_layers", &forward_layers, "decoder layers in sequence; returns the residual stream after them" EXA_COMPUTE_GUARD);
}
