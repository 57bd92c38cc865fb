// Native CPU kernels of the Twins fast paths (see twins/native.py): element-wise passes that
// PyTorch runs as several separate kernels, fused into one pass over the data. Built on first
// use for the CPU's vector instruction set (ATen's `Vectorized`: the erf and exp of PyTorch's
// own gelu_backward kernel) and registered as operators in the `twins_native` namespace.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// The bias gradient is summed in two levels: rows into a block of at most this many, blocks
// into the part of the rows one task covers; then the parts, in order.
constexpr int64_t kSumBlockRows = 64;

// Element-wise passes split into tasks of at least this many elements (ATen's own grain).
constexpr int64_t kElementGrain = 32768;

// The two factors of GELU's derivative at x: cdf = Phi(x) = (1 + erf(x / sqrt 2)) / 2 and
// pdf = phi(x) = exp(-x^2 / 2) / sqrt(2 pi). The erf is ATen's vectorised one (Abramowitz and
// Stegun 7.1.26, maximum error 1.5e-7), whose exp(-(x / sqrt 2)^2) is phi's exp as well: one
// exponential per element where PyTorch's gelu_backward evaluates two.
inline void gelu_cdf_pdf(const Vec& x, Vec& cdf, Vec& pdf) {
  const Vec one(1.f), half(0.5f);
  const Vec y = x * Vec(static_cast<float>(M_SQRT1_2));
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), y.abs(), one);
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  const Vec e = (y * y).neg().exp();
  const Vec erf_abs = at::vec::fmadd((e * t).neg(), r, one);
  const Vec erf = Vec::blendv(erf_abs, erf_abs.neg(), y < Vec(0.f));
  cdf = half * (one + erf);
  pdf = Vec(static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5)) * e;
}

// gelu_backward_ on rows [begin, end): their bias gradient sums go into `total` (H,).
void gelu_backward_rows(const float* P, float* G, float* A, int64_t H, int64_t begin,
                        int64_t end, float* total) {
  const float alpha = static_cast<float>(M_SQRT1_2);
  const float beta = static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
  std::vector<float> block(H);
  for (int64_t r0 = begin; r0 < end; r0 += kSumBlockRows) {
    std::fill(block.begin(), block.end(), 0.f);
    for (int64_t r = r0; r < std::min(end, r0 + kSumBlockRows); ++r) {
      const float* p = P + r * H;
      float* g = G + r * H;
      float* a = A + r * H;
      float* b = block.data();
      int64_t j = 0;
      for (; j + Vec::size() <= H; j += Vec::size()) {
        const Vec x = Vec::loadu(p + j);
        Vec cdf, pdf;
        gelu_cdf_pdf(x, cdf, pdf);
        (x * cdf).store(a + j);
        const Vec dx = Vec::loadu(g + j) * (cdf + x * pdf);
        dx.store(g + j);
        (Vec::loadu(b + j) + dx).store(b + j);
      }
      for (; j < H; ++j) {  // the last H % Vec::size() columns
        const float x = p[j];
        const float cdf = 0.5f * (1.f + std::erf(x * alpha));
        const float pdf = beta * std::exp(x * x * -0.5f);
        a[j] = x * cdf;
        g[j] *= cdf + x * pdf;
        b[j] += g[j];
      }
    }
    for (const auto j : c10::irange(H)) total[j] += block[j];
  }
}

// For pre-activations p (M, H) and the gradient g (M, H) of GELU(p), fp32, in one pass:
//   act = GELU(p)                  (exact erf form, as torch.nn.functional.gelu)
//   g  <- g * GELU'(p)             (in place: the gradient of p)
//   grad_bias += column sums of the new g
// PyTorch runs three passes for this (gelu, gelu_backward, sum), and evaluates the erf in two
// of them and an exponential besides in gelu_backward.
void gelu_backward_(const at::Tensor& pre, const at::Tensor& grad, const at::Tensor& act,
                    const at::Tensor& grad_bias) {
  const char* name = "twins_native::gelu_backward_";
  TORCH_CHECK(pre.dim() == 2 && pre.sizes() == grad.sizes() && pre.sizes() == act.sizes(),
              name, ": pre, grad and act must be (M, H) of one shape");
  TORCH_CHECK(grad_bias.dim() == 1 && grad_bias.size(0) == pre.size(1),
              name, ": grad_bias must be (H,)");
  for (const at::Tensor* t : {&pre, &grad, &act, &grad_bias}) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                name, " takes contiguous fp32 CPU tensors, not ", t->scalar_type());
  }
  const int64_t M = pre.size(0), H = pre.size(1);
  const float* P = pre.const_data_ptr<float>();
  float* G = grad.mutable_data_ptr<float>();
  float* A = act.mutable_data_ptr<float>();
  // The rows in one part per thread, each part's bias sums in a slot of its own, added in order
  // at the end: the same sums whichever thread runs which part.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (M + kSumBlockRows - 1) / kSumBlockRows));
  const int64_t part_rows = (M + parts - 1) / parts;
  std::vector<float> sums(static_cast<size_t>(parts * H), 0.f);
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      const int64_t begin = part * part_rows;
      gelu_backward_rows(P, G, A, H, begin, std::min(M, begin + part_rows),
                         sums.data() + part * H);
    }
  });
  float* B = grad_bias.mutable_data_ptr<float>();
  for (const auto part : c10::irange(parts)) {
    for (const auto j : c10::irange(H)) B[j] += sums[part * H + j];
  }
}

// x rounded to the nearest value of T (bfloat16 or half, ties to even) and held in fp32, on
// elements [begin, end): ATen's own conversions there and back, so the bits of
// x.copy_(x.to(T)), which takes two passes and a T-sized temporary.
template <typename T>
void round_range(float* x, int64_t begin, int64_t end) {
  constexpr int64_t step = at::vec::Vectorized<T>::size();  // two float vectors
  int64_t i = begin;
  for (; i + step <= end; i += step) {
    const auto rounded = at::vec::convert_from_float<T>(Vec::loadu(x + i),
                                                        Vec::loadu(x + i + Vec::size()));
    const auto [low, high] = at::vec::convert_to_float<T>(rounded);
    low.store(x + i);
    high.store(x + i + Vec::size());
  }
  for (; i < end; ++i) x[i] = static_cast<float>(static_cast<T>(x[i]));
}

// Round a contiguous fp32 tensor in place to the values of `dtype` (bfloat16 or float16): how
// the emulated autocast kernels of `kernels.py` round like a low-precision kernel.
void round_(const at::Tensor& self, at::ScalarType dtype) {
  const char* name = "twins_native::round_";
  TORCH_CHECK(self.is_cpu() && self.scalar_type() == at::kFloat && self.is_contiguous(),
              name, " takes a contiguous fp32 CPU tensor, not ", self.scalar_type());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              name, " rounds to bfloat16 or float16, not ", dtype);
  float* x = self.mutable_data_ptr<float>();
  at::parallel_for(0, self.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    if (dtype == at::kBFloat16) {
      round_range<c10::BFloat16>(x, begin, end);
    } else {
      round_range<c10::Half>(x, begin, end);
    }
  });
}

// A sum over a row's n floats in two vector accumulators and a scalar tail: add(acc, x) adds
// x's term to acc, for a Vec of floats and for one float (the tail).
template <typename Add>
inline float row_sum(const float* x, int64_t n, const Add& add) {
  const int64_t W = Vec::size();
  Vec a(0.f), b(0.f);
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    a = add(a, Vec::loadu(x + j));
    b = add(b, Vec::loadu(x + j + W));
  }
  for (; j + W <= n; j += W) a = add(a, Vec::loadu(x + j));
  float tail = 0.f;
  for (; j < n; ++j) tail = add(tail, x[j]);
  return at::vec::vec_reduce_all<float>(std::plus<Vec>(), a + b) + tail;
}

// y = (x - mean) * rstd * w + b over a row of C floats, with rstd = 1 / sqrt(var + eps) and the
// row's mean and variance taken in two passes (the row is in L1 for the second and third).
inline void layer_norm_row(const float* x, const float* w, const float* b, float* y, int64_t C,
                           float eps) {
  const auto add = [](auto acc, auto v) { return acc + v; };
  const float mean = row_sum(x, C, add) / static_cast<float>(C);
  const Vec m(mean);
  const auto add_squared_deviation = [&](auto acc, auto v) {
    if constexpr (std::is_same_v<decltype(v), float>) {
      return acc + (v - mean) * (v - mean);
    } else {
      const Vec d = v - m;
      return at::vec::fmadd(d, d, acc);
    }
  };
  const float var = row_sum(x, C, add_squared_deviation) / static_cast<float>(C);
  const float rstd = 1.f / std::sqrt(var + eps);
  const Vec r(rstd);
  int64_t j = 0;
  for (; j + Vec::size() <= C; j += Vec::size()) {
    ((Vec::loadu(x + j) - m) * r * Vec::loadu(w + j) + Vec::loadu(b + j)).store(y + j);
  }
  for (; j < C; ++j) y[j] = (x[j] - mean) * rstd * w[j] + b[j];
}

// LayerNorm over the last dimension C of fp32 x, written into out (x's shape, contiguous; it
// may be x itself). ATen's kernel takes the row moments by Welford's method, whose
// per-element division made it 1.6-2x as slow as this, 2.1-2.4x a copy of the data (fp32
// rows of 64-768 channels, 2 threads, data not in cache); the errors against float64 are the
// same, about 1.5e-6 on rows of unit scale.
void layer_norm_(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                 double eps, const at::Tensor& out) {
  const char* name = "twins_native::layer_norm_";
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && out.sizes() == x.sizes(),
              name, ": x and out must have one shape, with C > 0 channels last");
  const int64_t C = x.size(-1), M = x.numel() / C;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && bias.sizes() == weight.sizes(),
              name, ": weight and bias must be (C,)");
  for (const at::Tensor* t : {&x, &weight, &bias, &out}) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                name, " takes contiguous fp32 CPU tensors, not ", t->scalar_type());
  }
  const float* X = x.const_data_ptr<float>();
  const float* Wt = weight.const_data_ptr<float>();
  const float* B = bias.const_data_ptr<float>();
  float* Y = out.mutable_data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, M, std::max<int64_t>(1, kElementGrain / C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) layer_norm_row(X + r * C, Wt, B, Y + r * C, C, e);
  });
}

// Attention over few keys (Twins' 7 x 7 windows, and its sub-sampled maps: 49 keys at 224
// pixels): softmax(q k^T / sqrt(D)) v, one (image, head, block of queries) per task, every
// operand in L1. The task packs its keys transposed; then each tile of kRows queries has its
// scores computed, its softmax taken, and its output formed from the probabilities in a small
// buffer. With AVX-512's 32 vector registers the scores of a tile stay in registers from the
// product through the softmax (up to 64 keys: 4 x 4 vectors); with AVX2's 16 they are stored a
// few vectors at a time and the softmax reads them back. The exp is ATen's exp_u20, the one
// PyTorch's own CPU flash attention takes. bf16 operands are converted to fp32 a task at a
// time (queries, keys and values into small buffers) and the output rounded back once.
// PyTorch's flash kernel works in blocks sized for long sequences; on 49 keys it took 1.2-1.4x
// as long as this kernel's first form (SVT-S's window shapes, fp32, 2 threads), which stored
// the scores with AVX-512 too and used Sleef's 1-ulp exp; that form took 1.08-1.38x as long as
// this one on SVT-S's and PCPVT-S's shapes with AVX-512, 1.00-1.12x with AVX2 (the exp alone).
// Up to kMaxKeys keys.
constexpr int64_t kMaxKeys = 64;
constexpr int64_t kQueryBlock = 256;  // queries per task at most
constexpr int kRows = 4;              // queries per tile
constexpr bool kScoresInRegisters = Vec::size() == 16;

// acc[r][0 .. NV * Vec::size()) = sum_{t < n} a_r[t] b[t * ldb + 0 ..] for the kRows rows a_r:
// the register tile of both products, scores (a = queries, b = packed keys) and output
// (a = probabilities, b = values).
template <int NV>
inline void tile_product(const float* const* a, const float* b, int64_t ldb, int64_t n,
                         Vec (&acc)[kRows][NV]) {
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec(0.f);
  for (int64_t t = 0; t < n; ++t) {
    Vec bt[NV];
    for (int c = 0; c < NV; ++c) bt[c] = Vec::loadu(b + t * ldb + c * Vec::size());
    for (int r = 0; r < kRows; ++r) {
      const Vec at_(a[r][t]);
      for (int c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(at_, bt[c], acc[r][c]);
    }
  }
}

// s[r][j .. j + NV * Vec::size()) = q_r . kt[:, j ..] over the D channels (stored scores).
template <int NV>
inline void score_tile(const float* const* q, const float* kt, int64_t D, int64_t ldk,
                       float* s, int64_t lds) {
  Vec acc[kRows][NV];
  tile_product<NV>(q, kt, ldk, D, acc);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c].store(s + r * lds + c * Vec::size());
}

// o_r[0 .. NV * Vec::size()) = inv_r * sum_j p[r][j] v[j][0 ..].
template <int NV>
inline void output_tile(const float* p, int64_t lds, const float* v, int64_t ldv, int64_t keys,
                        const float* inv, float* const* o) {
  const float* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = p + r * lds;
  Vec acc[kRows][NV];
  tile_product<NV>(rows, v, ldv, keys, acc);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) (acc[r][c] * Vec(inv[r])).store(o[r] + c * Vec::size());
}

// The softmax of a row of scores, left unnormalised: p = exp((x - max) * scale), by ATen's
// exp_u20 (the exp of PyTorch's own CPU flash attention), and 1 / sum p. A row whose largest
// score is not finite (a NaN or infinite input) gives NaN, as exact arithmetic does.
inline Vec probabilities(const Vec& x, const Vec& max, const Vec& scale) {
  return ((x - max) * scale).exp_u20();
}

inline float reduce_max(const Vec& x) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x);
}

inline float inverse_sum(float max, const Vec& sum) {
  return std::isfinite(max)
             ? 1.f / at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum)
             : std::numeric_limits<float>::quiet_NaN();
}

// The softmax of a row of NV score vectors in registers (the padding past the keys already
// -inf): the probabilities stored to p; returns 1 / their sum.
template <int NV>
inline float softmax_in_registers(const Vec (&x)[NV], const Vec& scale, float* p) {
  Vec vmax = x[0];
#pragma GCC unroll 8
  for (int c = 1; c < NV; ++c) vmax = at::vec::maximum(vmax, x[c]);
  const float m = reduce_max(vmax);
  const Vec mv(m);
  Vec vsum(0.f);
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    const Vec e = probabilities(x[c], mv, scale);
    e.store(p + c * Vec::size());
    vsum = vsum + e;
  }
  return inverse_sum(m, vsum);
}

// The same for a stored row of `ldt` floats, `keys` of them scores, in place.
inline float softmax_stored(float* row, int64_t ldt, int64_t keys, const Vec& scale) {
  constexpr int64_t W = Vec::size();
  std::fill(row + keys, row + ldt, -std::numeric_limits<float>::infinity());
  Vec vmax = Vec::loadu(row);
  for (int64_t c = W; c < ldt; c += W) vmax = at::vec::maximum(vmax, Vec::loadu(row + c));
  const float m = reduce_max(vmax);
  const Vec mv(m);
  Vec vsum(0.f);
  for (int64_t c = 0; c < ldt; c += W) {
    const Vec e = probabilities(Vec::loadu(row + c), mv, scale);
    e.store(row + c);
    vsum = vsum + e;
  }
  return inverse_sum(m, vsum);
}

// Ask for `count` rows of D floats, `ld` apart, to be brought into cache: the rows of q, k and v
// are one head's slice of each token's channels, strided, and the tiles waited on them (a
// backward kernel of the same design, tried and removed, went from 0.9-1.3x PyTorch's speed to
// 1.1-1.7x with these prefetches).
template <typename T>
inline void prefetch_rows(const T* p, int64_t ld, int64_t count, int64_t D) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t d = 0; d < D; d += 64 / sizeof(T)) __builtin_prefetch(p + i * ld + d);
}

// kt (D, ldt) = k^T for k (keys, D), rows `ldk` apart, in 8 x 8 blocks; the columns past
// `keys` are zero.
void pack_keys(const float* k, int64_t ldk, int64_t keys, int64_t D, int64_t ldt, float* kt) {
  const int64_t keys8 = keys / 8 * 8, D8 = D / 8 * 8;
  for (int64_t j = 0; j < keys8; j += 8)
    for (int64_t d = 0; d < D8; d += 8)
      at::vec::transpose_mxn<float, 8, 8>(k + j * ldk + d, ldk, kt + d * ldt + j, ldt);
  for (int64_t d = 0; d < D; ++d) {
    float* row = kt + d * ldt;
    for (int64_t j = d < D8 ? keys8 : 0; j < keys; ++j) row[j] = k[j * ldk + d];
    std::fill(row + keys, row + ldt, 0.f);
  }
}

// The tile of queries from i0 of a task's q (L, D), rows `ldq` apart, and its output rows in
// out (`ldo` apart): a short last tile repeats its last row (the same scores and output,
// written twice). Prefetches the queries two tiles on; returns the number of real rows.
inline int tile_at(const float* q, int64_t ldq, float* out, int64_t ldo, int64_t L, int64_t D,
                   int64_t i0, const float* (&qr)[kRows], float* (&orow)[kRows]) {
  const int rows = static_cast<int>(std::min<int64_t>(kRows, L - i0));
  const int64_t ahead = i0 + 2 * kRows;
  if (ahead < L) prefetch_rows(q + ahead * ldq, ldq, std::min<int64_t>(kRows, L - ahead), D);
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + std::min(r, rows - 1);
    qr[r] = q + i * ldq;
    orow[r] = out + i * ldo;
  }
  return rows;
}

// The output rows of a tile: inv_r * the probabilities in the rows of s (ldt apart) times v
// (keys, D; rows `ldv` apart).
inline void tile_output(const float* s, int64_t ldt, const float* v, int64_t ldv, int64_t keys,
                        int64_t D, const float* inv, float* const (&orow)[kRows], int rows) {
  constexpr int64_t W = Vec::size();
  float* o[kRows];  // the output rows from channel d on
  const auto from = [&](int64_t d) {
    for (int r = 0; r < kRows; ++r) o[r] = orow[r] + d;
    return o;
  };
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) output_tile<2>(s, ldt, v + d, ldv, keys, inv, from(d));
  if (d + W <= D) {
    output_tile<1>(s, ldt, v + d, ldv, keys, inv, from(d));
    d += W;
  }
  for (; d < D; ++d) {  // channels past the last whole vector
    for (int r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t j = 0; j < keys; ++j) acc += s[r * ldt + j] * v[j * ldv + d];
      orow[r][d] = acc * inv[r];
    }
  }
}

// One task's queries q (L, D) attended into out (L, D), rows `ldq`, `ldo` apart, over the keys
// packed in kt (D, ldt) and the values v (keys, D), rows `ldv` apart; s (kRows, ldt) is
// scratch for the probabilities. The scores of a tile in registers: NV = ldt / Vec::size() of
// them per query (AVX-512). Inlined into `attend`: called across a function boundary it took
// 1.1x as long on 7 x 7 windows.
template <int NV>
__attribute__((always_inline)) inline void attend_in_registers(
    const float* q, int64_t ldq, const float* v, int64_t ldv, float* out, int64_t ldo, int64_t L,
    int64_t keys, int64_t D, const Vec& scale, const float* kt, float* s) {
  constexpr int64_t ldt = NV * Vec::size();
  // Added to the last score vector: 0 for the keys, -inf for the padding past them.
  const Vec tail = Vec::set(Vec(-std::numeric_limits<float>::infinity()), Vec(0.f),
                            keys - (NV - 1) * Vec::size());
  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const float* qr[kRows];
    float* orow[kRows];
    const int rows = tile_at(q, ldq, out, ldo, L, D, i0, qr, orow);
    Vec scores[kRows][NV];
    tile_product<NV>(qr, kt, ldt, D, scores);
    float inv[kRows];
    // Unrolled, so that the scores never leave the registers.
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      scores[r][NV - 1] = scores[r][NV - 1] + tail;
      inv[r] = softmax_in_registers<NV>(scores[r], scale, s + r * ldt);
    }
    tile_output(s, ldt, v, ldv, keys, D, inv, orow, rows);
  }
}

// The same with the scores stored, in tiles of 3 vectors (the last 4, if so many remain, in two
// of 2): 12 accumulators, for AVX2's 16 registers.
void attend_stored(const float* q, int64_t ldq, const float* v, int64_t ldv, float* out,
                   int64_t ldo, int64_t L, int64_t keys, int64_t D, int64_t ldt,
                   const Vec& scale, const float* kt, float* s) {
  constexpr int64_t W = Vec::size();
  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const float* qr[kRows];
    float* orow[kRows];
    const int rows = tile_at(q, ldq, out, ldo, L, D, i0, qr, orow);
    int64_t j = 0;
    for (; ldt - j >= 3 * W && ldt - j != 4 * W; j += 3 * W)
      score_tile<3>(qr, kt + j, D, ldt, s + j, ldt);
    for (; ldt - j >= 2 * W; j += 2 * W) score_tile<2>(qr, kt + j, D, ldt, s + j, ldt);
    if (j < ldt) score_tile<1>(qr, kt + j, D, ldt, s + j, ldt);
    float inv[kRows];
    for (int r = 0; r < kRows; ++r) inv[r] = softmax_stored(s + r * ldt, ldt, keys, scale);
    tile_output(s, ldt, v, ldv, keys, D, inv, orow, rows);
  }
}

// One task: q (L, D), k and v (keys, D), out (L, D), rows `ldq`, `ldk`, `ldv`, `ldo` apart,
// keys <= kMaxKeys. Packs the keys into kt (D, ldt = the keys rounded up to whole vectors)
// unless `packed` (the same head's keys, packed by this thread's previous task); s (kRows,
// ldt) is scratch for the probabilities.
void attend(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
            int64_t ldv, float* out, int64_t ldo, int64_t L, int64_t keys, int64_t D,
            int64_t ldt, float scale, bool packed, float* kt, float* s) {
  if (!packed) pack_keys(k, ldk, keys, D, ldt, kt);
  const Vec sv(scale);
  static_assert(!kScoresInRegisters || kMaxKeys <= 4 * Vec::size(),
                "up to 4 score vectors per query in registers");
  if constexpr (kScoresInRegisters) {
    switch (ldt / Vec::size()) {
      case 1: return attend_in_registers<1>(q, ldq, v, ldv, out, ldo, L, keys, D, sv, kt, s);
      case 2: return attend_in_registers<2>(q, ldq, v, ldv, out, ldo, L, keys, D, sv, kt, s);
      case 3: return attend_in_registers<3>(q, ldq, v, ldv, out, ldo, L, keys, D, sv, kt, s);
      default: return attend_in_registers<4>(q, ldq, v, ldv, out, ldo, L, keys, D, sv, kt, s);
    }
  } else {
    attend_stored(q, ldq, v, ldv, out, ldo, L, keys, D, ldt, sv, kt, s);
  }
}

// A (B, H, tokens, D) tensor's data, addressed by image and head: its rows are `ld` apart.
template <typename T>
struct Heads {
  T* data;
  int64_t s0, s1, ld;
  explicit Heads(const at::Tensor& t)
      : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), ld(t.stride(2)) {}
  T* rows(int64_t b, int64_t h) const { return data + b * s0 + h * s1; }
};

// `rows` rows of D values of T (`ld` apart) converted to fp32, dense, into dst (rows, D).
template <typename T>
void rows_to_float(const T* src, int64_t ld, int64_t rows, int64_t D, float* dst) {
  constexpr int64_t step = at::vec::Vectorized<T>::size();  // two float vectors
  for (int64_t i = 0; i < rows; ++i) {
    const T* from = src + i * ld;
    float* to = dst + i * D;
    int64_t d = 0;
    for (; d + step <= D; d += step) {
      const auto [low, high] =
          at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(from + d));
      low.store(to + d);
      high.store(to + d + Vec::size());
    }
    for (; d < D; ++d) to[d] = static_cast<float>(from[d]);
  }
}

// The inverse: fp32 rows (rows, D), dense, rounded to T (to nearest, ties to even) into dst.
template <typename T>
void rows_from_float(const float* src, int64_t rows, int64_t D, T* dst, int64_t ld) {
  constexpr int64_t step = at::vec::Vectorized<T>::size();
  for (int64_t i = 0; i < rows; ++i) {
    const float* from = src + i * D;
    T* to = dst + i * ld;
    int64_t d = 0;
    for (; d + step <= D; d += step)
      at::vec::convert_from_float<T>(Vec::loadu(from + d), Vec::loadu(from + d + Vec::size()))
          .store(to + d);
    for (; d < D; ++d) to[d] = static_cast<T>(from[d]);
  }
}

// `attention_` for operands of type T. fp32 operands are read and written in place; bf16 ones
// are converted per task into fp32 buffers (the task's queries, its head's keys and values)
// and its output rounded back from one, so the arithmetic is the fp32 kernel's throughout.
template <typename T>
void attention_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out) {
  constexpr bool kStaged = !std::is_same_v<T, float>;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), keys = k.size(2);
  const int64_t W = Vec::size();
  const int64_t ldt = (keys + W - 1) / W * W;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const Heads<T> Q(q), K(k), V(v), O(out);
  // Tasks: an (image, head) and a block of its queries, so that a few long maps still give
  // every thread work. A thread packs a head's keys (and converts its values) at the first of
  // its tasks for that head.
  const int64_t blocks = (L + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> kt(static_cast<size_t>(D * ldt)), s(static_cast<size_t>(kRows * ldt));
    // Staged operands (bf16): queries and output (kQueryBlock, D), keys and values (keys, D).
    std::vector<float> staged(kStaged ? static_cast<size_t>((2 * kQueryBlock + 2 * keys) * D)
                                      : 0);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / (H * blocks), h = task / blocks % H;
      const int64_t i0 = task % blocks * kQueryBlock, rows = std::min(kQueryBlock, L - i0);
      const bool packed = i0 > 0 && task > first;
      if (task + 1 < last && (task + 1) % blocks == 0) {  // the next head's keys and values
        const int64_t nb = (task + 1) / (H * blocks), nh = (task + 1) / blocks % H;
        prefetch_rows(K.rows(nb, nh), K.ld, keys, D);
        prefetch_rows(V.rows(nb, nh), V.ld, keys, D);
      }
      if constexpr (kStaged) {
        float* const qf = staged.data();
        float* const of = qf + kQueryBlock * D;
        float* const kf = of + kQueryBlock * D;
        float* const vf = kf + keys * D;
        rows_to_float(Q.rows(b, h) + i0 * Q.ld, Q.ld, rows, D, qf);
        if (!packed) {
          rows_to_float(K.rows(b, h), K.ld, keys, D, kf);
          rows_to_float(V.rows(b, h), V.ld, keys, D, vf);
        }
        attend(qf, D, kf, D, vf, D, of, D, rows, keys, D, ldt, scale, packed, kt.data(),
               s.data());
        rows_from_float(of, rows, D, O.rows(b, h) + i0 * O.ld, O.ld);
      } else {
        attend(Q.rows(b, h) + i0 * Q.ld, Q.ld, K.rows(b, h), K.ld, V.rows(b, h), V.ld,
               O.rows(b, h) + i0 * O.ld, O.ld, rows, keys, D, ldt, scale, packed, kt.data(),
               s.data());
      }
    }
  });
}

// out = softmax(q k^T / sqrt(D)) v for q (B, H, L, D), k and v (B, H, keys, D) and out
// (B, H, L, D), all fp32 or all bf16, each with unit stride along D and any other strides
// (token-major views). bf16 is computed in fp32 (scores, softmax and products) and rounded
// once, at the output.
void attention_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out) {
  const char* name = "twins_native::attention_";
  const at::ScalarType dtype = q.scalar_type();
  for (const at::Tensor* t : {&q, &k, &v, &out}) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == dtype && t->dim() == 4 && t->stride(3) == 1,
                name, " takes 4-D CPU tensors of one dtype with unit stride along the last "
                "dimension");
  }
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              name, " takes fp32 or bf16 tensors, not ", dtype);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), keys = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D &&
                  out.sizes() == q.sizes() && keys > 0,
              name, ": q, out (B, H, L, D) and k, v (B, H, keys, D) do not match");
  TORCH_CHECK(keys <= kMaxKeys, name, " handles up to ", kMaxKeys, " keys, not ", keys);
  if (dtype == at::kFloat) {
    attention_of<float>(q, k, v, out);
  } else {
    attention_of<c10::BFloat16>(q, k, v, out);
  }
}

}  // namespace

TORCH_LIBRARY(twins_native, m) {
  m.def("gelu_backward_(Tensor pre, Tensor(a!) grad, Tensor(b!) act, Tensor(c!) grad_bias) -> ()");
  m.def("round_(Tensor(a!) self, ScalarType dtype) -> ()");
  m.def("attention_(Tensor q, Tensor k, Tensor v, Tensor(a!) out) -> ()");
  m.def("layer_norm_(Tensor x, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(twins_native, CPU, m) {
  m.impl("gelu_backward_", gelu_backward_);
  m.impl("round_", round_);
  m.impl("attention_", attention_);
  m.impl("layer_norm_", layer_norm_);
}
