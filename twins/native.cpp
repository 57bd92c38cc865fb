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

}  // namespace

TORCH_LIBRARY(twins_native, m) {
  m.def("gelu_backward_(Tensor pre, Tensor(a!) grad, Tensor(b!) act, Tensor(c!) grad_bias) -> ()");
  m.def("round_(Tensor(a!) self, ScalarType dtype) -> ()");
}

TORCH_LIBRARY_IMPL(twins_native, CPU, m) {
  m.impl("gelu_backward_", gelu_backward_);
  m.impl("round_", round_);
}
