// Masked AdamW step (CPU, fp32): the optimizer half of Eq. 11.
//
// One pass over param, grad, exp_avg, exp_avg_sq and the task's bool mask. Inside the mask it is
// the ordinary AdamW update (decoupled weight decay, bias-corrected moments, as in
// torch.optim.AdamW). Outside the mask the weight is left bit-for-bit unchanged and the moments
// decay as they would with a zero gradient -- exactly what the plain PyTorch path (an AdamW
// step followed by putting the masked-out weights back) computes, without its extra copies.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

void check(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "masked_adamw_: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "masked_adamw_: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes(), "masked_adamw_: ", name, " has shape ", t.sizes(),
              ", param has ", like.sizes());
}

// The element loop: restrict pointers and a byte mask so it vectorizes (built with -fno-math-errno).
void adamw_span(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                const uint8_t* __restrict k, int64_t n, float b1, float b2, float step_size, float bc2_sqrt,
                float decay, float eps) {
  const float one_minus_b1 = 1.0f - b1, one_minus_b2 = 1.0f - b2;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = m[i] + one_minus_b1 * (gi - m[i]);  // lerp(m, g, 1 - beta1)
    const float vi = b2 * v[i] + one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float old = p[i];
    const float updated = old * decay - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
    p[i] = k[i] ? updated : old;
  }
}

void masked_adamw_(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                   const at::Tensor& keep, double lr, double beta1, double beta2, double eps,
                   double weight_decay, int64_t step) {
  TORCH_CHECK(param.scalar_type() == at::kFloat, "masked_adamw_: param must be float32, got ",
              param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat &&
                  exp_avg_sq.scalar_type() == at::kFloat,
              "masked_adamw_: grad and moments must be float32");
  TORCH_CHECK(keep.scalar_type() == at::kBool, "masked_adamw_: keep must be bool, got ", keep.scalar_type());
  TORCH_CHECK(step >= 1, "masked_adamw_: step must be >= 1 (the count after this update)");
  check(param, "param", param);
  check(grad, "grad", param);
  check(exp_avg, "exp_avg", param);
  check(exp_avg_sq, "exp_avg_sq", param);
  check(keep, "keep", param);

  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const uint8_t* k = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
  const int64_t n = param.numel();

  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    adamw_span(p + begin, g + begin, m + begin, v + begin, k + begin, end - begin, static_cast<float>(beta1),
               static_cast<float>(beta2), step_size, bc2_sqrt, decay, static_cast<float>(eps));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def(
      "masked_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor keep, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) { m.impl("masked_adamw_", &masked_adamw_); }
