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
#include <optional>
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

// Attention over few keys (Twins' 7 x 7 windows, and its sub-sampled maps: 49 keys at 224
// pixels): softmax(q k^T / sqrt(D)) v and its gradients, every operand of a task in L1. A
// task packs its keys (and, in backward, its values) transposed; then each tile of kRows
// queries has its row of scores, its softmax and its products computed in registers and small
// buffers. PyTorch's flash kernels for the CPU work in blocks sized for long sequences: on 49
// keys their forward took 1.2-1.4x as long (SVT-S's window shapes, fp32, 2 threads). From
// about 200 keys on they are the faster.
constexpr int kRows = 4;
constexpr int64_t kQueryBlock = 256;   // queries per forward task at most
constexpr int64_t kBackwardBlock = 64;  // queries whose P and dS a backward task holds at once

// s[r][0 .. NV * Vec::size()) = a_r . bt[:, 0 ..] over D channels, for the kRows rows a_r.
template <int NV>
inline void score_tile(const float* const* a, const float* bt, int64_t D, int64_t ldb,
                       float* s, int64_t lds) {
  Vec acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec(0.f);
  for (int64_t d = 0; d < D; ++d) {
    Vec b[NV];
    for (int c = 0; c < NV; ++c) b[c] = Vec::loadu(bt + d * ldb + c * Vec::size());
    for (int r = 0; r < kRows; ++r) {
      const Vec ad(a[r][d]);
      for (int c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(ad, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c].store(s + r * lds + c * Vec::size());
}

// The scores of kRows rows against all ldt (padded) columns of bt (D, ldt): whole tiles of 3
// vectors, the last 4 vectors (if so many remain) as two tiles of 2.
inline void scores(const float* const* a, const float* bt, int64_t D, int64_t ldt, float* s) {
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; ldt - j >= 3 * W && ldt - j != 4 * W; j += 3 * W)
    score_tile<3>(a, bt + j, D, ldt, s + j, ldt);
  for (; ldt - j >= 2 * W; j += 2 * W) score_tile<2>(a, bt + j, D, ldt, s + j, ldt);
  if (j < ldt) score_tile<1>(a, bt + j, D, ldt, s + j, ldt);
}

// o_r[0 .. NV * Vec::size()) (+)= f_r * sum_{j < n} p[r * pr + j * pj] v[j * ldv + 0 ..].
// Rows of o may repeat (a short tile): every copy loads, computes and stores the same values.
template <int NV>
inline void product_tile(const float* p, int64_t pr, int64_t pj, const float* v, int64_t ldv,
                         int64_t n, const float* f, float* const* o, bool accumulate) {
  Vec acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec(0.f);
  for (int64_t j = 0; j < n; ++j) {
    Vec vj[NV];
    for (int c = 0; c < NV; ++c) vj[c] = Vec::loadu(v + j * ldv + c * Vec::size());
    for (int r = 0; r < kRows; ++r) {
      const Vec pj_(p[r * pr + j * pj]);
      for (int c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(pj_, vj[c], acc[r][c]);
    }
  }
  if (accumulate) {
    Vec base[kRows][NV];  // all loaded before any row is stored
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < NV; ++c) base[r][c] = Vec::loadu(o[r] + c * Vec::size());
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < NV; ++c)
        at::vec::fmadd(acc[r][c], Vec(f[r]), base[r][c]).store(o[r] + c * Vec::size());
  } else {
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < NV; ++c) (acc[r][c] * Vec(f[r])).store(o[r] + c * Vec::size());
  }
}

// product_tile over all D channels of the kRows rows o_r.
inline void product(const float* p, int64_t pr, int64_t pj, const float* v, int64_t ldv,
                    int64_t n, int64_t D, const float* f, float* const* o, bool accumulate) {
  constexpr int64_t W = Vec::size();
  float* od[kRows];
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    for (int r = 0; r < kRows; ++r) od[r] = o[r] + d;
    product_tile<2>(p, pr, pj, v + d, ldv, n, f, od, accumulate);
  }
  if (d + W <= D) {
    for (int r = 0; r < kRows; ++r) od[r] = o[r] + d;
    product_tile<1>(p, pr, pj, v + d, ldv, n, f, od, accumulate);
    d += W;
  }
  for (; d < D; ++d) {  // channels past the last whole vector
    float value[kRows];
    for (int r = 0; r < kRows; ++r) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) acc += p[r * pr + j * pj] * v[j * ldv + d];
      value[r] = (accumulate ? o[r][d] : 0.f) + f[r] * acc;
    }
    for (int r = 0; r < kRows; ++r) o[r][d] = value[r];
  }
}

// bt (D, ldt) = b^T for b (keys, D) with rows ldb apart, in 8 x 8 blocks; padding columns zero.
void pack_transposed(const float* b, int64_t ldb, int64_t keys, int64_t D, int64_t ldt,
                     float* bt) {
  const int64_t keys8 = keys / 8 * 8, D8 = D / 8 * 8;
  for (int64_t j = 0; j < keys8; j += 8)
    for (int64_t d = 0; d < D8; d += 8)
      at::vec::transpose_mxn<float, 8, 8>(b + j * ldb + d, ldb, bt + d * ldt + j, ldt);
  for (int64_t d = 0; d < D; ++d) {
    float* row = bt + d * ldt;
    for (int64_t j = d < D8 ? keys8 : 0; j < keys; ++j) row[j] = b[j * ldb + d];
    std::fill(row + keys, row + ldt, 0.f);
  }
}

// Ask for `count` rows of D floats, `ld` apart, to be brought into cache.
inline void prefetch_rows(const float* p, int64_t ld, int64_t count, int64_t D) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(p + i * ld + d);
}

inline float horizontal_sum(const Vec& x) {
  float lanes[Vec::size()];
  x.store(lanes);
  float total = 0.f;
  for (int64_t c = 0; c < Vec::size(); ++c) total += lanes[c];
  return total;
}

inline float horizontal_max(const Vec& x) {
  float lanes[Vec::size()];
  x.store(lanes);
  return *std::max_element(lanes, lanes + Vec::size());
}

// The rows of a matrix with rows `ld` apart, a short tile repeating its last row.
inline void tile_rows(const float* base, int64_t ld, int64_t i0, int rows, const float** out) {
  for (int r = 0; r < kRows; ++r) out[r] = base + (i0 + std::min(r, rows - 1)) * ld;
}
inline void tile_rows(float* base, int64_t ld, int64_t i0, int rows, float** out) {
  for (int r = 0; r < kRows; ++r) out[r] = base + (i0 + std::min(r, rows - 1)) * ld;
}

// A 4-D fp32 CPU tensor's element pointer at [b, h] and its row stride (dimension 2).
struct Rows {
  float* data;
  int64_t s0, s1, ld;
  explicit Rows(const at::Tensor& t)
      : data(t.data_ptr<float>()), s0(t.stride(0)), s1(t.stride(1)), ld(t.stride(2)) {}
  float* at(int64_t b, int64_t h) const { return data + b * s0 + h * s1; }
};

// One forward task: q (L, D), k and v (keys, D), out (L, D) and lse (L,) or null; kt (D, ldt)
// and s (kRows, ldt) are scratch, ldt = keys rounded up to whole vectors.
void attend(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
            int64_t ldv, float* out, int64_t ldo, float* lse, int64_t ldl, int64_t L,
            int64_t keys, int64_t D, int64_t ldt, float scale, float* kt, float* s) {
  constexpr int64_t W = Vec::size();
  pack_transposed(k, ldk, keys, D, ldt, kt);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, L - i0));
    const int64_t ahead = i0 + 2 * kRows;  // the queries two tiles on
    if (ahead < L) prefetch_rows(q + ahead * ldq, ldq, std::min<int64_t>(kRows, L - ahead), D);
    const float* qr[kRows];
    float* orow[kRows];
    tile_rows(q, ldq, i0, rows, qr);
    tile_rows(out, ldo, i0, rows, orow);
    scores(qr, kt, D, ldt, s);
    // Softmax of each row, left unnormalised: p = exp((s - max) * scale), inv = 1 / sum p.
    float inv[kRows];
    for (int r = 0; r < kRows; ++r) {
      float* row = s + r * ldt;
      std::fill(row + keys, row + ldt, neg_inf);
      Vec vmax(neg_inf);
      for (int64_t c = 0; c < ldt; c += W) vmax = at::vec::maximum(vmax, Vec::loadu(row + c));
      const float m = horizontal_max(vmax);
      const Vec mv(m), sv(scale);
      Vec vsum(0.f);
      for (int64_t c = 0; c < ldt; c += W) {
        const Vec e = ((Vec::loadu(row + c) - mv) * sv).exp();
        e.store(row + c);
        vsum = vsum + e;
      }
      const float total = horizontal_sum(vsum);
      inv[r] = 1.f / total;
      if (lse != nullptr && r < rows) lse[(i0 + r) * ldl] = m * scale + std::log(total);
    }
    product(s, ldt, 1, v, ldv, keys, D, inv, orow, false);
  }
}

// One backward task (an image and head, all its queries): from q, out, grad_out (L, D), k, v
// (keys, D) and lse (L,), grad_q (L, D) and grad_k, grad_v (keys, D). Scratch: kt, vt
// (D, ldt), p and ds ((kBackwardBlock + kRows), ldt), dp (kRows, ldt), dk and dv (keys rounded
// up to whole tiles, D).
//   p = exp(s * scale - lse), dp = grad_out v^T, ds = p * (dp - rowsum(grad_out * out)),
//   grad_q = scale ds k, grad_k = scale ds^T q, grad_v = p^T grad_out.
struct BackwardScratch {
  std::vector<float> kt, vt, p, ds, dp, dk, dv;
  BackwardScratch(int64_t keys, int64_t D, int64_t ldt)
      : kt(D * ldt), vt(D * ldt), p((kBackwardBlock + kRows) * ldt),
        ds((kBackwardBlock + kRows) * ldt), dp(kRows * ldt),
        dk((keys + kRows - 1) / kRows * kRows * D), dv(dk.size()) {}
};

void attend_backward(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                     int64_t ldv, const float* o, int64_t ldo, const float* go, int64_t ldgo,
                     const float* lse, int64_t ldl, float* gq, int64_t ldgq, float* gk,
                     int64_t ldgk, float* gv, int64_t ldgv, int64_t L, int64_t keys, int64_t D,
                     int64_t ldt, float scale, BackwardScratch& w) {
  constexpr int64_t W = Vec::size();
  pack_transposed(k, ldk, keys, D, ldt, w.kt.data());
  pack_transposed(v, ldv, keys, D, ldt, w.vt.data());
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float scales[kRows] = {scale, scale, scale, scale};
  const float ones[kRows] = {1.f, 1.f, 1.f, 1.f};
  for (int64_t b0 = 0; b0 < L; b0 += kBackwardBlock) {
    const int64_t block = std::min(kBackwardBlock, L - b0);
    for (int64_t i0 = 0; i0 < block; i0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, block - i0));
      const int64_t ahead = b0 + i0 + 2 * kRows;  // the queries two tiles on
      if (ahead < L) {
        const int64_t count = std::min<int64_t>(kRows, L - ahead);
        prefetch_rows(q + ahead * ldq, ldq, count, D);
        prefetch_rows(go + ahead * ldgo, ldgo, count, D);
        prefetch_rows(o + ahead * ldo, ldo, count, D);
      }
      const float *qr[kRows], *gor[kRows], *orow[kRows];
      float* gqr[kRows];
      tile_rows(q, ldq, b0 + i0, rows, qr);
      tile_rows(go, ldgo, b0 + i0, rows, gor);
      tile_rows(o, ldo, b0 + i0, rows, orow);
      tile_rows(gq, ldgq, b0 + i0, rows, gqr);
      float* p = w.p.data() + i0 * ldt;
      float* ds = w.ds.data() + i0 * ldt;
      scores(qr, w.kt.data(), D, ldt, p);
      scores(gor, w.vt.data(), D, ldt, w.dp.data());
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = b0 + i0 + std::min(r, rows - 1);
        Vec acc(0.f);  // rowsum(grad_out * out)
        int64_t d = 0;
        for (; d + W <= D; d += W)
          acc = at::vec::fmadd(Vec::loadu(gor[r] + d), Vec::loadu(orow[r] + d), acc);
        float delta = horizontal_sum(acc);
        for (; d < D; ++d) delta += gor[r][d] * orow[r][d];
        float* pr = p + r * ldt;
        float* dsr = ds + r * ldt;
        const float* dpr = w.dp.data() + r * ldt;
        std::fill(pr + keys, pr + ldt, neg_inf);  // exp gives 0 there
        const Vec sv(scale), lv(-lse[i * ldl]), dv(delta);
        for (int64_t c = 0; c < ldt; c += W) {
          const Vec e = at::vec::fmadd(Vec::loadu(pr + c), sv, lv).exp();
          e.store(pr + c);
          (e * (Vec::loadu(dpr + c) - dv)).store(dsr + c);
        }
      }
      product(ds, ldt, 1, k, ldk, keys, D, scales, gqr, false);
    }
    // The block's share of grad_k and grad_v, kRows keys at a time, summed over its queries:
    // column j of p and ds is key j's row of p^T and ds^T. dk and dv have rows for whole tiles
    // of keys; past the last key, p and ds are zero.
    for (int64_t j0 = 0; j0 < keys; j0 += kRows) {
      float *dkr[kRows], *dvr[kRows];
      for (int r = 0; r < kRows; ++r) {
        dkr[r] = w.dk.data() + (j0 + r) * D;
        dvr[r] = w.dv.data() + (j0 + r) * D;
      }
      product(w.ds.data() + j0, 1, ldt, q + b0 * ldq, ldq, block, D, ones, dkr, true);
      product(w.p.data() + j0, 1, ldt, go + b0 * ldgo, ldgo, block, D, ones, dvr, true);
    }
  }
  for (int64_t j = 0; j < keys; ++j) {
    for (int64_t d = 0; d < D; ++d) {
      gk[j * ldgk + d] = scale * w.dk[j * D + d];
      gv[j * ldgv + d] = w.dv[j * D + d];
    }
  }
}

void check_attention_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1,
              name, " takes 4-D fp32 CPU tensors with unit stride along the last dimension");
}

void check_lse(const at::Tensor& lse, const at::Tensor& q, const char* name) {
  TORCH_CHECK(lse.is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              name, ": lse must be fp32 (B, H, L) for q (B, H, L, D)");
}

// out = softmax(q k^T / sqrt(D)) v for fp32 q (B, H, L, D), k and v (B, H, keys, D) and out
// (B, H, L, D), each with unit stride along D and any other strides (token-major views); and,
// when given, lse (B, H, L) = log sum_j exp(q_i k_j / sqrt(D)), as PyTorch's flash kernel
// returns it for its backward.
void attention_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  const char* name = "twins_native::attention_";
  for (const at::Tensor* t : {&q, &k, &v, &out}) check_attention_operand(*t, name);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), keys = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D &&
                  out.sizes() == q.sizes() && keys > 0,
              name, ": q, out (B, H, L, D) and k, v (B, H, keys, D) do not match");
  if (lse.has_value()) check_lse(*lse, q, name);
  const int64_t W = Vec::size();
  const int64_t ldt = (keys + W - 1) / W * W;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const Rows Q(q), K(k), V(v), O(out);
  float* LSE = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  const int64_t l0 = LSE ? lse->stride(0) : 0, l1 = LSE ? lse->stride(1) : 0,
                ldl = LSE ? lse->stride(2) : 0;
  // Tasks: an (image, head) and a block of its queries, so that a few long maps still give
  // every thread work. Each task packs its keys afresh: at most kQueryBlock queries share it.
  const int64_t blocks = (L + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> kt(static_cast<size_t>(D * ldt)), s(static_cast<size_t>(kRows * ldt));
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / (H * blocks), h = task / blocks % H;
      const int64_t i0 = task % blocks * kQueryBlock, rows = std::min(kQueryBlock, L - i0);
      if (task + 1 < last && (task + 1) % blocks == 0) {  // the next head's keys and values
        const int64_t nb = (task + 1) / (H * blocks), nh = (task + 1) / blocks % H;
        prefetch_rows(K.at(nb, nh), K.ld, keys, D);
        prefetch_rows(V.at(nb, nh), V.ld, keys, D);
      }
      attend(Q.at(b, h) + i0 * Q.ld, Q.ld, K.at(b, h), K.ld, V.at(b, h), V.ld,
             O.at(b, h) + i0 * O.ld, O.ld, LSE ? LSE + b * l0 + h * l1 + i0 * ldl : nullptr,
             ldl, rows, keys, D, ldt, scale, kt.data(), s.data());
    }
  });
}

// grad_q, grad_k, grad_v of `attention_` from grad_out and the forward's q, k, v, out and lse;
// each tensor as there (4-D fp32, unit stride along D), the gradients shaped as q, k, v.
void attention_backward_(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                         const at::Tensor& grad_q, const at::Tensor& grad_k,
                         const at::Tensor& grad_v) {
  const char* name = "twins_native::attention_backward_";
  for (const at::Tensor* t : {&grad_out, &q, &k, &v, &out, &grad_q, &grad_k, &grad_v})
    check_attention_operand(*t, name);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), keys = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D &&
                  out.sizes() == q.sizes() && grad_out.sizes() == q.sizes() &&
                  grad_q.sizes() == q.sizes() && grad_k.sizes() == k.sizes() &&
                  grad_v.sizes() == k.sizes() && keys > 0,
              name, ": q, out, grad_out, grad_q (B, H, L, D) and k, v, grad_k, grad_v "
              "(B, H, keys, D) do not match");
  check_lse(lse, q, name);
  const int64_t W = Vec::size();
  const int64_t ldt = (keys + W - 1) / W * W;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const Rows GO(grad_out), Q(q), K(k), V(v), O(out), GQ(grad_q), GK(grad_k), GV(grad_v);
  const float* LSE = lse.const_data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t first, int64_t last) {
    BackwardScratch w(keys, D, ldt);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / H, h = task % H;
      if (task + 1 < last) {  // the next head's keys and values
        prefetch_rows(K.at((task + 1) / H, (task + 1) % H), K.ld, keys, D);
        prefetch_rows(V.at((task + 1) / H, (task + 1) % H), V.ld, keys, D);
      }
      attend_backward(Q.at(b, h), Q.ld, K.at(b, h), K.ld, V.at(b, h), V.ld, O.at(b, h), O.ld,
                      GO.at(b, h), GO.ld, LSE + b * lse.stride(0) + h * lse.stride(1),
                      lse.stride(2), GQ.at(b, h), GQ.ld, GK.at(b, h), GK.ld, GV.at(b, h),
                      GV.ld, L, keys, D, ldt, scale, w);
    }
  });
}

}  // namespace

TORCH_LIBRARY(twins_native, m) {
  m.def("gelu_backward_(Tensor pre, Tensor(a!) grad, Tensor(b!) act, Tensor(c!) grad_bias) -> ()");
  m.def("round_(Tensor(a!) self, ScalarType dtype) -> ()");
  m.def("attention_(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!)? lse) -> ()");
  m.def("attention_backward_(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor(c!) grad_v) -> ()");
}

TORCH_LIBRARY_IMPL(twins_native, CPU, m) {
  m.impl("gelu_backward_", gelu_backward_);
  m.impl("round_", round_);
  m.impl("attention_", attention_);
  m.impl("attention_backward_", attention_backward_);
}
