// Decode attention over per-row KV slots, for the continuous engine (fasteto/rollout/slot_kv.py).
//
// Each decoding row r has one new token; its G query heads per kv head attend to the first lengths[r]
// positions of its slot slots[r]:
//
//   query [R, H_kv, G, D], keys / values [S, H_kv, C, D] (contiguous), slots / lengths [R] int64
//   out[r, h, g] = softmax_j(scale * q[r, h, g] . k[slots[r], h, j]) @ v[slots[r], h, :lengths[r]]
//
// One task per (row, kv head), shared out among torch's threads. A task reads its keys once (G dot
// products per position into a float32 score buffer), turns the scores into probabilities in place
// (max, exp, sum), then reads its values once, accumulating the G outputs in float32. So each slot
// position is read exactly once per layer, however many query heads share it, and no row reads
// positions past its own length (the padded batch of torch's SDPA reads up to the longest row).
// Half-precision keys and values are widened to float32 (once per block of positions, for all G heads);
// output is written in the query's dtype. Paths, chosen at run time:
// - D = 64 or 128 with AVX-512: positions in blocks, 16 scores per query head summed by one 16 x 16
//   transpose-and-add instead of 16 horizontal sums; with AVX-512 BF16 and bf16 inputs the scores come
//   from vdpbf16ps straight off the bf16 keys (exact products, float32 sums);
// - other D that are multiples of 16 (at most 256) with AVX-512: one horizontal sum per score;
// - anything else: scalar C++.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "token_logprobs_vec.h"

namespace fasteto_native {
namespace {

using vec::kAvx512;

template <typename scalar_t>
inline float widen(scalar_t x) {
  return static_cast<float>(x);
}

// probabilities in place: p = exp(s - max(s)); returns sum(p)
inline float softmax_unnormalised(float* s, int64_t n) {
  const float top = vec::add_bias_max(s, nullptr, n);
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - top);
    total += s[j];
  }
  return total;
}

// One (row, kv head) task, scalar: q [G, D] float32, k / v [L, D], out [G, D] float32.
template <typename scalar_t>
void task_scalar(const float* q, const scalar_t* k, const scalar_t* v, int64_t groups, int64_t length,
                 int64_t dim, float scale, float* scores, float* out) {
  for (int64_t j = 0; j < length; ++j) {
    for (int64_t g = 0; g < groups; ++g) {
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += q[g * dim + d] * widen(k[j * dim + d]);
      scores[g * length + j] = scale * dot;
    }
  }
  std::fill(out, out + groups * dim, 0.f);
  for (int64_t g = 0; g < groups; ++g) {
    float* p = scores + g * length;
    const float inv = 1.f / softmax_unnormalised(p, length);
    for (int64_t j = 0; j < length; ++j) {
      for (int64_t d = 0; d < dim; ++d) out[g * dim + d] += p[j] * widen(v[j * dim + d]);
    }
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] *= inv;
  }
}

#if FASTETO_X86
constexpr int64_t kMaxChunks = 16;  // D <= 256

template <typename scalar_t>
FASTETO_AVX512 inline __m512 load16(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_loadu_ps(x);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
}

FASTETO_AVX512 inline float hsum(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

// p = exp(s - max(s)) in place; returns sum(p)
FASTETO_AVX512 inline float softmax_unnormalised_avx512(float* s, int64_t n) {
  const __m512 top = _mm512_set1_ps(vec::add_bias_max(s, nullptr, n));
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = vec::tail_mask(n - j);
    const __m512 e = vec::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top));
    _mm512_mask_storeu_ps(s + j, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  return hsum(acc);
}

// Positions [j0, j0 + n) of x [*, dim] as float32: x itself for float32, else widened into buf [n * dim].
template <typename scalar_t>
FASTETO_AVX512 inline const float* widened(const scalar_t* x, int64_t n, int64_t dim, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n * dim; i += 16) _mm512_storeu_ps(buf + i, load16(x + i));
    return buf;
  }
}

// Lane i of the result is the sum of a[i]'s 16 lanes: a 16 x 16 transpose-and-add in 45 shuffles and adds,
// against 16 horizontal sums of 8 steps each.
FASTETO_AVX512 inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sum for 4 sources
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i) {  // 128-bit lanes: [c0 L0+L1, c0 L2+L3, c1 L0+L1, c1 L2+L3]
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// Scores of 16 positions at a time per query head: one accumulator per position, then one reduce16. The
// block's keys are widened once for all G heads.
template <int64_t kChunks, typename scalar_t>
FASTETO_AVX512 void scores_blocked(const float* q, const scalar_t* k, int64_t groups, int64_t length, float scale,
                                   float* scores) {
  constexpr int64_t dim = kChunks * 16;
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < length; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, length - j0);
    float buf[16 * dim];
    const float* kb = widened(k + j0 * dim, n, dim, buf);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 qg[kChunks];
      for (int64_t c = 0; c < kChunks; ++c) qg[c] = _mm512_loadu_ps(q + g * dim + c * 16);
      __m512 acc[16];
      for (int64_t i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
        if (i < n) {
          for (int64_t c = 0; c < kChunks; ++c) {
            acc[i] = _mm512_fmadd_ps(qg[c], _mm512_loadu_ps(kb + i * dim + c * 16), acc[i]);
          }
        }
      }
      _mm512_mask_storeu_ps(scores + g * length + j0, vec::tail_mask(n), _mm512_mul_ps(s, reduce16(acc)));
    }
  }
}

// out[g] = inv[g] * sum_j p[g, j] v[j], values read in blocks of 32 positions (widened once, kept in L1 for
// the G heads),
// the G outputs accumulated in registers, two accumulator sets to hide the FMA latency.
template <int64_t kChunks, typename scalar_t>
FASTETO_AVX512 void values_blocked(const float* p, const scalar_t* v, int64_t groups, int64_t length,
                                   const float* inv, float* out) {
  constexpr int64_t dim = kChunks * 16, kBlock = 32;
  std::fill(out, out + groups * dim, 0.f);
  float buf[kBlock * dim];
  for (int64_t j0 = 0; j0 < length; j0 += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, length - j0);
    const float* vb = widened(v + j0 * dim, n, dim, buf);
    for (int64_t g = 0; g < groups; ++g) {
      const float* pg = p + g * length + j0;
      __m512 even[kChunks], odd[kChunks];
      for (int64_t c = 0; c < kChunks; ++c) {
        even[c] = _mm512_loadu_ps(out + g * dim + c * 16);
        odd[c] = _mm512_setzero_ps();
      }
      int64_t j = 0;
      for (; j + 1 < n; j += 2) {
        const __m512 p0 = _mm512_set1_ps(pg[j]), p1 = _mm512_set1_ps(pg[j + 1]);
        for (int64_t c = 0; c < kChunks; ++c) {
          even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(vb + j * dim + c * 16), even[c]);
          odd[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(vb + (j + 1) * dim + c * 16), odd[c]);
        }
      }
      if (j < n) {
        const __m512 p0 = _mm512_set1_ps(pg[j]);
        for (int64_t c = 0; c < kChunks; ++c) {
          even[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(vb + j * dim + c * 16), even[c]);
        }
      }
      for (int64_t c = 0; c < kChunks; ++c) _mm512_storeu_ps(out + g * dim + c * 16, _mm512_add_ps(even[c], odd[c]));
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    for (int64_t c = 0; c < kChunks; ++c) {
      float* o = out + g * dim + c * 16;
      _mm512_storeu_ps(o, _mm512_mul_ps(s, _mm512_loadu_ps(o)));
    }
  }
}

#define FASTETO_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
const bool kAvx512Bf16 = kAvx512 && __builtin_cpu_supports("avx512bf16");

// scores_blocked for bf16 queries and keys on CPUs with AVX-512 BF16: vdpbf16ps multiplies 32 bf16 pairs
// (exact products) into 16 float32 sums, so keys are neither widened nor converted.
template <int64_t kChunks>
FASTETO_AVX512_BF16 void scores_bf16(const c10::BFloat16* q, const c10::BFloat16* k, int64_t groups,
                                     int64_t length, float scale, float* scores) {
  constexpr int64_t dim = kChunks * 16, kPairs = kChunks / 2;
  static_assert(kChunks % 2 == 0, "D must be a multiple of 32");
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < length; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, length - j0);
    for (int64_t g = 0; g < groups; ++g) {
      __m512bh qg[kPairs];
      for (int64_t c = 0; c < kPairs; ++c) qg[c] = (__m512bh)_mm512_loadu_si512(q + g * dim + c * 32);
      __m512 acc[16];
      for (int64_t i = 0; i < 16; ++i) {
        acc[i] = _mm512_setzero_ps();
        if (i < n) {
          for (int64_t c = 0; c < kPairs; ++c) {
            acc[i] = _mm512_dpbf16_ps(acc[i], qg[c], (__m512bh)_mm512_loadu_si512(k + (j0 + i) * dim + c * 32));
          }
        }
      }
      _mm512_mask_storeu_ps(scores + g * length + j0, vec::tail_mask(n), _mm512_mul_ps(s, reduce16(acc)));
    }
  }
}

// One (row, kv head) task with D = 16 * kChunks fixed at compile time (64 and 128: the common head sizes).
// q: the query widened to float32, q_raw: as given.
template <int64_t kChunks, typename scalar_t>
FASTETO_AVX512 void task_blocked(const float* q, const scalar_t* q_raw, const scalar_t* k, const scalar_t* v,
                                 int64_t groups, int64_t length, float scale, float* scores, float* inv,
                                 float* out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (kAvx512Bf16) {
      scores_bf16<kChunks>(q_raw, k, groups, length, scale, scores);
    } else {
      scores_blocked<kChunks>(q, k, groups, length, scale, scores);
    }
  } else {
    scores_blocked<kChunks>(q, k, groups, length, scale, scores);
  }
  for (int64_t g = 0; g < groups; ++g) inv[g] = 1.f / softmax_unnormalised_avx512(scores + g * length, length);
  values_blocked<kChunks>(scores, v, groups, length, inv, out);
}

// Any D that is a multiple of 16 (at most 256): one horizontal sum per position and query head.
template <typename scalar_t>
FASTETO_AVX512 void task_avx512(const float* q, const scalar_t* q_raw, const scalar_t* k, const scalar_t* v,
                                int64_t groups, int64_t length, int64_t dim, float scale, float* scores,
                                float* inv, float* out) {
  if (dim == 64) return task_blocked<4>(q, q_raw, k, v, groups, length, scale, scores, inv, out);
  if (dim == 128) return task_blocked<8>(q, q_raw, k, v, groups, length, scale, scores, inv, out);
  const int64_t chunks = dim / 16;
  for (int64_t j = 0; j < length; ++j) {
    __m512 kj[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) kj[c] = load16(k + j * dim + c * 16);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * dim), kj[0]);
      for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * dim + c * 16), kj[c], acc);
      scores[g * length + j] = scale * hsum(acc);
    }
  }
  for (int64_t g = 0; g < groups; ++g) inv[g] = 1.f / softmax_unnormalised_avx512(scores + g * length, length);
  std::fill(out, out + groups * dim, 0.f);
  for (int64_t j = 0; j < length; ++j) {
    __m512 vj[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) vj[c] = load16(v + j * dim + c * 16);
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * length + j]);
      for (int64_t c = 0; c < chunks; ++c) {
        float* o = out + g * dim + c * 16;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(p, vj[c], _mm512_loadu_ps(o)));
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    for (int64_t c = 0; c < chunks; ++c) {
      float* o = out + g * dim + c * 16;
      _mm512_storeu_ps(o, _mm512_mul_ps(s, _mm512_loadu_ps(o)));
    }
  }
}
#endif

template <typename scalar_t>
void run(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const int64_t* slots,
         const int64_t* lengths, float scale, at::Tensor& out) {
  const int64_t rows = query.size(0), kv_heads = query.size(1), groups = query.size(2), dim = query.size(3);
  const int64_t capacity = keys.size(2);
  const int64_t longest = rows ? *std::max_element(lengths, lengths + rows) : 0;
  const scalar_t* q_all = query.const_data_ptr<scalar_t>();
  const scalar_t* k_all = keys.const_data_ptr<scalar_t>();
  const scalar_t* v_all = values.const_data_ptr<scalar_t>();
  scalar_t* o_all = out.data_ptr<scalar_t>();
  [[maybe_unused]] const bool simd = kAvx512 && dim % 16 == 0 && dim <= 256;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(groups * longest), q(groups * dim), o(groups * dim), inv(groups);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / kv_heads, h = t % kv_heads;
      const int64_t offset = (slots[r] * kv_heads + h) * capacity * dim;
      const scalar_t* qt = q_all + t * groups * dim;
      for (int64_t i = 0; i < groups * dim; ++i) q[i] = widen(qt[i]);
#if FASTETO_X86
      if (simd) {
        task_avx512(q.data(), qt, k_all + offset, v_all + offset, groups, lengths[r], dim, scale, scores.data(),
                    inv.data(), o.data());
      } else
#endif
      {
        task_scalar(q.data(), k_all + offset, v_all + offset, groups, lengths[r], dim, scale, scores.data(),
                    o.data());
      }
      scalar_t* ot = o_all + t * groups * dim;
      for (int64_t i = 0; i < groups * dim; ++i) ot[i] = static_cast<scalar_t>(o[i]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "decode_attention: query [R, H_kv, G, D], keys and values [S, H_kv, C, D]; got ", query.sizes(),
              ", ", keys.sizes(), ", ", values.sizes());
  TORCH_CHECK(query.size(1) == keys.size(1) && query.size(3) == keys.size(3),
              "decode_attention: query and keys disagree on H_kv or D: ", query.sizes(), " vs ", keys.sizes());
  TORCH_CHECK(query.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type(),
              "decode_attention: query, keys and values must share a dtype");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "decode_attention: keys and values must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && slots.dim() == 1 &&
                  lengths.dim() == 1 && slots.size(0) == query.size(0) && lengths.size(0) == query.size(0),
              "decode_attention: slots and lengths must be int64 [R]");
  const at::Tensor q = query.contiguous(), s = slots.contiguous(), n = lengths.contiguous();
  const int64_t* sp = s.const_data_ptr<int64_t>();
  const int64_t* np = n.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r) {
    TORCH_CHECK(sp[r] >= 0 && sp[r] < keys.size(0), "decode_attention: row ", r, " names slot ", sp[r], " of ",
                keys.size(0));
    TORCH_CHECK(np[r] >= 1 && np[r] <= keys.size(2), "decode_attention: row ", r, " has length ", np[r],
                ", outside 1..", keys.size(2));
  }
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "decode_attention: float64 is not supported (float32, bfloat16, float16)");
    } else {
      run<scalar_t>(q, keys, values, sp, np, static_cast<float>(scale), out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fasteto_native, m) {
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor slots, Tensor lengths, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fasteto_native, CPU, m) { m.impl("decode_attention", &decode_attention); }

}  // namespace fasteto_native
