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

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
#endif

void masked_adamw_(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                   const at::Tensor& keep, double lr, double beta1, double beta2, double eps,
                   double weight_decay, int64_t step, double grad_scale) {
  TORCH_CHECK(param.scalar_type() == at::kFloat, "masked_adamw_: param must be float32, got ",
              param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat &&
                  exp_avg_sq.scalar_type() == at::kFloat,
              "masked_adamw_: grad and moments must be float32");
  const bool packed = keep.scalar_type() == at::kInt;
  TORCH_CHECK(packed || keep.scalar_type() == at::kBool, "masked_adamw_: keep must be bool or packed int32, got ",
              keep.scalar_type());
  TORCH_CHECK(step >= 1, "masked_adamw_: step must be >= 1 (the count after this update)");
  check(param, "param", param);
  check(grad, "grad", param);
  check(exp_avg, "exp_avg", param);
  check(exp_avg_sq, "exp_avg_sq", param);
  TORCH_CHECK(param.dim() >= 1, "masked_adamw_: param must be at least 1-D");
  const int64_t kcols = param.size(-1);
  if (packed) {
    auto want = param.sizes().vec();
    want.back() = (kcols + 31) / 32;
    TORCH_CHECK(keep.is_contiguous() && keep.sizes() == at::IntArrayRef(want), "masked_adamw_: packed keep has shape ",
                keep.sizes(), ", param ", param.sizes(), " needs ", at::IntArrayRef(want));
  } else {
    check(keep, "keep", param);
  }

  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const int64_t n = param.numel();
  if (n == 0) return;

  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2), epsf = static_cast<float>(eps);
  const float gscale = static_cast<float>(grad_scale);  // the gradient clipping coefficient (1: none)
#if defined(__AVX512F__)
  const __m512 vb2 = _mm512_set1_ps(b2), vomb1 = _mm512_set1_ps(1.0f - b1),
               vomb2 = _mm512_set1_ps(1.0f - b2), vss = _mm512_set1_ps(step_size), vbc = _mm512_set1_ps(bc2_sqrt),
               vdecay = _mm512_set1_ps(decay), veps = _mm512_set1_ps(epsf), vgs = _mm512_set1_ps(gscale);
#endif
  if (!packed) {
    const uint8_t* k = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      for (; i + 16 <= end; i += 16) {
        const __mmask16 lanes = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i)),
                                                   _mm_set1_epi8(static_cast<char>(0xFF)));
        adamw_16(p + i, g + i, m + i, v + i, lanes, vb2, vomb1, vomb2, vss, vbc, vdecay, veps, vgs);
      }
#endif
      adamw_span(p + i, g + i, m + i, v + i, k + i, end - i, b1, b2, step_size, bc2_sqrt, decay, epsf, gscale);
    });
    return;
  }
  // Packed keep: bit j % 32 of word j / 32 of each row is column j.
  const uint32_t* words = reinterpret_cast<const uint32_t*>(keep.data_ptr<int32_t>());
  const int64_t w = (kcols + 31) / 32, rows = n / kcols;
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / kcols), [&](int64_t r0, int64_t r1) {
    uint8_t bytes[32];
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* wr = words + r * w;
      const int64_t o = r * kcols;
      int64_t j = 0;
#if defined(__AVX512F__)
      for (; j + 16 <= kcols; j += 16)
        adamw_16(p + o + j, g + o + j, m + o + j, v + o + j, static_cast<__mmask16>(wr[j >> 5] >> (j & 31)), vb2,
                 vomb1, vomb2, vss, vbc, vdecay, veps, vgs);
#endif
      while (j < kcols) {  // the rest (all of it without AVX-512), through the byte-mask loop 32 at a time
        const int64_t len = std::min<int64_t>(32 - (j & 31), kcols - j);
        for (int64_t q = 0; q < len; ++q) bytes[q] = static_cast<uint8_t>((wr[(j + q) >> 5] >> ((j + q) & 31)) & 1u);
        adamw_span(p + o + j, g + o + j, m + o + j, v + o + j, bytes, len, b1, b2, step_size, bc2_sqrt, decay, epsf, gscale);
        j += len;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def(
      "masked_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor keep, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step, float grad_scale=1.0) -> ()");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) { m.impl("masked_adamw_", &masked_adamw_); }
