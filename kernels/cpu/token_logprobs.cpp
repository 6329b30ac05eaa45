// Fused per-token log-probs on CPU: log_softmax((hidden @ weight.T + bias) / T)[targets], forward and
// backward, without materialising the [rows, vocab] logits.
//
// Layout of the work. The vocab is cut into tiles of `tile` ids, shared out among the threads
// (at::parallel_for), so every thread reads a disjoint slice of the weight and a few rows or a huge
// vocab both keep every core busy. Rows go in passes (all rows, unless the per-thread grad_hidden below
// would pass 8 MiB); in a pass each thread takes each of its tiles through all the pass's rows, `chunk`
// rows at a time, so the tile's weight rows and grad_weight rows stay in its L2 while the rows stream
// by. Per chunk, one single-threaded GEMM gives a [chunk, tile] float32 block of logits, reduced while
// it is in cache:
//   forward:  per row, the block's max and sum of exp, merged into the thread's running (max, sum);
//             the threads' partial results are merged per row after the pass;
//   backward: the block becomes d logp / d logits = scale * (onehot(target) - softmax) in place, and two
//             more GEMMs add it into the tile's grad_weight rows (this thread's own: no race) and into
//             the thread's private float32 grad_hidden for the pass (summed over threads after it).
// Extra memory: per thread one [chunk, tile] float32 block (plus its half-precision copy) and a
// [pass, D] float32 grad_hidden; half-precision weights add, with one pass, a float32 [tile, D] sum per
// thread (written out in the weight's dtype as each tile completes), with several a float32 [V, D]
// accumulator, as in the chunked PyTorch backend.
//
// GEMMs: the MKL that torch's CPU build links (found in libtorch_cpu with dlsym): sgemm_ for float32,
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 for bfloat16 / float16, which multiply in half
// precision (AMX or AVX512-BF16 where the CPU has them) and accumulate and write float32, so the logits
// are never rounded to the input dtype. ATen's own at::mm cannot write float32 from bfloat16 inputs, and
// called per tile it costs a dispatch each time. A torch without these symbols makes the backend
// unavailable (`missing()` says why); there is no other GEMM path.
// Element-wise passes (token_logprobs_vec.h): AVX-512 (chosen at run time) or scalar C++.

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "token_logprobs_vec.h"

namespace fasteto_native {
namespace {

// ---------------------------------------------------------------------------------------------- BLAS

using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*, const int*);
using HalfGemm = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float,
                          float*, int);
using SetThreads = int (*)(int);

struct Blas {
  Sgemm sgemm = nullptr;
  HalfGemm bf16 = nullptr;  // MKL_BF16 is uint16_t, the bits of c10::BFloat16
  HalfGemm f16 = nullptr;   // MKL_F16 is uint16_t, the bits of c10::Half
  SetThreads set_local_threads = nullptr;
  bool amx = false;         // this process may use AMX tiles
  std::string missing;      // empty when every symbol was found
};

const Blas& blas() {
  static const Blas found = [] {
    Blas b;
    Dl_info info{};
    // Any function of libtorch_cpu locates the library (and with it the MKL torch was built with).
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) == 0 || info.dli_fname == nullptr) {
      b.missing = "could not locate libtorch_cpu (dladdr failed)";
      return b;
    }
    void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) {
      b.missing = std::string("could not reopen ") + info.dli_fname;
      return b;
    }
    b.sgemm = reinterpret_cast<Sgemm>(dlsym(lib, "sgemm_"));
    b.bf16 = reinterpret_cast<HalfGemm>(dlsym(lib, "cblas_gemm_bf16bf16f32"));
    b.f16 = reinterpret_cast<HalfGemm>(dlsym(lib, "cblas_gemm_f16f16f32"));
    b.set_local_threads = reinterpret_cast<SetThreads>(dlsym(lib, "MKL_Set_Num_Threads_Local"));
    std::string absent;
    for (auto [name, ptr] : {std::pair<const char*, void*>{"sgemm_", (void*)b.sgemm},
                             {"cblas_gemm_bf16bf16f32", (void*)b.bf16},
                             {"cblas_gemm_f16f16f32", (void*)b.f16},
                             {"MKL_Set_Num_Threads_Local", (void*)b.set_local_threads}}) {
      if (ptr == nullptr) absent += (absent.empty() ? "" : ", ") + std::string(name);
    }
    if (!absent.empty()) {
      b.missing = std::string(info.dli_fname) + " does not export " + absent +
                  " (this torch build has no MKL BLAS); use impl='torch'";
    }
    // Linux lets a process use AMX tiles only after asking (arch_prctl); torch asks before its own AMX
    // kernels, so ask here too rather than depend on which op ran first. Without AMX: false.
    b.amx = at::cpu::init_amx();
    return b;
  }();
  return found;
}

// MKL runs one thread inside our parallel region (each of our threads owns its own tiles).
struct OneBlasThread {
  int previous;
  OneBlasThread() : previous(blas().set_local_threads(1)) {}
  ~OneBlasThread() { blas().set_local_threads(previous); }
};

constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

int ld(int64_t v) { return static_cast<int>(std::max<int64_t>(v, 1)); }  // BLAS wants ld >= 1

// Column-major C[m, n] = alpha * op(A) op(B) + beta * C with float32 C; A and B in scalar_t.
template <typename scalar_t>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // D == 0: the product is empty
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[i + j * ldc] = beta == 0.f ? 0.f : beta * c[i + j * ldc];
    return;
  }
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k), la = ld(lda),
            lb = ld(ldb), lc = ld(ldc);
  if constexpr (std::is_same_v<scalar_t, float>) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    blas().sgemm(&tra, &trb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  } else {
    HalfGemm fn = std::is_same_v<scalar_t, c10::BFloat16> ? blas().bf16 : blas().f16;
    fn(kColMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, mi, ni, ki, alpha, a, la, b, lb, beta,
       c, lc);
  }
}

// Row-major views of the three products (ld of the block is `tile`).
// block[mc, vn] = alpha * h[mc, D] @ w[vn, D]^T
template <typename scalar_t>
void block_logits(const scalar_t* h, const scalar_t* w, int64_t mc, int64_t vn, int64_t dim, float alpha,
                  float* block, int64_t tile) {
  gemm<scalar_t>(true, false, vn, mc, dim, alpha, w, dim, h, dim, 0.f, block, tile);
}

// gw[vn, D] (+)= dl[mc, vn]^T @ h[mc, D]
template <typename scalar_t>
void block_grad_weight(const scalar_t* h, const scalar_t* dl, int64_t mc, int64_t vn, int64_t dim,
                       int64_t tile, float beta, float* gw) {
  gemm<scalar_t>(false, true, dim, vn, mc, 1.f, h, dim, dl, tile, beta, gw, dim);
}

// gh[mc, D] += dl[mc, vn] @ w[vn, D]
template <typename scalar_t>
void block_grad_hidden(const scalar_t* w, const scalar_t* dl, int64_t mc, int64_t vn, int64_t dim,
                       int64_t tile, float* gh) {
  gemm<scalar_t>(false, false, dim, mc, vn, 1.f, w, dim, dl, tile, 1.f, gh, dim);
}

// ------------------------------------------------------------------------------- element-wise passes

using vec::add_bias_max;
using vec::convert;
using vec::kAvx512;
using vec::softmax_grad;
using vec::sum_exp;

// ------------------------------------------------------------------------------------------- plan

struct Plan {
  int64_t rows, vocab, dim;
  int64_t pass;     // rows per pass: every pass sweeps the whole vocab once
  int64_t chunk;    // rows per GEMM inside a pass
  int64_t tile;     // vocab ids per tile (the block's leading dimension)
  int64_t tiles;
  int64_t threads;  // scratch slots
  bool nested;      // called inside a parallel region: run the tiles in this thread
};

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// A thread takes each of its tiles through all rows of a pass, chunk by chunk, so the tile's weight
// rows and grad_weight rows stay in its L2 while the rows stream by. chunk: the GEMM's [chunk, D]
// float32 grad_hidden slice is 512 KiB (16..1024 rows); tile: a [chunk, tile] float32 block of 512 KiB
// (64..2048 ids), at least one tile per thread when the vocab allows; pass: each thread's private
// [pass, D] float32 grad_hidden is at most 8 MiB, or `pass_rows` when the caller gives it.
Plan make_plan(int64_t rows, int64_t vocab, int64_t dim, int64_t pass_rows) {
  Plan p{rows, vocab, dim, 0, 0, 0, 0, 0, at::in_parallel_region()};
  p.threads = p.nested ? 1 : std::max(1, at::get_num_threads());
  const int64_t d = std::max<int64_t>(dim, 1);
  p.chunk = std::clamp<int64_t>((int64_t{1} << 17) / d, 16, 1024);
  p.pass = pass_rows > 0 ? pass_rows : std::max(p.chunk, (int64_t{1} << 21) / d);
  p.pass = std::max<int64_t>(1, std::min(rows, p.pass));
  p.chunk = std::min(p.chunk, p.pass);
  p.tile = std::clamp<int64_t>(round_up((int64_t{1} << 17) / p.chunk, 16), 64, 2048);
  p.tile = std::max<int64_t>(16, std::min(p.tile, round_up((vocab + p.threads - 1) / p.threads, 16)));
  p.tiles = (vocab + p.tile - 1) / p.tile;
  return p;
}

// fn(slot, first_tile, end_tile) over the threads (slot < plan.threads indexes per-thread scratch).
template <typename F>
void for_tiles(const Plan& p, const F& fn) {
  if (p.nested) {
    fn(0, 0, p.tiles);
    return;
  }
  at::parallel_for(0, p.tiles, 1, [&](int64_t t0, int64_t t1) {
    const int slot = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(slot < p.threads, "thread ", slot, " has no scratch slot");
    OneBlasThread one;
    fn(slot, t0, t1);
  });
}

// f(scalar_t{}) for the three supported dtypes (check_inputs has rejected the others).
template <typename F>
void dispatch(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "fasteto_native: unsupported dtype ", dtype);
  }
}

// ------------------------------------------------------------------------------------------ checks

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const std::optional<at::Tensor>& bias, double temperature, int64_t ignore_index) {
  TORCH_CHECK(blas().missing.empty(), "fasteto_native: ", blas().missing);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"hidden", &hidden},
                         {"weight", &weight}, {"targets", &targets}}) {
    TORCH_CHECK(t->device().is_cpu(), "fasteto_native: ", name, " must be a CPU tensor, got ", t->device());
  }
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fasteto_native: hidden must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(hidden.dim() == 2, "fasteto_native: hidden must be [M, D], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1,
              "fasteto_native: weight must be [V, D] with V >= 1 and hidden's D=", hidden.size(1),
              ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype, "fasteto_native: weight must have hidden's dtype ", dtype,
              ", got ", weight.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "fasteto_native: targets must be int64 [M] with M=", hidden.size(0), ", got ",
              targets.scalar_type(), " of shape ", targets.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == dtype && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                "fasteto_native: bias must be a CPU ", dtype, " tensor of shape [V=", weight.size(0),
                "], got ", bias->scalar_type(), " of shape ", bias->sizes(), " on ", bias->device());
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "fasteto_native: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(ignore_index < 0, "fasteto_native: ignore_index must be negative, got ", ignore_index);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(weight.size(0) <= kIntMax && hidden.size(1) <= kIntMax,
              "fasteto_native: V and D must fit in int32 for BLAS, got weight shape ", weight.sizes());
  const auto tgt = targets.contiguous();
  const int64_t* t = tgt.data_ptr<int64_t>();
  for (int64_t i = 0; i < tgt.numel(); ++i) {
    TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < weight.size(0)), "fasteto_native: targets[",
                i, "] = ", t[i], " is neither in [0, ", weight.size(0), ") nor ignore_index=", ignore_index);
  }
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == rows,
              "fasteto_native: ", name, " must be a CPU float32 [M] tensor with M=", rows, ", got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

// bias / T as float32 [V], or an undefined tensor.
at::Tensor scaled_bias(const std::optional<at::Tensor>& bias, float inv_t) {
  if (!bias.has_value()) return at::Tensor();
  at::Tensor b = bias->to(at::kFloat).contiguous().clone();
  float* p = b.data_ptr<float>();
  for (int64_t j = 0; j < b.numel(); ++j) p[j] *= inv_t;
  return b;
}

// ---------------------------------------------------------------------------------------- forward

// One pass over rows [r0, r0 + p.pass): every thread runs its tiles through the pass's rows, keeping a
// running (max, sum of exp) per row; the threads' partials are merged into lse and logp at the end.
template <typename scalar_t>
void forward_pass(const scalar_t* h, const scalar_t* w, const int64_t* targets, const float* bias,
                  float inv_t, const Plan& p, int64_t r0, float* block_base, float* mx, float* se,
                  float* picked, float* logp, float* lse) {
  const int64_t rows = std::min(p.pass, p.rows - r0);
  std::fill(mx, mx + p.threads * p.pass, -std::numeric_limits<float>::infinity());
  std::fill(se, se + p.threads * p.pass, 0.f);
  std::fill(picked, picked + p.pass, 0.f);
  for_tiles(p, [&](int slot, int64_t t0, int64_t t1) {
    float* block = block_base + slot * p.chunk * p.tile;
    float *m = mx + slot * p.pass, *s = se + slot * p.pass;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t v0 = t * p.tile, vn = std::min(p.tile, p.vocab - v0);
      for (int64_t c0 = 0; c0 < rows; c0 += p.chunk) {
        const int64_t mc = std::min(p.chunk, rows - c0);
        block_logits(h + (r0 + c0) * p.dim, w + v0 * p.dim, mc, vn, p.dim, inv_t, block, p.tile);
        for (int64_t r = c0; r < c0 + mc; ++r) {
          float* row = block + (r - c0) * p.tile;
          const float bmax = add_bias_max(row, bias != nullptr ? bias + v0 : nullptr, vn);
          const int64_t local = targets[r0 + r] - v0;
          if (local >= 0 && local < vn) picked[r] = row[local];  // exactly one tile holds the target
          const float bsum = sum_exp(row, vn, bmax);
          if (bmax > m[r]) {
            s[r] = s[r] * std::exp(m[r] - bmax) + bsum;
            m[r] = bmax;
          } else {
            s[r] += bsum * std::exp(bmax - m[r]);
          }
        }
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    float big = -std::numeric_limits<float>::infinity(), total = 0.f;
    for (int64_t k = 0; k < p.threads; ++k) big = std::max(big, mx[k * p.pass + r]);
    for (int64_t k = 0; k < p.threads; ++k) {
      if (se[k * p.pass + r] != 0.f) total += se[k * p.pass + r] * std::exp(mx[k * p.pass + r] - big);
    }
    lse[r0 + r] = big + std::log(total);
    logp[r0 + r] = targets[r0 + r] >= 0 ? picked[r] - lse[r0 + r] : 0.f;
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& hidden, const at::Tensor& weight, const int64_t* targets,
                  const float* bias, float inv_t, const Plan& p, float* logp, float* lse) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor blocks = at::empty({p.threads, p.chunk * p.tile}, f32);
  at::Tensor maxes = at::empty({p.threads, p.pass}, f32), sums = at::empty({p.threads, p.pass}, f32);
  at::Tensor picked = at::empty({p.pass}, f32);
  for (int64_t r0 = 0; r0 < p.rows; r0 += p.pass) {
    forward_pass<scalar_t>(hidden.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), targets,
                           bias, inv_t, p, r0, blocks.data_ptr<float>(), maxes.data_ptr<float>(),
                           sums.data_ptr<float>(), picked.data_ptr<float>(), logp, lse);
  }
}

std::tuple<at::Tensor, at::Tensor> token_logprobs(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                  const at::Tensor& targets_in,
                                                  const std::optional<at::Tensor>& bias, double temperature,
                                                  int64_t ignore_index, int64_t pass_rows) {
  check_inputs(hidden_in, weight_in, targets_in, bias, temperature, ignore_index);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const int64_t rows = hidden.size(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor logp = at::empty({rows}, f32), lse = at::empty({rows}, f32);
  if (rows == 0) return {logp, lse};
  const float inv_t = static_cast<float>(1.0 / temperature);
  const at::Tensor b = scaled_bias(bias, inv_t);
  const Plan plan = make_plan(rows, weight.size(0), weight.size(1), pass_rows);
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  dispatch(hidden.scalar_type(), [&](auto tag) {
    forward_impl<decltype(tag)>(hidden, weight, targets.const_data_ptr<int64_t>(), bp, inv_t, plan,
                           logp.data_ptr<float>(), lse.data_ptr<float>());
  });
  return {logp, lse};
}

// --------------------------------------------------------------------------------------- backward

struct BackwardBuffers {
  at::Tensor blocks;       // [threads, chunk * tile] float32: logits, then d logp / d logits
  at::Tensor halves;       // [threads, chunk * tile] scalar_t copy of the block (half precision only)
  at::Tensor tile_grads;   // [threads, tile * D] float32 grad_weight of one tile (see flush_tiles)
  at::Tensor hidden_parts; // [threads, pass, D] float32 grad_hidden of the pass, per thread
  float* grad_weight;      // [V, D] float32 accumulator (float32 weights: the gradient itself), or null
  float* grad_bias;        // [V] float32 accumulator, or null
  bool flush_tiles;        // one pass and half precision: each tile's float32 sum goes to the output
};

// block[r] = scale * (onehot(target) - softmax) for the block's rows (in place; half: also a copy),
// and its column sums into grad_bias.
template <typename scalar_t>
void block_softmax_grad(float* block, scalar_t* half, const int64_t* targets, const float* bias,
                        const float* lse, const float* scale, int64_t mc, int64_t v0, int64_t vn,
                        int64_t tile, float* gb) {
  for (int64_t r = 0; r < mc; ++r) {
    float* row = block + r * tile;
    scalar_t* half_row = half != nullptr ? half + r * tile : nullptr;
    softmax_grad<scalar_t>(row, bias, vn, lse[r], -scale[r], gb, half_row);
    const int64_t local = targets[r] - v0;
    if (local >= 0 && local < vn) {  // + scale * onehot(target)
      row[local] += scale[r];
      if (gb != nullptr) gb[local] += scale[r];
      if (half_row != nullptr) half_row[local] = scalar_t(row[local]);
    }
  }
}

// One pass over rows [r0, r0 + p.pass): every thread runs its tiles through the pass's rows, adding
// into the tiles' grad_weight rows (its own: no race) and its private grad_hidden for the pass.
template <typename scalar_t>
void backward_pass(const scalar_t* h, const scalar_t* w, const int64_t* targets, const float* bias,
                   const float* lse, const float* scale, float inv_t, const Plan& p, int64_t r0,
                   BackwardBuffers& buf, scalar_t* grad_weight_out /* flush_tiles only */) {
  constexpr bool kHalf = !std::is_same_v<scalar_t, float>;
  const int64_t rows = std::min(p.pass, p.rows - r0);
  for_tiles(p, [&](int slot, int64_t t0, int64_t t1) {
    float* block = buf.blocks.data_ptr<float>() + slot * p.chunk * p.tile;
    scalar_t* half = kHalf ? buf.halves.data_ptr<scalar_t>() + slot * p.chunk * p.tile : nullptr;
    float* gh = buf.hidden_parts.data_ptr<float>() + slot * p.pass * p.dim;
    const scalar_t* dl = kHalf ? half : reinterpret_cast<const scalar_t*>(block);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t v0 = t * p.tile, vn = std::min(p.tile, p.vocab - v0);
      float* gw = buf.flush_tiles ? buf.tile_grads.data_ptr<float>() + slot * p.tile * p.dim
                                  : buf.grad_weight + v0 * p.dim;
      for (int64_t c0 = 0; c0 < rows; c0 += p.chunk) {
        const int64_t mc = std::min(p.chunk, rows - c0), row0 = r0 + c0;
        block_logits(h + row0 * p.dim, w + v0 * p.dim, mc, vn, p.dim, inv_t, block, p.tile);
        block_softmax_grad<scalar_t>(block, half, targets + row0, bias != nullptr ? bias + v0 : nullptr,
                                     lse + row0, scale + row0, mc, v0, vn, p.tile,
                                     buf.grad_bias != nullptr ? buf.grad_bias + v0 : nullptr);
        const bool first = c0 == 0 && (buf.flush_tiles || r0 == 0);  // overwrite, not add
        block_grad_weight(h + row0 * p.dim, dl, mc, vn, p.dim, p.tile, first ? 0.f : 1.f, gw);
        block_grad_hidden(w + v0 * p.dim, dl, mc, vn, p.dim, p.tile, gh + c0 * p.dim);
      }
      if (buf.flush_tiles) convert<scalar_t>(gw, vn * p.dim, grad_weight_out + v0 * p.dim);
    }
  });
}

// grad_hidden[r0 : r0 + rows] = sum over threads of their parts, in scalar_t.
template <typename scalar_t>
void reduce_grad_hidden(const at::Tensor& parts, const Plan& p, int64_t r0, scalar_t* out) {
  const int64_t rows = std::min(p.pass, p.rows - r0), n = rows * p.dim, stride = p.pass * p.dim;
  float* src = parts.data_ptr<float>();
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t k = 1; k < p.threads; ++k) {
      for (int64_t i = i0; i < i1; ++i) src[i] += src[k * stride + i];
    }
    convert<scalar_t>(src + i0, i1 - i0, out + r0 * p.dim + i0);
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
                   const int64_t* targets, const float* bias, const float* lse, int64_t ignore_index,
                   float inv_t, const Plan& p, at::Tensor& grad_hidden, scalar_t* grad_weight_out,
                   BackwardBuffers& buf) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  buf.blocks = at::empty({p.threads, p.chunk * p.tile}, f32);
  if (!std::is_same_v<scalar_t, float>) {
    buf.halves = at::empty({p.threads, p.chunk * p.tile}, hidden.options());
  }
  if (buf.flush_tiles) buf.tile_grads = at::empty({p.threads, p.tile * p.dim}, f32);
  buf.hidden_parts = at::empty({p.threads, p.pass, p.dim}, f32);
  // scale = d loss / d logp / T, 0 where ignored (a NaN upstream gradient there must not leak in)
  at::Tensor scale = at::empty({p.rows}, f32);
  const float* g = grad_logp.const_data_ptr<float>();
  float* sc = scale.data_ptr<float>();
  for (int64_t i = 0; i < p.rows; ++i) sc[i] = targets[i] == ignore_index ? 0.f : g[i] * inv_t;
  const scalar_t *h = hidden.const_data_ptr<scalar_t>(), *w = weight.const_data_ptr<scalar_t>();
  for (int64_t r0 = 0; r0 < p.rows; r0 += p.pass) {
    buf.hidden_parts.zero_();
    backward_pass<scalar_t>(h, w, targets, bias, lse, sc, inv_t, p, r0, buf, grad_weight_out);
    reduce_grad_hidden<scalar_t>(buf.hidden_parts, p, r0, grad_hidden.data_ptr<scalar_t>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_backward(
    const at::Tensor& grad_logp_in, const at::Tensor& hidden_in, const at::Tensor& weight_in,
    const at::Tensor& targets_in, const std::optional<at::Tensor>& bias, const at::Tensor& lse_in,
    double temperature, int64_t ignore_index, int64_t pass_rows) {
  check_inputs(hidden_in, weight_in, targets_in, bias, temperature, ignore_index);
  const int64_t rows = hidden_in.size(0), vocab = weight_in.size(0), dim = weight_in.size(1);
  check_row_vector(grad_logp_in, "grad_logp", rows);
  check_row_vector(lse_in, "lse", rows);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.contiguous(), grad_logp = grad_logp_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor grad_hidden = at::empty_like(hidden);
  at::Tensor grad_bias_acc = bias.has_value() ? at::zeros({vocab}, f32) : at::Tensor();
  if (rows == 0) {
    at::Tensor grad_bias = bias.has_value() ? at::zeros_like(*bias) : at::empty({0}, hidden.options());
    return {grad_hidden, at::zeros_like(weight), grad_bias};
  }
  const float inv_t = static_cast<float>(1.0 / temperature);
  const at::Tensor b = scaled_bias(bias, inv_t);
  const Plan plan = make_plan(rows, vocab, dim, pass_rows);
  const bool is_float = hidden.scalar_type() == at::kFloat, one_pass = plan.pass >= rows;
  // float32: the gradient is its own accumulator. Half precision: with one pass each tile's float32 sum
  // is final and is written out as it completes; with several, a float32 [V, D] accumulator (as "torch").
  at::Tensor grad_weight = is_float || one_pass ? at::empty_like(weight) : at::empty({vocab, dim}, f32);
  BackwardBuffers buf{{}, {}, {}, {}, is_float || !one_pass ? grad_weight.data_ptr<float>() : nullptr,
                      grad_bias_acc.defined() ? grad_bias_acc.data_ptr<float>() : nullptr,
                      !is_float && one_pass};
  dispatch(hidden.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* out = buf.flush_tiles ? grad_weight.data_ptr<scalar_t>() : nullptr;
    backward_impl<scalar_t>(grad_logp, hidden, weight, targets.const_data_ptr<int64_t>(),
                            b.defined() ? b.const_data_ptr<float>() : nullptr, lse.const_data_ptr<float>(),
                            ignore_index, inv_t, plan, grad_hidden, out, buf);
  });
  if (!is_float && !one_pass) grad_weight = grad_weight.to(weight.scalar_type());
  at::Tensor grad_bias =
      bias.has_value() ? grad_bias_acc.to(bias->scalar_type()) : at::empty({0}, hidden.options());
  return {grad_hidden, grad_weight, grad_bias};
}

// ------------------------------------------------------------------------------------ registration

std::string missing() { return blas().missing; }

std::string build_info() {
  std::string info = std::string("gemm=mkl (torch's libtorch_cpu) amx=") + (blas().amx ? "yes" : "no") +
                     " simd=" + (kAvx512 ? "avx512" : "scalar");
#ifdef _OPENMP
  info += " openmp=yes";
#else
  info += " openmp=no";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(fasteto_native, m) {
  m.def("token_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature, "
        "int ignore_index, int pass_rows) -> (Tensor logp, Tensor lse)");
  m.def("token_logprobs_backward(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor targets, "
        "Tensor? bias, Tensor lse, float temperature, int ignore_index, int pass_rows) "
        "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def("missing() -> str", &missing);
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(fasteto_native, CPU, m) {
  m.impl("token_logprobs", &token_logprobs);
  m.impl("token_logprobs_backward", &token_logprobs_backward);
}

}  // namespace fasteto_native
