// Masked AdamW step (CPU, fp32): the optimizer half of Eq. 11.
//
// One pass over param, grad, exp_avg, exp_avg_sq and the task's mask (bool or bit-packed). Inside the mask it is
// the ordinary AdamW update (decoupled weight decay, bias-corrected moments, as in
// torch.optim.AdamW). Outside the mask the weight is left bit-for-bit unchanged and the moments
// decay as they would with a zero gradient -- exactly what the plain PyTorch path (an AdamW
// step followed by putting the masked-out weights back) computes, without its extra copies.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"  // HARMODT_AVX2 (AVX2 + FMA without AVX-512), bits8, reduce_add16

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

void check(const at::Tensor& t, const char* name, const at::Tensor& like, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), ", param has ", like.sizes());
}

// The element loop: restrict pointers and a byte mask so it vectorizes (built with -fno-math-errno).
void adamw_span(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                const uint8_t* __restrict k, int64_t n, float b1, float b2, float step_size, float bc2_sqrt,
                float decay, float eps, float gscale) {
  const float one_minus_b1 = 1.0f - b1, one_minus_b2 = 1.0f - b2;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gscale;
    const float mi = m[i] + one_minus_b1 * (gi - m[i]);  // lerp(m, g, 1 - beta1)
    const float vi = b2 * v[i] + one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float old = p[i];
    const float updated = old * decay - step_size * mi / (std::sqrt(vi) / bc2_sqrt + eps);
    p[i] = k[i] ? updated : old;
  }
}

#if defined(__AVX512F__)
// The same update on 16 lanes; the weight is stored only in the lanes of `keep`.
inline void adamw_16(float* p, const float* g, float* m, float* v, __mmask16 keep, __m512 b2, __m512 omb1, __m512 omb2,
                     __m512 step_size, __m512 bc2_sqrt, __m512 decay, __m512 eps, __m512 gscale) {
  const __m512 gi = _mm512_mul_ps(_mm512_loadu_ps(g), gscale), mi0 = _mm512_loadu_ps(m), vi0 = _mm512_loadu_ps(v);
  const __m512 mi = _mm512_add_ps(mi0, _mm512_mul_ps(omb1, _mm512_sub_ps(gi, mi0)));
  const __m512 vi = _mm512_add_ps(_mm512_mul_ps(b2, vi0), _mm512_mul_ps(_mm512_mul_ps(omb2, gi), gi));
  _mm512_storeu_ps(m, mi);
  _mm512_storeu_ps(v, vi);
  const __m512 old = _mm512_loadu_ps(p);
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2_sqrt), eps);
  const __m512 updated = _mm512_sub_ps(_mm512_mul_ps(old, decay), _mm512_div_ps(_mm512_mul_ps(step_size, mi), denom));
  _mm512_mask_storeu_ps(p, keep, updated);
}
#elif defined(HARMODT_AVX2)
// The same update on 8 lanes; outside the lanes of `keep` the weight is written back as it was.
inline void adamw_8(float* p, const float* g, float* m, float* v, __m256 keep, __m256 b2, __m256 omb1, __m256 omb2,
                    __m256 step_size, __m256 bc2_sqrt, __m256 decay, __m256 eps, __m256 gscale) {
  const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g), gscale), mi0 = _mm256_loadu_ps(m), vi0 = _mm256_loadu_ps(v);
  const __m256 mi = _mm256_add_ps(mi0, _mm256_mul_ps(omb1, _mm256_sub_ps(gi, mi0)));
  const __m256 vi = _mm256_add_ps(_mm256_mul_ps(b2, vi0), _mm256_mul_ps(_mm256_mul_ps(omb2, gi), gi));
  _mm256_storeu_ps(m, mi);
  _mm256_storeu_ps(v, vi);
  const __m256 old = _mm256_loadu_ps(p);
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2_sqrt), eps);
  const __m256 updated = _mm256_sub_ps(_mm256_mul_ps(old, decay), _mm256_div_ps(_mm256_mul_ps(step_size, mi), denom));
  _mm256_storeu_ps(p, _mm256_blendv_ps(old, updated, keep));
}
#endif

// One tensor's share of a step: its pointers, its keep mask (none, bool bytes or packed bits) and the
// step constants of its own step count.
struct Item {
  float* p;
  const float* g;
  float* m;
  float* v;
  const uint8_t* keep_bytes;  // bool keep, or null
  const uint32_t* keep_words;  // packed keep (bit j % 32 of word j / 32 of each row is column j), or null
  int64_t n, kcols;
  float step_size, bc2_sqrt, decay;
};

struct Consts {
  float b1, b2, eps, gscale;
};

// Elements [lo, hi) of one item (for a packed keep, lo and hi are row boundaries or hi = n).
void update_range(const Item& it, int64_t lo, int64_t hi, const Consts& c) {
  float* p = it.p;
  const float* g = it.g;
  float* m = it.m;
  float* v = it.v;
#if defined(__AVX512F__)
  const __m512 vb2 = _mm512_set1_ps(c.b2), vomb1 = _mm512_set1_ps(1.0f - c.b1), vomb2 = _mm512_set1_ps(1.0f - c.b2),
               vss = _mm512_set1_ps(it.step_size), vbc = _mm512_set1_ps(it.bc2_sqrt), vdecay = _mm512_set1_ps(it.decay),
               veps = _mm512_set1_ps(c.eps), vgs = _mm512_set1_ps(c.gscale);
#elif defined(HARMODT_AVX2)
  const __m256 vb2 = _mm256_set1_ps(c.b2), vomb1 = _mm256_set1_ps(1.0f - c.b1), vomb2 = _mm256_set1_ps(1.0f - c.b2),
               vss = _mm256_set1_ps(it.step_size), vbc = _mm256_set1_ps(it.bc2_sqrt), vdecay = _mm256_set1_ps(it.decay),
               veps = _mm256_set1_ps(c.eps), vgs = _mm256_set1_ps(c.gscale);
#endif
  if (it.keep_words == nullptr) {
    int64_t i = lo;
    const uint8_t* k = it.keep_bytes;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    for (; i + 16 <= hi; i += 16) {
      const __mmask16 lanes =
          k == nullptr ? __mmask16(0xFFFF)
                       : _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i)), _mm_set1_epi8(static_cast<char>(0xFF)));
      adamw_16(p + i, g + i, m + i, v + i, lanes, vb2, vomb1, vomb2, vss, vbc, vdecay, veps, vgs);
    }
#elif defined(HARMODT_AVX2)
    for (; i + 8 <= hi; i += 8) {  // 8 keep bytes -> 8 lanes (all ones where the byte is nonzero)
      const __m256 lanes =
          k == nullptr ? _mm256_castsi256_ps(_mm256_set1_epi32(-1))
                       : _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(k + i))),
                                                                _mm256_setzero_si256()));
      adamw_8(p + i, g + i, m + i, v + i, lanes, vb2, vomb1, vomb2, vss, vbc, vdecay, veps, vgs);
    }
#endif
    if (k != nullptr) {
      adamw_span(p + i, g + i, m + i, v + i, k + i, hi - i, c.b1, c.b2, it.step_size, it.bc2_sqrt, it.decay, c.eps, c.gscale);
    } else {
      uint8_t ones[64];
      std::fill(ones, ones + 64, uint8_t(1));
      for (; i < hi; i += 64)
        adamw_span(p + i, g + i, m + i, v + i, ones, std::min<int64_t>(64, hi - i), c.b1, c.b2, it.step_size, it.bc2_sqrt,
                   it.decay, c.eps, c.gscale);
    }
    return;
  }
  const int64_t kcols = it.kcols, w = (kcols + 31) / 32;
  uint8_t bytes[32];
  for (int64_t r = lo / kcols; r < (hi + kcols - 1) / kcols; ++r) {
    const uint32_t* wr = it.keep_words + r * w;
    const int64_t o = r * kcols;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= kcols; j += 16)
      adamw_16(p + o + j, g + o + j, m + o + j, v + o + j, static_cast<__mmask16>(wr[j >> 5] >> (j & 31)), vb2, vomb1, vomb2,
               vss, vbc, vdecay, veps, vgs);
#elif defined(HARMODT_AVX2)
    for (; j + 8 <= kcols; j += 8)
      adamw_8(p + o + j, g + o + j, m + o + j, v + o + j, _mm256_castsi256_ps(harmodt::bits8(wr[j >> 5] >> (j & 31))), vb2, vomb1,
              vomb2, vss, vbc, vdecay, veps, vgs);
#endif
    while (j < kcols) {  // the rest (all of it without AVX-512), through the byte-mask loop 32 at a time
      const int64_t len = std::min<int64_t>(32 - (j & 31), kcols - j);
      for (int64_t q = 0; q < len; ++q) bytes[q] = static_cast<uint8_t>((wr[(j + q) >> 5] >> ((j + q) & 31)) & 1u);
      adamw_span(p + o + j, g + o + j, m + o + j, v + o + j, bytes, len, c.b1, c.b2, it.step_size, it.bc2_sqrt, it.decay,
                 c.eps, c.gscale);
      j += len;
    }
  }
}

// A boundary of the element space of one item: rows of a packed keep are never split.
inline int64_t item_boundary(const Item& it, int64_t at) {
  if (at >= it.n) return it.n;
  return it.keep_words == nullptr ? at : at / it.kcols * it.kcols;
}

// Runs the step over all items in one parallel region, the threads splitting the concatenated
// elements evenly (small tensors are not one OpenMP region each).
void run_items(const std::vector<Item>& items, const Consts& c) {
  std::vector<int64_t> offset(items.size() + 1, 0);
  for (size_t i = 0; i < items.size(); ++i) offset[i + 1] = offset[i] + items[i].n;
  const int64_t total = offset.back();
  if (total == 0) return;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (total + (1 << 15) - 1) >> 15));
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = total * t / parts, hi = total * (t + 1) / parts;
      for (size_t i = 0; i < items.size(); ++i) {
        if (offset[i + 1] <= lo || offset[i] >= hi) continue;
        const int64_t a = item_boundary(items[i], std::max<int64_t>(lo - offset[i], 0));
        const int64_t b = item_boundary(items[i], std::min<int64_t>(hi - offset[i], items[i].n));
        if (a < b) update_range(items[i], a, b, c);
      }
    }
  });
}

Item make_item(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
               const at::Tensor* keep, double lr, double beta1, double beta2, double weight_decay, double step,
               const char* op) {
  TORCH_CHECK(param.scalar_type() == at::kFloat, op, ": param must be float32, got ", param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat,
              op, ": grad and moments must be float32");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count after this update)");
  check(param, "param", param, op);
  check(grad, "grad", param, op);
  check(exp_avg, "exp_avg", param, op);
  check(exp_avg_sq, "exp_avg_sq", param, op);
  Item it{};
  it.p = param.data_ptr<float>();
  it.g = grad.data_ptr<float>();
  it.m = exp_avg.data_ptr<float>();
  it.v = exp_avg_sq.data_ptr<float>();
  it.n = param.numel();
  it.kcols = param.dim() >= 1 ? param.size(-1) : 1;
  if (keep != nullptr && keep->defined()) {
    const bool packed = keep->scalar_type() == at::kInt;
    TORCH_CHECK(packed || keep->scalar_type() == at::kBool, op, ": keep must be bool or packed int32, got ",
                keep->scalar_type());
    TORCH_CHECK(param.dim() >= 1, op, ": a masked param must be at least 1-D");
    if (packed) {
      auto want = param.sizes().vec();
      want.back() = (it.kcols + 31) / 32;
      TORCH_CHECK(keep->is_contiguous() && keep->sizes() == at::IntArrayRef(want), op, ": packed keep has shape ",
                  keep->sizes(), ", param ", param.sizes(), " needs ", at::IntArrayRef(want));
      it.keep_words = reinterpret_cast<const uint32_t*>(keep->data_ptr<int32_t>());
      if (it.kcols == 0) it.n = 0;
    } else {
      check(*keep, "keep", param, op);
      it.keep_bytes = reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>());
    }
  }
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  it.step_size = static_cast<float>(lr / bc1);
  it.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  it.decay = static_cast<float>(1.0 - lr * weight_decay);
  return it;
}

// One AdamW step of a whole parameter group in one call: param i changes only inside keeps[i] when
// that is given (bool or packed; the moments decay everywhere), everywhere otherwise. steps[i] is
// param i's step count (a float32 scalar tensor, as torch.optim.AdamW keeps it): incremented here,
// and its new value sets the bias corrections.
void adamw_group_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  const c10::List<std::optional<at::Tensor>>& keeps, at::TensorList steps, double lr, double beta1, double beta2,
                  double eps, double weight_decay, double grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && keeps.size() == n && steps.size() == n,
              "adamw_group_: params, grads, exp_avgs, exp_avg_sqs, keeps and steps must be lists of the same length, got ",
              n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", keeps.size(), ", ", steps.size());
  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& st = steps[i];
    TORCH_CHECK(st.device().is_cpu() && st.scalar_type() == at::kFloat && st.numel() == 1,
                "adamw_group_: steps[", i, "] must be a float32 CPU scalar tensor");
    float* sp = st.data_ptr<float>();
    const std::optional<at::Tensor> k = keeps[i];
    const at::Tensor keep = k.has_value() ? *k : at::Tensor();
    items.push_back(make_item(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], &keep, lr, beta1, beta2, weight_decay,
                              static_cast<double>(*sp) + 1.0, "adamw_group_"));
  }
  for (size_t i = 0; i < n; ++i) *steps[i].data_ptr<float>() += 1.0f;
  run_items(items, Consts{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps), static_cast<float>(grad_scale)});
}
// sum over all tensors of sum_i t[i]^2 (float32 contiguous CPU tensors; fp32 lanes per tensor, the
// total in double): gradient clipping's norm over the parameters whose backward did not already
// report it, in one call instead of a norm per tensor.
double sum_squares(at::TensorList tensors) {
  double total = 0.0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "sum_squares: tensors[", t,
                "] must be a contiguous float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
    const float* p = x.data_ptr<float>();
    const int64_t n = x.numel();
    int64_t i = 0;
    double acc = 0.0;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
      const __m512 x0 = _mm512_loadu_ps(p + i), x1 = _mm512_loadu_ps(p + i + 16);
      a0 = _mm512_fmadd_ps(x0, x0, a0);
      a1 = _mm512_fmadd_ps(x1, x1, a1);
    }
    acc = static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
#elif defined(HARMODT_AVX2)
    __m256 a0l = _mm256_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l;  // the AVX-512 path's a0, a1 as 8-lane halves
    for (; i + 32 <= n; i += 32) {
      const __m256 x0 = _mm256_loadu_ps(p + i), x1 = _mm256_loadu_ps(p + i + 8);
      const __m256 x2 = _mm256_loadu_ps(p + i + 16), x3 = _mm256_loadu_ps(p + i + 24);
      a0l = _mm256_fmadd_ps(x0, x0, a0l);
      a0h = _mm256_fmadd_ps(x1, x1, a0h);
      a1l = _mm256_fmadd_ps(x2, x2, a1l);
      a1h = _mm256_fmadd_ps(x3, x3, a1h);
    }
    acc = static_cast<double>(harmodt::reduce_add16(_mm256_add_ps(a0l, a1l), _mm256_add_ps(a0h, a1h)));
#endif
    for (; i < n; ++i) acc += static_cast<double>(p[i]) * p[i];
    total += acc;
  }
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def(
      "adamw_group_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor?[] keeps, "
      "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale=1.0) -> ()");
  m.def("sum_squares(Tensor[] tensors) -> float");
}
TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("adamw_group_", &adamw_group_);
  m.impl("sum_squares", &sum_squares);
}
