// Vector helpers: GCC vector types (16 floats = one AVX-512 register; split by the compiler on narrower ISAs),
// loads that widen bf16 / int8 to fp32, horizontal sums, dot / axpy, a vectorised e^x, exp-sum and silu * mul.
// x86 intrinsics are used only on x86-64 with AVX-512 (the int8 load); elsewhere the generic code below.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

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
  // AVX-512 on x86-64 only: GCC scalarises the generic conversion below: two instructions instead of ~50
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__AVX512F__)
  return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  typedef int8_t c16 __attribute__((vector_size(16)));
  c16 c;
  std::memcpy(&c, p, sizeof c);
  return __builtin_convertvector(c, v16);
#endif
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

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

}  // namespace
