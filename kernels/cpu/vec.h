// Vector helpers in GCC vector types of the machine's own width (vf: VL floats, 8 with AVX2, 16 with AVX-512):
// loads and stores, bf16 -> fp32, horizontal sums, dot / axpy, a vectorised e^x, exp-sum and silu * mul.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef float v2 __attribute__((vector_size(8)));

using bf16 = uint16_t;

// The machine's own vector width, for kernels that keep many vectors live (GEMM tiles, attention scores):
// v16 is two registers with AVX2, and sixteen live v16 spill its sixteen registers on every step.
#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));

inline vf loadv(const float* p) {
  vf r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline float scalar(float x) { return x; }
inline float scalar(bf16 h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
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

// Eight horizontal sums at once (reduce16's pattern for 8-lane vectors).
inline v8 reduce8(const v8* a) {
  v8 r1[4], r2[2];
  for (int i = 0; i < 4; ++i)
    r1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    r2[i] = __builtin_shufflevector(r1[2 * i], r1[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
            __builtin_shufflevector(r1[2 * i], r1[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(r2[0], r2[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(r2[0], r2[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

// Lane i of the result: the sum of a[i]'s lanes, for VL vectors of the native width.
inline vf reduce_lanes(const vf* a) {
#if defined(__AVX512F__)
  return reduce16(a);
#else
  return reduce8(a);
#endif
}

// The helpers below work in the native width vf (a v16 is two registers with AVX2, and GCC moves such vectors
// through the stack: a 16-lane dot product ran ~10x slower than this one on a Zen 3 host).
inline float hsumv(vf v) {
  float s = 0;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

inline float dot(const float* a, const float* b, int n) {
  vf acc0{}, acc1{};  // two chains: the FMA latency, not its throughput, bounds one
  int i = 0;
  for (; i + 2 * VL <= n; i += 2 * VL) {
    acc0 += loadv(a + i) * loadv(b + i);
    acc1 += loadv(a + i + VL) * loadv(b + i + VL);
  }
  for (; i + VL <= n; i += VL) acc0 += loadv(a + i) * loadv(b + i);
  float s = hsumv(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int n) {  // y += a * x
  int i = 0;
  for (; i + VL <= n; i += VL) storev(y + i, loadv(y + i) + a * loadv(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

// e^x per lane: 2^n * e^r with n = round(x / ln2), |r| <= ln2/2, degree-6 Taylor for e^r (relative error
// ~2e-7); inputs clamped to the normal fp32 range (e^-87.3 ~ 1e-38 stands in for 0).
inline vf vexp(vf x) {
  const vf lo = vf{} - 87.3f, hi = vf{} + 88.7f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  vf p = vf{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// y[i] = e^(x[i] - shift) for n values (in place allowed); returns their sum.
inline float exp_sum(const float* x, float shift, float* y, int n) {
  vf acc{};
  int i = 0;
  for (; i + VL <= n; i += VL) {
    const vf e = vexp(loadv(x + i) - shift);
    storev(y + i, e);
    acc += e;
  }
  float s = hsumv(acc);
  if (i < n) {
    float buf[VL] = {0};
    std::memcpy(buf, x + i, (n - i) * sizeof(float));
    const vf e = vexp(loadv(buf) - shift);
    storev(buf, e);
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
  for (; i + VL <= n; i += VL) {
    const vf g = loadv(gate + i);
    storev(out + i, g / (1.0f + vexp(-g)) * loadv(up + i));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace
