// Element-wise passes over one row of a logits block, for kernels/cpu/token_logprobs.cpp: AVX-512
// versions (compiled with function target attributes, chosen at run time with __builtin_cpu_supports,
// so the library needs no -march flag) and scalar C++ ones for other CPUs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTETO_X86 1
#define FASTETO_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#else
#define FASTETO_X86 0
#endif

namespace fasteto_native::vec {

#if FASTETO_X86
// exp(x): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for exactness), e^r by its degree-7
// Taylor polynomial (truncation below 1e-8 relative), then scalef multiplies by 2^n, which underflows
// to 0 and overflows to inf as exp does. The lower clamp keeps n finite; NaN passes through (max/min
// return their second operand when either is NaN).
FASTETO_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

FASTETO_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// Horizontal max / sum through memory: GCC 12's _mm512_reduce_*_ps trip -Wuninitialized in its header.
FASTETO_AVX512 inline float lanes_max(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  return *std::max_element(lanes, lanes + 16);
}

FASTETO_AVX512 inline float lanes_sum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float total = 0.f;
  for (float x : lanes) total += x;
  return total;
}

// x += b (b may be null); returns max(x).
FASTETO_AVX512 inline float add_bias_max_avx512(float* x, const float* b, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    __m512 v = _mm512_maskz_loadu_ps(k, x + j);
    if (b != nullptr) {
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, b + j));
      _mm512_mask_storeu_ps(x + j, k, v);
    }
    best = _mm512_mask_max_ps(best, k, v, best);
  }
  // The max may drop a NaN; the sum of exp that follows carries it into the log-sum-exp.
  return lanes_max(best);
}

// sum(exp(x - shift))
FASTETO_AVX512 inline float sum_exp_avx512(const float* x, int64_t n, float shift) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), s));
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return lanes_sum(acc);
}

// Round-to-nearest-even float -> bfloat16 bits (quiet NaN kept), as c10::BFloat16 does.
FASTETO_AVX512 inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <typename scalar_t>
FASTETO_AVX512 inline __m256i to_half(__m512 v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return to_bf16(v);
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// out[j] = x[j] in scalar_t (bfloat16 or float16)
template <typename scalar_t>
FASTETO_AVX512 inline void convert_avx512(const float* x, int64_t n, scalar_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m256i h = to_half<scalar_t>(_mm512_maskz_loadu_ps(k, x + j));
    _mm256_mask_storeu_epi16(static_cast<void*>(out + j), k, h);
  }
}

// x = neg_scale * exp(x + b - lse) in place; gb += x; half != null: half[j] = x[j] in scalar_t.
template <typename scalar_t>
FASTETO_AVX512 inline void softmax_grad_avx512(float* x, const float* b, int64_t n, float lse,
                                               float neg_scale, float* gb, scalar_t* half) {
  const __m512 l = _mm512_set1_ps(lse), c = _mm512_set1_ps(neg_scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    __m512 v = _mm512_maskz_loadu_ps(k, x + j);
    if (b != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, b + j));
    v = _mm512_mul_ps(c, exp16(_mm512_sub_ps(v, l)));
    _mm512_mask_storeu_ps(x + j, k, v);
    if (gb != nullptr) _mm512_mask_storeu_ps(gb + j, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, gb + j), v));
    if constexpr (!std::is_same_v<scalar_t, float>) {
      _mm256_mask_storeu_epi16(static_cast<void*>(half + j), k, to_half<scalar_t>(v));
    }
  }
}

inline const bool kAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
inline const bool kAvx512 = false;
#endif

inline float add_bias_max(float* x, const float* b, int64_t n) {
#if FASTETO_X86
  if (kAvx512) return add_bias_max_avx512(x, b, n);
#endif
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (b != nullptr) x[j] += b[j];
    if (!(x[j] <= best)) best = x[j];  // NaN wins
  }
  return best;
}

inline float sum_exp(const float* x, int64_t n, float shift) {
#if FASTETO_X86
  if (kAvx512) return sum_exp_avx512(x, n, shift);
#endif
  float acc = 0.f;
  for (int64_t j = 0; j < n; ++j) acc += std::exp(x[j] - shift);
  return acc;
}

template <typename scalar_t>
inline void softmax_grad(float* x, const float* b, int64_t n, float lse, float neg_scale, float* gb,
                         scalar_t* half) {
#if FASTETO_X86
  if (kAvx512) return softmax_grad_avx512<scalar_t>(x, b, n, lse, neg_scale, gb, half);
#endif
  for (int64_t j = 0; j < n; ++j) {
    x[j] = neg_scale * std::exp(x[j] + (b != nullptr ? b[j] : 0.f) - lse);
    if (gb != nullptr) gb[j] += x[j];
    if constexpr (!std::is_same_v<scalar_t, float>) half[j] = scalar_t(x[j]);
  }
}

template <typename scalar_t>
inline void convert(const float* x, int64_t n, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(x, x + n, out);
  } else {
#if FASTETO_X86
    if (kAvx512) return convert_avx512<scalar_t>(x, n, out);
#endif
    for (int64_t j = 0; j < n; ++j) out[j] = scalar_t(x[j]);
  }
}

}  // namespace fasteto_native::vec
