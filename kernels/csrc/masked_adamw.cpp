// Masked AdamW step of a whole parameter group (CPU, fp32): the optimizer half of Eq. 11.
//
// One pass over param, grad, exp_avg, exp_avg_sq and the param's packed mask. Inside the mask it
// is the ordinary AdamW update (decoupled weight decay, bias-corrected moments, as in
// torch.optim.AdamW). Outside the mask the weight is left bit-for-bit unchanged and the moments
// decay as they would with a zero gradient: what an AdamW step followed by putting the masked-out
// weights back computes (kernels/reference.py's masked_adamw_), without its extra copies.
// The tensors of the group are one element space that the threads split evenly, so small tensors
// do not cost a parallel region each.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "common.h"

namespace harmodt {
namespace {

// The element loop: restrict pointers and a byte mask so that it vectorizes (built with
// -fno-math-errno for the sqrt); the weight is written back unchanged where keep[i] is 0.
void adamw_span(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v, const uint8_t* __restrict keep,
                int64_t n, float one_minus_b1, float b2, float one_minus_b2, float step_size, float bc2_sqrt, float decay, float eps,
                float gscale) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gscale;
    const float mi = m[i] + one_minus_b1 * (gi - m[i]);  // lerp(m, g, 1 - beta1)
    const float vi = b2 * v[i] + one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float old = p[i];
    const float updated = old * decay - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
    p[i] = keep[i] ? updated : old;
  }
}

// One tensor of the group: its pointers, its packed mask (null: no mask) and the constants of its
// own step count.
struct Item {
  float* p;
  const float* g;
  float* m;
  float* v;
  const uint32_t* words;  // [rows, ceil(kcols / 32)] or null
  int64_t n, kcols;
  float step_size, bc2_sqrt, decay;
};

// 1 - beta is computed in double and then rounded, as torch.optim.AdamW rounds its scalar 1 - beta
// (1.0f - 0.999f would be off by 1.3e-5 relative).
struct Consts {
  float omb1, b2, omb2, eps, gscale;
};

// Elements [lo, hi) of one item; with a mask, lo and hi are row boundaries (or hi = n).
void update_range(const Item& it, int64_t lo, int64_t hi, const Consts& c) {
  uint8_t keep[64];
  if (it.words == nullptr) {
    std::fill(keep, keep + 64, uint8_t(1));
    for (int64_t i = lo; i < hi; i += 64)
      adamw_span(it.p + i, it.g + i, it.m + i, it.v + i, keep, std::min<int64_t>(64, hi - i), c.omb1, c.b2, c.omb2, it.step_size, it.bc2_sqrt,
                 it.decay, c.eps, c.gscale);
    return;
  }
  const int64_t kcols = it.kcols, nw = num_words(kcols);
  for (int64_t r = lo / kcols; r * kcols < hi; ++r)
    for (int64_t w = 0; w < nw; ++w) {  // one mask word: up to 32 elements through the byte-mask loop
      const int64_t o = r * kcols + w * 32, len = std::min<int64_t>(32, kcols - w * 32);
      const uint32_t bits = it.words[r * nw + w];
      for (int64_t b = 0; b < len; ++b) keep[b] = static_cast<uint8_t>((bits >> b) & 1u);
      adamw_span(it.p + o, it.g + o, it.m + o, it.v + o, keep, len, c.omb1, c.b2, c.omb2, it.step_size, it.bc2_sqrt, it.decay, c.eps, c.gscale);
    }
}

// A boundary of an item's element space at or before `at`: rows of a masked item are never split.
int64_t item_boundary(const Item& it, int64_t at) {
  if (at >= it.n) return it.n;
  return it.words == nullptr ? at : at / it.kcols * it.kcols;
}

void check_like(const at::Tensor& t, const at::Tensor& param, size_t i, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == param.sizes(),
                    "masked_adamw_: ", name, "[", i, "] must be a contiguous float32 CPU tensor of shape ", param.sizes(), ", got ",
                    t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// param i changes only inside masks[i] when given (the moments move everywhere); steps[i] (a
// float32 0-dim tensor, as torch.optim.AdamW keeps it) is incremented and its new value sets the
// bias corrections; every gradient is multiplied by grad_scale (a float32 one-element CPU tensor,
// e.g. the clipping factor, read here rather than by the caller: no scalar leaves the op) first.
void adamw_group_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  const c10::List<std::optional<at::Tensor>>& masks, at::TensorList steps, double lr, double beta1, double beta2, double eps,
                  double weight_decay, const at::Tensor& grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && masks.size() == n && steps.size() == n,
                    "masked_adamw_: params, grads, exp_avgs, exp_avg_sqs, masks and steps must have one length, got ", n, ", ",
                    grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", masks.size(), ", ", steps.size());
  TORCH_CHECK_VALUE(grad_scale.device().is_cpu() && grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1,
                    "masked_adamw_: grad_scale must be a float32 one-element CPU tensor, got ", grad_scale.scalar_type(), " ",
                    grad_scale.sizes());
  std::vector<Item> items(n);
  std::vector<at::Tensor> words(n);  // keeps each mask alive while its words are read
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_like(p, p, i, "params");
    check_like(grads[i], p, i, "grads");
    check_like(exp_avgs[i], p, i, "exp_avgs");
    check_like(exp_avg_sqs[i], p, i, "exp_avg_sqs");
    TORCH_CHECK_VALUE(steps[i].device().is_cpu() && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1, "masked_adamw_: steps[",
                      i, "] must be a float32 CPU scalar tensor");
    Item& it = items[i];
    it = Item{p.data_ptr<float>(), grads[i].const_data_ptr<float>(), exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(),
              nullptr, p.numel(), p.dim() >= 1 ? p.size(-1) : 1, 0.f, 0.f, 0.f};
    const std::optional<at::Tensor> mask = masks[i];
    if (mask.has_value() && mask->defined()) {
      TORCH_CHECK_VALUE(p.dim() >= 1, "masked_adamw_: a masked param must be at least 1-D (params[", i, "])");
      auto want = p.sizes().vec();
      want.back() = num_words(it.kcols);
      TORCH_CHECK_VALUE(mask->scalar_type() == at::kInt && mask->device().is_cpu() && mask->sizes() == at::IntArrayRef(want),
                        "masked_adamw_: masks[", i, "] must be packed int32 ", at::IntArrayRef(want), " for params[", i, "] ", p.sizes(),
                        ", got ", mask->scalar_type(), " ", mask->sizes());
      words[i] = mask->contiguous();
      it.words = mask_words(words[i]);
      if (it.kcols == 0) it.n = 0;
    }
    const double step = static_cast<double>(*steps[i].const_data_ptr<float>()) + 1.0;
    it.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
    it.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
    it.decay = static_cast<float>(1.0 - lr * weight_decay);
  }
  for (size_t i = 0; i < n; ++i) *steps[i].data_ptr<float>() += 1.0f;
  const Consts c{static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                 *grad_scale.const_data_ptr<float>()};
  std::vector<int64_t> offset(n + 1, 0);
  for (size_t i = 0; i < n; ++i) offset[i + 1] = offset[i] + items[i].n;
  const int64_t total = offset.back();
  if (total == 0) return;
  // Parts of at least 32 K elements each, at most one per thread.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (total + (1 << 15) - 1) >> 15));
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = total * t / parts, hi = total * (t + 1) / parts;
      for (size_t i = 0; i < n; ++i) {
        if (offset[i + 1] <= lo || offset[i] >= hi) continue;
        const int64_t a = item_boundary(items[i], std::max<int64_t>(lo - offset[i], 0));
        const int64_t b = item_boundary(items[i], std::min<int64_t>(hi - offset[i], items[i].n));
        if (a < b) update_range(items[i], a, b, c);
      }
    }
  });
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) { m.impl("adamw_group_", &harmodt::adamw_group_); }
