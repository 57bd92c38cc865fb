// Native CPU kernels of the Twins fast paths (see twins/native.py): element-wise passes that
// PyTorch runs as several separate kernels, fused into one pass over the data. Built on first
// use for the CPU's vector instruction set (ATen's `Vectorized`, the same erf/exp as PyTorch's
// own GELU kernels) and registered as operators in the `twins_native` namespace.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// Rows summed into a block-local buffer before the buffer is added into the thread's sum, so
// that no fp32 running sum takes more than about sqrt(rows) additions per entry.
constexpr int64_t kSumBlockRows = 64;

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

// For pre-activations p (M, H) and the gradient g (M, H) of GELU(p), in one pass:
//   act = GELU(p)                  (exact erf form, as torch.nn.functional.gelu)
//   g  <- g * GELU'(p)             (in place: the gradient of p)
//   grad_bias += column sums of the new g
// PyTorch needs three passes for this (gelu, gelu_backward, sum), each evaluating the erf anew.
void gelu_backward_(const at::Tensor& pre, const at::Tensor& grad, const at::Tensor& act,
                    const at::Tensor& grad_bias) {
  TORCH_CHECK(pre.dim() == 2 && pre.sizes() == grad.sizes() && pre.sizes() == act.sizes(),
              "twins_native::gelu_backward_: pre, grad and act must be (M, H) of one shape");
  TORCH_CHECK(grad_bias.dim() == 1 && grad_bias.size(0) == pre.size(1),
              "twins_native::gelu_backward_: grad_bias must be (H,)");
  for (const at::Tensor* t : {&pre, &grad, &act, &grad_bias}) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "twins_native::gelu_backward_ takes contiguous fp32 CPU tensors");
  }
  const int64_t M = pre.size(0), H = pre.size(1);
  const float* P = pre.const_data_ptr<float>();
  float* G = grad.mutable_data_ptr<float>();
  float* A = act.mutable_data_ptr<float>();
  const int threads = at::get_num_threads();
  std::vector<float> sums(static_cast<size_t>(threads) * H, 0.f);

  at::parallel_for(0, M, kSumBlockRows, [&](int64_t begin, int64_t end) {
    float* total = sums.data() + static_cast<int64_t>(at::get_thread_num()) * H;
    std::vector<float> block(H);
    const float s_alpha = static_cast<float>(M_SQRT1_2);
    const float s_beta = static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    for (int64_t r0 = begin; r0 < end; r0 += kSumBlockRows) {
      std::fill(block.begin(), block.end(), 0.f);
      for (int64_t r = r0; r < std::min(end, r0 + kSumBlockRows); ++r) {
        const float* p = P + r * H;
        float* g = G + r * H;
        float* a = A + r * H;
        int64_t j = 0;
        for (; j + Vec::size() <= H; j += Vec::size()) {
          const Vec x = Vec::loadu(p + j);
          const Vec dy = Vec::loadu(g + j);
          Vec cdf, pdf;
          gelu_cdf_pdf(x, cdf, pdf);
          (x * cdf).store(a + j);
          const Vec dx = dy * (cdf + x * pdf);
          dx.store(g + j);
          (Vec::loadu(block.data() + j) + dx).store(block.data() + j);
        }
        for (; j < H; ++j) {
          const float x = p[j];
          const float cdf = 0.5f * (1.f + std::erf(x * s_alpha));
          const float pdf = s_beta * std::exp(x * x * -0.5f);
          a[j] = x * cdf;
          g[j] *= cdf + x * pdf;
          block[j] += g[j];
        }
      }
      for (const auto j : c10::irange(H)) total[j] += block[j];
    }
  });
  float* B = grad_bias.mutable_data_ptr<float>();
  for (const auto t : c10::irange(threads)) {
    for (const auto j : c10::irange(H)) B[j] += sums[t * H + j];
  }
}

}  // namespace

TORCH_LIBRARY(twins_native, m) {
  m.def("gelu_backward_(Tensor pre, Tensor(a!) grad, Tensor(b!) act, Tensor(c!) grad_bias) -> ()");
}

TORCH_LIBRARY_IMPL(twins_native, CPU, m) {
  m.impl("gelu_backward_", gelu_backward_);
}
