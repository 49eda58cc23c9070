// Layer norm over the last dimension of the training blocks (CPU, fp32 statistics), forward and
// backward. The forward can write y in bf16 and the backward read dy in bf16 (the blocks' bf16
// GEMMs read and write those), saving a cast pass each way:
//
//   y = (x - mean) * rstd * w + b,    rstd = 1 / sqrt(var + eps)   (biased variance, as nn.LayerNorm)
//
//   dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) [+ extra],  g = dy * w, xhat = (x - mean) * rstd
//   dw = sum_rows dy * xhat,   db = sum_rows dy
//
// Each row is a few hundred floats, so it stays in L1 between the passes over it: the forward reads
// x twice (sum, then squared deviations) and writes y once; the backward reads dy and x twice and
// writes dx once, adding `extra` on the way (the residual stream's gradient that the block adds
// there, which would otherwise be one more pass). Weight and bias gradients are per-thread
// partial rows summed at the end. ATen's layer norm takes 45 / 60 us forward / backward for the
// paper model's (592, 256) with hot caches on this project's CPUs; this takes about a third.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

#include "common.h"

namespace harmodt {
namespace {

constexpr int64_t kGrainRows = 16;

#if defined(__AVX512F__)
inline __mmask16 lanes_of(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u); }
#elif defined(HARMODT_AVX2)
// 8 lanes at p: all of them (Full), or the first `left` (the rest read as +0, not written).
template <bool Full, typename T>
inline __m256 ld8(const T* p, int64_t left) {
  if constexpr (Full) return load8(p);
  else return load8(p, left);
}
template <bool Full, typename T>
inline void st8(T* p, __m256 v, int64_t left) {
  if constexpr (Full) store8(p, v);
  else store8(p, v, left);
}
#endif

// sum_j a[j] over n floats (four accumulators: the adds do not wait on each other).
inline float row_sum(const float* a, int64_t n) {
  int64_t j = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 64 <= n; j += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(a + j));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(a + j + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(a + j + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(a + j + 48));
  }
  for (; j < n; j += 16) a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(lanes_of(n - j), a + j));
  s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(HARMODT_AVX2)
  // the AVX-512 path's four 16-lane accumulators as 8-lane halves (l, h), the same adds per lane
  __m256 a0l = _mm256_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l, a2l = a0l, a2h = a0l, a3l = a0l, a3h = a0l;
  for (; j + 64 <= n; j += 64) {
    a0l = _mm256_add_ps(a0l, _mm256_loadu_ps(a + j));
    a0h = _mm256_add_ps(a0h, _mm256_loadu_ps(a + j + 8));
    a1l = _mm256_add_ps(a1l, _mm256_loadu_ps(a + j + 16));
    a1h = _mm256_add_ps(a1h, _mm256_loadu_ps(a + j + 24));
    a2l = _mm256_add_ps(a2l, _mm256_loadu_ps(a + j + 32));
    a2h = _mm256_add_ps(a2h, _mm256_loadu_ps(a + j + 40));
    a3l = _mm256_add_ps(a3l, _mm256_loadu_ps(a + j + 48));
    a3h = _mm256_add_ps(a3h, _mm256_loadu_ps(a + j + 56));
  }
  for (; j < n; j += 16) {
    a0l = _mm256_add_ps(a0l, load8(a + j, n - j));
    a0h = _mm256_add_ps(a0h, load8(a + j + 8, n - j - 8));
  }
  s = reduce_add16(_mm256_add_ps(_mm256_add_ps(a0l, a1l), _mm256_add_ps(a2l, a3l)),
                   _mm256_add_ps(_mm256_add_ps(a0h, a1h), _mm256_add_ps(a2h, a3h)));
#endif
  for (; j < n; ++j) s += a[j];
  return s;
}

// sum_j (a[j] - c)^2 over n floats.
inline float row_sq_dev(const float* a, int64_t n, float c) {
  int64_t j = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const __m512 vc = _mm512_set1_ps(c);
  for (; j + 64 <= n; j += 64) {
    const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(a + j), vc), d1 = _mm512_sub_ps(_mm512_loadu_ps(a + j + 16), vc);
    const __m512 d2 = _mm512_sub_ps(_mm512_loadu_ps(a + j + 32), vc), d3 = _mm512_sub_ps(_mm512_loadu_ps(a + j + 48), vc);
    a0 = _mm512_fmadd_ps(d0, d0, a0);
    a1 = _mm512_fmadd_ps(d1, d1, a1);
    a2 = _mm512_fmadd_ps(d2, d2, a2);
    a3 = _mm512_fmadd_ps(d3, d3, a3);
  }
  for (; j < n; j += 16) {
    const __mmask16 l = lanes_of(n - j);
    const __m512 d = _mm512_maskz_sub_ps(l, _mm512_maskz_loadu_ps(l, a + j), vc);
    a0 = _mm512_fmadd_ps(d, d, a0);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(HARMODT_AVX2)
  __m256 a0l = _mm256_setzero_ps(), a0h = a0l, a1l = a0l, a1h = a0l, a2l = a0l, a2h = a0l, a3l = a0l, a3h = a0l;
  const __m256 vc = _mm256_set1_ps(c);
  auto sq = [&](__m256 acc, const float* p) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(p), vc);
    return _mm256_fmadd_ps(d, d, acc);
  };
  for (; j + 64 <= n; j += 64) {
    a0l = sq(a0l, a + j);
    a0h = sq(a0h, a + j + 8);
    a1l = sq(a1l, a + j + 16);
    a1h = sq(a1h, a + j + 24);
    a2l = sq(a2l, a + j + 32);
    a2h = sq(a2h, a + j + 40);
    a3l = sq(a3l, a + j + 48);
    a3h = sq(a3h, a + j + 56);
  }
  for (; j < n; j += 16) {  // the last columns: dead lanes give d = 0
    const __m256 dl = _mm256_and_ps(_mm256_castsi256_ps(tail_mask8(n - j)), _mm256_sub_ps(load8(a + j, n - j), vc));
    const __m256 dh = _mm256_and_ps(_mm256_castsi256_ps(tail_mask8(n - j - 8)), _mm256_sub_ps(load8(a + j + 8, n - j - 8), vc));
    a0l = _mm256_fmadd_ps(dl, dl, a0l);
    a0h = _mm256_fmadd_ps(dh, dh, a0h);
  }
  s = reduce_add16(_mm256_add_ps(_mm256_add_ps(a0l, a1l), _mm256_add_ps(a2l, a3l)),
                   _mm256_add_ps(_mm256_add_ps(a0h, a1h), _mm256_add_ps(a2h, a3h)));
#endif
  for (; j < n; ++j) s += (a[j] - c) * (a[j] - c);
  return s;
}

void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_params(const at::Tensor& x, const at::Tensor& w, const char* op, const char* name) {
  check_input(w, op, name);
  TORCH_CHECK_VALUE(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), op, ": ", name, " must have shape (",
                    x.dim() >= 1 ? x.size(-1) : 0, ",), got ", w.sizes());
}

// y[j] = (x[j] - mu) * rs * w[j] + b[j] over one row, written as float or (rounded to nearest even,
// as a float32 -> bfloat16 cast) bf16.
template <typename TY>
inline void normalize_row(const float* xr, const float* wp, const float* bp, float mu, float rs, int64_t c, TY* yr) {
  int64_t j = 0;
#if defined(HARMODT_AVX512_CVT)
  if constexpr (vector16_ok<TY>()) {  // common.h's store16: fp32, or bf16 rounded to nearest even
    const __m512 vmu = _mm512_set1_ps(mu), vrs = _mm512_set1_ps(rs);
    for (; j < c; j += 16) {
      const __mmask16 l = lanes_of(c - j);
      const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(l, xr + j), vmu), vrs);
      store16(yr + j, _mm512_fmadd_ps(xhat, _mm512_maskz_loadu_ps(l, wp + j), _mm512_maskz_loadu_ps(l, bp + j)), l);
    }
  }
#elif defined(HARMODT_AVX2)
  if constexpr (vector8_ok<TY>()) {  // common.h's store8: fp32, or bf16 rounded to nearest even; the same FMA as AVX-512
    const __m256 vmu = _mm256_set1_ps(mu), vrs = _mm256_set1_ps(rs);
    auto step = [&](auto full, int64_t jj) {
      constexpr bool F = decltype(full)::value;
      const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(ld8<F>(xr + jj, c - jj), vmu), vrs);
      st8<F>(yr + jj, _mm256_fmadd_ps(xhat, ld8<F>(wp + jj, c - jj), ld8<F>(bp + jj, c - jj)), c - jj);
    };
    for (; j + 8 <= c; j += 8) step(std::true_type{}, j);
    if (j < c) step(std::false_type{}, j), j = c;
  }
#endif
  for (; j < c; ++j) yr[j] = static_cast<TY>((xr[j] - mu) * rs * wp[j] + bp[j]);
}

// out_dtype: y's dtype, float32 (default) or bfloat16 (the input of a bf16 GEMM, rounded once here
// instead of in a separate cast); mean and rstd stay float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps,
                                                                  std::optional<at::ScalarType> out_dtype) {
  const char* op = "layer_norm_forward";
  check_input(x, op, "x");
  check_params(x, weight, op, "weight");
  check_params(x, bias, op, "bias");
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  const at::ScalarType yd = out_dtype.value_or(at::kFloat);
  TORCH_CHECK_VALUE(yd == at::kFloat || yd == at::kBFloat16, op, ": out_dtype must be float32 or bfloat16, got ", yd);
  const int64_t c = x.size(-1), m = c == 0 ? 0 : x.numel() / c;
  at::Tensor y = at::empty_like(x, x.options().dtype(yd)), mean = at::empty({m}, x.options()), rstd = at::empty({m}, x.options());
  if (m == 0) return {y, mean, rstd};
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float inv_c = 1.0f / static_cast<float>(c), epsf = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, yd, "layer_norm_forward", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = xp + r * c;
        const float mu = row_sum(xr, c) * inv_c;
        const float rs = 1.0f / std::sqrt(row_sq_dev(xr, c, mu) * inv_c + epsf);
        mp[r] = mu;
        rp[r] = rs;
        normalize_row(xr, wp, bp, mu, rs, c, yp + r * c);
      }
    });
  });
  return {y, mean, rstd};
}

// The rows r0 .. r1 of the backward (see the top of the file); dw/db: this thread's partial sums.
template <typename TG>
void backward_rows(const TG* gp, const float* xp, const float* mp, const float* rp, const float* wp, const float* ep, float* dp,
                   int64_t c, int64_t r0, int64_t r1, float* dw, float* db) {
  const float inv_c = 1.0f / static_cast<float>(c);
  for (int64_t r = r0; r < r1; ++r) {
    const TG* gr = gp + r * c;
    const float* xr = xp + r * c;
    float* dr = dp + r * c;
    const float mu = mp[r], rs = rp[r];
    // pass 1: sum g, sum g * xhat; the weight and bias gradients
    float sg = 0.0f, sgx = 0.0f;
    int64_t j = 0;
#if defined(HARMODT_AVX512_CVT)
    const __m512 vmu = _mm512_set1_ps(mu), vrs = _mm512_set1_ps(rs);
    __m512 asg = _mm512_setzero_ps(), asgx = _mm512_setzero_ps();
    for (; j < c; j += 16) {
      const __mmask16 l = lanes_of(c - j);
      const __m512 dy = load16(gr + j, l);
      const __m512 xhat = _mm512_maskz_mul_ps(l, _mm512_sub_ps(_mm512_maskz_loadu_ps(l, xr + j), vmu), vrs);
      const __m512 g = _mm512_mul_ps(dy, _mm512_maskz_loadu_ps(l, wp + j));
      asg = _mm512_add_ps(asg, g);
      asgx = _mm512_fmadd_ps(g, xhat, asgx);
      _mm512_mask_storeu_ps(dw + j, l, _mm512_fmadd_ps(dy, xhat, _mm512_maskz_loadu_ps(l, dw + j)));
      _mm512_mask_storeu_ps(db + j, l, _mm512_add_ps(dy, _mm512_maskz_loadu_ps(l, db + j)));
    }
    sg = _mm512_reduce_add_ps(asg);
    sgx = _mm512_reduce_add_ps(asgx);
#elif defined(HARMODT_AVX2)
    const __m256 vmu = _mm256_set1_ps(mu), vrs = _mm256_set1_ps(rs);
    __m256 asg[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, asgx[2] = {asg[0], asg[0]};  // the 16 lanes as 2 halves
    auto step1 = [&](auto full, int64_t jj, int h) {
      constexpr bool F = decltype(full)::value;
      const int64_t left = c - jj;
      const __m256 dy = ld8<F>(gr + jj, left);
      __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(ld8<F>(xr + jj, left), vmu), vrs);
      if constexpr (!F) xhat = _mm256_and_ps(_mm256_castsi256_ps(tail_mask8(left)), xhat);  // 0 in dead lanes
      const __m256 g = _mm256_mul_ps(dy, ld8<F>(wp + jj, left));
      asg[h] = _mm256_add_ps(asg[h], g);
      asgx[h] = _mm256_fmadd_ps(g, xhat, asgx[h]);
      st8<F>(dw + jj, _mm256_fmadd_ps(dy, xhat, ld8<F>(dw + jj, left)), left);
      st8<F>(db + jj, _mm256_add_ps(dy, ld8<F>(db + jj, left)), left);
    };
    for (; j + 16 <= c; j += 16) {
      step1(std::true_type{}, j, 0);
      step1(std::true_type{}, j + 8, 1);
    }
    if (j < c) {
      step1(std::false_type{}, j, 0);
      step1(std::false_type{}, j + 8, 1);
      j = c;
    }
    sg = reduce_add16(asg[0], asg[1]);
    sgx = reduce_add16(asgx[0], asgx[1]);
#endif
    for (; j < c; ++j) {
      const float dy = static_cast<float>(gr[j]);
      const float xhat = (xr[j] - mu) * rs, g = dy * wp[j];
      sg += g;
      sgx += g * xhat;
      dw[j] += dy * xhat;
      db[j] += dy;
    }
    // pass 2: dx
    const float a = sg * inv_c, b = sgx * inv_c;
    j = 0;
#if defined(HARMODT_AVX512_CVT)
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    for (; j < c; j += 16) {
      const __mmask16 l = lanes_of(c - j);
      const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(l, xr + j), vmu), vrs);
      const __m512 g = _mm512_mul_ps(load16(gr + j, l), _mm512_maskz_loadu_ps(l, wp + j));
      __m512 d = _mm512_mul_ps(vrs, _mm512_sub_ps(_mm512_sub_ps(g, va), _mm512_mul_ps(xhat, vb)));
      if (ep != nullptr) d = _mm512_add_ps(d, _mm512_maskz_loadu_ps(l, ep + r * c + j));
      _mm512_mask_storeu_ps(dr + j, l, d);
    }
#elif defined(HARMODT_AVX2)
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    auto step2 = [&](auto full, int64_t jj) {
      constexpr bool F = decltype(full)::value;
      const int64_t left = c - jj;
      const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(ld8<F>(xr + jj, left), vmu), vrs);
      const __m256 g = _mm256_mul_ps(ld8<F>(gr + jj, left), ld8<F>(wp + jj, left));
      __m256 d = _mm256_mul_ps(vrs, _mm256_sub_ps(_mm256_sub_ps(g, va), _mm256_mul_ps(xhat, vb)));
      if (ep != nullptr) d = _mm256_add_ps(d, ld8<F>(ep + r * c + jj, left));
      st8<F>(dr + jj, d, left);
    };
    for (; j + 8 <= c; j += 8) step2(std::true_type{}, j);
    if (j < c) step2(std::false_type{}, j), j = c;
#endif
    for (; j < c; ++j) {
      const float xhat = (xr[j] - mu) * rs, g = static_cast<float>(gr[j]) * wp[j];
      dr[j] = rs * ((g - a) - xhat * b) + (ep != nullptr ? ep[r * c + j] : 0.0f);
    }
  }
}

// grad_y: float32, or bfloat16 (a bf16 GEMM's output, widened as it is read); everything else float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& grad_extra) {
  const char* op = "layer_norm_backward";
  check_input(x, op, "x");
  TORCH_CHECK_VALUE(grad_y.device().is_cpu(), op, ": grad_y must be a CPU tensor");
  TORCH_CHECK_VALUE(grad_y.scalar_type() == at::kFloat || grad_y.scalar_type() == at::kBFloat16, op,
                    ": grad_y must be float32 or bfloat16, got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.is_contiguous(), op, ": grad_y must be contiguous");
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), op, ": grad_y has shape ", grad_y.sizes(), ", x has ", x.sizes());
  check_params(x, weight, op, "weight");
  const int64_t c = x.size(-1), m = c == 0 ? 0 : x.numel() / c;
  for (const at::Tensor* t : {&mean, &rstd}) {
    check_input(*t, op, t == &mean ? "mean" : "rstd");
    TORCH_CHECK_VALUE(t->numel() == m, op, ": ", t == &mean ? "mean" : "rstd", " must have one value per row (", m,
                      "), got ", t->sizes());
  }
  const bool extra = grad_extra.has_value() && grad_extra->defined();
  if (extra) {
    check_input(*grad_extra, op, "grad_extra");
    TORCH_CHECK_VALUE(grad_extra->sizes() == x.sizes(), op, ": grad_extra has shape ", grad_extra->sizes(), ", x has ",
                      x.sizes());
  }
  at::Tensor dx = at::empty_like(x);
  const int threads = num_threads();
  std::vector<float> part(static_cast<size_t>(2 * threads * c), 0.0f);  // per thread: dw row, then db row
  if (m > 0) {
    const float* xp = x.data_ptr<float>();
    const float* mp = mean.data_ptr<float>();
    const float* rp = rstd.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    const float* ep = extra ? grad_extra->data_ptr<float>() : nullptr;
    float* dp = dx.data_ptr<float>();
    auto rows = [&](auto* gp) {  // gp: grad_y's data as float* or c10::BFloat16*
      at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
        float* dw = part.data() + static_cast<int64_t>(at::get_thread_num()) * 2 * c;
        backward_rows(gp, xp, mp, rp, wp, ep, dp, c, r0, r1, dw, dw + c);
      });
    };
    if (grad_y.scalar_type() == at::kBFloat16)
      rows(grad_y.data_ptr<c10::BFloat16>());
    else
      rows(grad_y.data_ptr<float>());
  }
  at::Tensor dweight = at::zeros({c}, x.options()), dbias = at::zeros({c}, x.options());
  float* dwp = dweight.data_ptr<float>();
  float* dbp = dbias.data_ptr<float>();
  for (int t = 0; t < threads; ++t)
    for (int64_t j = 0; j < c; ++j) {
      dwp[j] += part[static_cast<size_t>(t * 2 * c + j)];
      dbp[j] += part[static_cast<size_t>(t * 2 * c + c + j)];
    }
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def("layer_norm_forward(Tensor x, Tensor weight, Tensor bias, float eps, ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor? grad_extra) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("layer_norm_forward", &harmodt::layer_norm_forward);
  m.impl("layer_norm_backward", &harmodt::layer_norm_backward);
}
