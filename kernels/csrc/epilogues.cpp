// GEMM epilogues of the training blocks, each one pass over a (M, N) GEMM output whose rows get
// a bias of N columns:
//
//   bias_relu_(z, b)                      z <- relu(z + b)                     (fc, in place)
//   bias_relu_backward(g, h)              dz = g * (h > 0), db = sum_rows dz  (bias_relu_backward_: dz over g)
//   bias_dropout_add(y, b, r, seed, p)    r + dropout(y + b)                   (proj, mlp_proj; bias_dropout_add_: over y)
//   dropout_bias_backward(g, seed, p)     dy = dropout(g), db = sum_rows dy
//   column_sums(g)                        db = sum_rows g                      (a bias gradient alone)
//
// BLAS adds a bias by copying it into every output row before the GEMM (one more pass over the
// output), and ReLU, dropout, the residual add and the bias gradient are each one more pass;
// here each of those chains is one pass while the rows are in cache. The dropout keep mask is
// dropout.cpp's: element i (row-major over y) is kept iff its 16-bit field of
// splitmix(seed, i / 4) is >= round(p * 65536), so `bias_dropout_add` equals
// `r + dropout_apply(y + b, seed, p)` and its backward `dropout_apply(g, seed, p)`.
// Arithmetic in fp32; bf16 tensors are widened on load and rounded to nearest-even on store.
// Bias gradients are fp32 sums (per-thread partial rows, then one sum).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace harmodt {
namespace {

// Column sums: each thread accumulates its rows into its own fp32 row, summed at the end.
struct ColumnSums {
  int64_t n, threads;
  std::vector<float> part;
  explicit ColumnSums(int64_t n_) : n(n_), threads(num_threads()), part(static_cast<size_t>(threads * n_), 0.0f) {}
  float* mine() { return part.data() + static_cast<int64_t>(at::get_thread_num()) * n; }
  at::Tensor total() const {
    at::Tensor out = at::zeros({n}, at::kFloat);
    float* o = out.data_ptr<float>();
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t j = 0; j < n; ++j) o[j] += part[t * n + j];
    return out;
  }
};

std::vector<float> bias_values(const at::Tensor& bias, int64_t n, const char* op) {
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == n, op, ": bias must have shape (", n, ",), got ", bias.sizes());
  TORCH_CHECK_VALUE(bias.scalar_type() == at::kFloat || bias.scalar_type() == at::kBFloat16, op,
                    ": bias must be float32 or bfloat16, got ", bias.scalar_type());
  const at::Tensor b = bias.to(at::kFloat).contiguous();
  return std::vector<float>(b.data_ptr<float>(), b.data_ptr<float>() + n);
}

void check_2d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
                    " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": ", name, " must have at least one dimension");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name, const char* like_name) {
  check_2d(t, op, name);
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), ", ", like_name, " has ", like.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(), ", ", like_name, " is ",
                    like.scalar_type());
}

constexpr int64_t kGrainRows = 16;

// ---- bias + ReLU ------------------------------------------------------------------------------

template <typename T>
void bias_relu_rows(T* z, const float* b, int64_t m, int64_t n) {
  at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = z + r * n;
      row16<vector_ok<T>()>(
          n,
          [&](int64_t j, auto lanes) {
#if defined(HARMODT_AVX512_CVT)
            const __m512 v = _mm512_add_ps(load16(row + j, lanes), _mm512_maskz_loadu_ps(lanes, b + j));
            store16(row + j, _mm512_max_ps(v, _mm512_setzero_ps()), lanes);
#elif defined(HARMODT_AVX2)
            const __m256 v = _mm256_add_ps(load8(row + j), _mm256_loadu_ps(b + j));  // max(v, 0): 0 for NaN, as v > 0 ? v : 0
            store8(row + j, _mm256_max_ps(v, _mm256_setzero_ps()));
#endif
          },
          [&](int64_t j) {
            const float v = static_cast<float>(row[j]) + b[j];
            row[j] = static_cast<T>(v > 0.0f ? v : 0.0f);
          });
    }
  });
}

at::Tensor bias_relu_(at::Tensor z, const at::Tensor& bias) {
  check_2d(z, "bias_relu_", "z");
  const int64_t n = z.size(-1), m = n == 0 ? 0 : z.numel() / n;
  const std::vector<float> b = bias_values(bias, n, "bias_relu_");
  if (m == 0 || n == 0) return z;
  if (z.scalar_type() == at::kFloat)
    bias_relu_rows(z.data_ptr<float>(), b.data(), m, n);
  else
    bias_relu_rows(z.data_ptr<at::BFloat16>(), b.data(), m, n);
  return z;
}

// dz = g * (h > 0) and, with db, its column sums in common.h's kSumRows-row groups (each group's rows
// in order from +0, then the groups in order): the threads split the columns, so the order does not
// depend on their number, and it is the order of the native fp32 GEMM's relu_grad epilogue.
template <typename T>
void relu_grad_rows(const T* g, const T* h, T* dz, float* db, int64_t m, int64_t n) {
  constexpr int64_t kCols = 64;  // columns per parallel block (a multiple of 16)
  at::parallel_for(0, (n + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
    const int64_t j0 = c0 * kCols, w = std::min(n, c1 * kCols) - j0;
    std::vector<float> group(db != nullptr ? w : 0);
    for (int64_t r0 = 0; r0 < m; r0 += kSumRows) {
      if (db != nullptr) std::fill(group.begin(), group.end(), 0.0f);
      float* acc = db != nullptr ? group.data() : nullptr;
      for (int64_t r = r0; r < std::min(m, r0 + kSumRows); ++r) {
        const T* gr = g + r * n + j0;
        const T* hr = h + r * n + j0;
        T* dr = dz + r * n + j0;
        row16<vector_ok<T>()>(
            w,
            [&](int64_t j, auto lanes) {
#if defined(HARMODT_AVX512_CVT)
              const __mmask16 pos = _mm512_mask_cmp_ps_mask(lanes, load16(hr + j, lanes), _mm512_setzero_ps(), _CMP_GT_OQ);
              const __m512 d = _mm512_maskz_mov_ps(pos, load16(gr + j, lanes));
              store16(dr + j, d, lanes);
              if (acc) _mm512_mask_storeu_ps(acc + j, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, acc + j), d));
#elif defined(HARMODT_AVX2)
              const __m256 pos = _mm256_cmp_ps(load8(hr + j), _mm256_setzero_ps(), _CMP_GT_OQ);
              const __m256 d = _mm256_and_ps(pos, load8(gr + j));  // g where h > 0, else +0
              store8(dr + j, d);
              if (acc) _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), d));
#endif
            },
            [&](int64_t j) {
              const float d = static_cast<float>(hr[j]) > 0.0f ? static_cast<float>(gr[j]) : 0.0f;
              dr[j] = static_cast<T>(d);
              if (acc) acc[j] += d;
            });
      }
      if (db != nullptr)
        for (int64_t j = 0; j < w; ++j) db[j0 + j] += group[j];
    }
  });
}

// dz = grad * (out > 0) into `dz` (may be grad itself); returns db (zeros without need_bias).
at::Tensor relu_backward_into(const at::Tensor& grad, const at::Tensor& out, at::Tensor& dz, bool need_bias) {
  const int64_t n = out.size(-1), m = n == 0 ? 0 : out.numel() / n;
  at::Tensor db = at::zeros({n}, at::kFloat);
  if (m > 0 && n > 0) {
    float* d = need_bias ? db.data_ptr<float>() : nullptr;
    if (out.scalar_type() == at::kFloat)
      relu_grad_rows(grad.data_ptr<float>(), out.data_ptr<float>(), dz.data_ptr<float>(), d, m, n);
    else
      relu_grad_rows(grad.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), dz.data_ptr<at::BFloat16>(), d, m, n);
  }
  return db;
}

std::tuple<at::Tensor, at::Tensor> bias_relu_backward(const at::Tensor& grad_in, const at::Tensor& out, bool need_bias) {
  check_2d(out, "bias_relu_backward", "out");
  const at::Tensor grad = grad_in.contiguous();
  check_like(grad, out, "bias_relu_backward", "grad", "out");
  at::Tensor dz = at::empty_like(out);
  at::Tensor db = relu_backward_into(grad, out, dz, need_bias);
  return {dz, db};
}

// The same, written over grad (a fresh GEMM output nobody else reads): no new buffer to fill.
at::Tensor bias_relu_backward_(at::Tensor grad, const at::Tensor& out, bool need_bias) {
  check_2d(out, "bias_relu_backward_", "out");
  check_like(grad, out, "bias_relu_backward_", "grad", "out");
  return relu_backward_into(grad, out, grad, need_bias);
}

// ---- bias + dropout + residual ------------------------------------------------------------------

// out (Tr) = res (Tr) + dropout(y (Ty) + b); under bf16 autocast y is bf16 and the residual fp32.
template <typename Ty, typename Tr>
void bias_dropout_add_rows(const Ty* y, const float* b, const Tr* res, Tr* out, int64_t m, int64_t n, uint64_t seed,
                           uint32_t threshold, float scale) {
  at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      const Ty* yr = y + base;
      const Tr* rr = res + base;
      Tr* orow = out + base;
      dropout_row<vector_ok<Ty>() && vector_ok<Tr>()>(
          seed, threshold, base, n,
          [&](int64_t j, auto lanes, auto keep) {
#if defined(HARMODT_AVX512_CVT)
            const __m512 v = _mm512_add_ps(load16(yr + j, lanes), _mm512_maskz_loadu_ps(lanes, b + j));
            store16(orow + j, _mm512_add_ps(load16(rr + j, lanes), _mm512_maskz_mul_ps(keep, v, _mm512_set1_ps(scale))), lanes);
#elif defined(HARMODT_AVX2)
            const __m256 v = _mm256_add_ps(load8(yr + j), _mm256_loadu_ps(b + j));  // (y + b) * scale where kept, else +0
            const __m256 d = _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_mul_ps(v, _mm256_set1_ps(scale)));
            store8(orow + j, _mm256_add_ps(load8(rr + j), d));
#endif
          },
          [&](int64_t j, bool kept) {
            const float v = kept ? (static_cast<float>(yr[j]) + b[j]) * scale : 0.0f;
            orow[j] = static_cast<Tr>(static_cast<float>(rr[j]) + v);
          });
    }
  });
}

template <typename Ty>
void bias_dropout_add_dispatch(const at::Tensor& y, const float* b, const at::Tensor& res, at::Tensor& out, int64_t m, int64_t n,
                               uint64_t seed, uint32_t threshold, float scale) {
  if (res.scalar_type() == at::kFloat)
    bias_dropout_add_rows(y.data_ptr<Ty>(), b, res.data_ptr<float>(), out.data_ptr<float>(), m, n, seed, threshold, scale);
  else
    bias_dropout_add_rows(y.data_ptr<Ty>(), b, res.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), m, n, seed, threshold,
                          scale);
}

// out = res + dropout(y + b) into `out` (may be y itself when the dtypes agree).
at::Tensor bias_dropout_add_into(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& res, int64_t seed, double p,
                                 at::Tensor out, const char* op) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  check_2d(y, op, "y");
  check_2d(res, op, "residual");
  TORCH_CHECK_VALUE(res.sizes() == y.sizes(), op, ": residual has shape ", res.sizes(), ", y has ", y.sizes());
  const int64_t n = y.size(-1), m = n == 0 ? 0 : y.numel() / n;
  const std::vector<float> b = bias_values(bias, n, op);
  if (!out.defined()) out = at::empty_like(res);
  if (m == 0 || n == 0) return out;
  const uint32_t threshold = static_cast<uint32_t>(std::llround(p * 65536.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  if (y.scalar_type() == at::kFloat)
    bias_dropout_add_dispatch<float>(y, b.data(), res, out, m, n, static_cast<uint64_t>(seed), threshold, scale);
  else
    bias_dropout_add_dispatch<at::BFloat16>(y, b.data(), res, out, m, n, static_cast<uint64_t>(seed), threshold, scale);
  return out;
}

at::Tensor bias_dropout_add(const at::Tensor& y_in, const at::Tensor& bias, const at::Tensor& res_in, int64_t seed, double p) {
  return bias_dropout_add_into(y_in.contiguous(), bias, res_in.contiguous(), seed, p, at::Tensor(), "bias_dropout_add");
}

// The same, written over y (a fresh GEMM output nobody else reads; y and residual of one dtype).
at::Tensor bias_dropout_add_(at::Tensor y, const at::Tensor& bias, const at::Tensor& res_in, int64_t seed, double p) {
  TORCH_CHECK_VALUE(y.is_contiguous(), "bias_dropout_add_: y must be contiguous (it is written in place)");
  TORCH_CHECK_VALUE(y.scalar_type() == res_in.scalar_type(), "bias_dropout_add_: y is ", y.scalar_type(), ", residual is ",
                    res_in.scalar_type(), " (the result is written over y)");
  return bias_dropout_add_into(y, bias, res_in.contiguous(), seed, p, y, "bias_dropout_add_");
}

// dy (Td) = dropout(g (Tg)), and the row sums of dy in fp32.
template <typename Tg, typename Td>
void dropout_grad_rows(const Tg* g, Td* dy, ColumnSums* sums, int64_t m, int64_t n, uint64_t seed, uint32_t threshold, float scale) {
  at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
    float* acc = sums ? sums->mine() : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      const Tg* gr = g + base;
      Td* dr = dy + base;
      dropout_row<vector_ok<Tg>() && vector_ok<Td>()>(
          seed, threshold, base, n,
          [&](int64_t j, auto lanes, auto keep) {
#if defined(HARMODT_AVX512_CVT)
            const __m512 d = _mm512_maskz_mul_ps(keep, load16(gr + j, lanes), _mm512_set1_ps(scale));
            store16(dr + j, d, lanes);
            if (acc) _mm512_mask_storeu_ps(acc + j, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, acc + j), d));
#elif defined(HARMODT_AVX2)
            const __m256 d = _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_mul_ps(load8(gr + j), _mm256_set1_ps(scale)));
            store8(dr + j, d);
            if (acc) _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), d));
#endif
          },
          [&](int64_t j, bool kept) {
            const float d = kept ? static_cast<float>(gr[j]) * scale : 0.0f;
            dr[j] = static_cast<Td>(d);
            if (acc) acc[j] += d;
          });
    }
  });
}

template <typename Tg>
void dropout_grad_dispatch(const at::Tensor& grad, at::Tensor& dy, ColumnSums* sums, int64_t m, int64_t n, uint64_t seed,
                           uint32_t threshold, float scale) {
  if (dy.scalar_type() == at::kFloat)
    dropout_grad_rows(grad.data_ptr<Tg>(), dy.data_ptr<float>(), sums, m, n, seed, threshold, scale);
  else
    dropout_grad_rows(grad.data_ptr<Tg>(), dy.data_ptr<at::BFloat16>(), sums, m, n, seed, threshold, scale);
}

std::tuple<at::Tensor, at::Tensor> dropout_bias_backward(const at::Tensor& grad_in, int64_t seed, double p, bool need_bias,
                                                         at::ScalarType dy_dtype) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_bias_backward: p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(dy_dtype == at::kFloat || dy_dtype == at::kBFloat16, "dropout_bias_backward: dtype must be float32 or bfloat16, got ",
                    dy_dtype);
  const at::Tensor grad = grad_in.contiguous();
  check_2d(grad, "dropout_bias_backward", "grad");
  const int64_t n = grad.size(-1), m = n == 0 ? 0 : grad.numel() / n;
  at::Tensor dy = at::empty(grad.sizes(), grad.options().dtype(dy_dtype));
  ColumnSums sums(need_bias ? n : 0);
  if (m > 0 && n > 0) {
    const uint32_t threshold = static_cast<uint32_t>(std::llround(p * 65536.0));
    const float scale = static_cast<float>(1.0 / (1.0 - p));
    ColumnSums* s = need_bias ? &sums : nullptr;
    if (grad.scalar_type() == at::kFloat)
      dropout_grad_dispatch<float>(grad, dy, s, m, n, static_cast<uint64_t>(seed), threshold, scale);
    else
      dropout_grad_dispatch<at::BFloat16>(grad, dy, s, m, n, static_cast<uint64_t>(seed), threshold, scale);
  }
  return {dy, need_bias ? sums.total() : at::zeros({n}, at::kFloat)};
}

// ---- bias gradient alone ------------------------------------------------------------------------

template <typename T>
void column_sum_rows(const T* g, ColumnSums* sums, int64_t m, int64_t n) {
  at::parallel_for(0, m, kGrainRows, [&](int64_t r0, int64_t r1) {
    float* acc = sums->mine();
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = g + r * n;
      row16<vector_ok<T>()>(
          n,
          [&](int64_t j, auto lanes) {
#if defined(HARMODT_AVX512_CVT)
            _mm512_mask_storeu_ps(acc + j, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, acc + j), load16(gr + j, lanes)));
#elif defined(HARMODT_AVX2)
            _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), load8(gr + j)));
#endif
          },
          [&](int64_t j) { acc[j] += static_cast<float>(gr[j]); });
    }
  });
}

// fp32 sums over the rows of grad (..., N) -> (N,): a bias's gradient. (at::sum with an fp32
// dtype first converts a bf16 input to a whole fp32 copy.)
at::Tensor column_sums(const at::Tensor& grad_in) {
  const at::Tensor grad = grad_in.contiguous();
  check_2d(grad, "column_sums", "grad");
  const int64_t n = grad.size(-1), m = n == 0 ? 0 : grad.numel() / n;
  ColumnSums sums(n);
  if (m > 0 && n > 0) {
    if (grad.scalar_type() == at::kFloat)
      column_sum_rows(grad.data_ptr<float>(), &sums, m, n);
    else
      column_sum_rows(grad.data_ptr<at::BFloat16>(), &sums, m, n);
  }
  return sums.total();
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def("column_sums(Tensor grad) -> Tensor");
  m.def("bias_relu_(Tensor(a!) z, Tensor bias) -> Tensor(a!)");
  m.def("bias_relu_backward(Tensor grad, Tensor out, bool need_bias) -> (Tensor, Tensor)");
  m.def("bias_relu_backward_(Tensor(a!) grad, Tensor out, bool need_bias) -> Tensor");
  m.def("bias_dropout_add(Tensor y, Tensor bias, Tensor residual, int seed, float p) -> Tensor");
  m.def("bias_dropout_add_(Tensor(a!) y, Tensor bias, Tensor residual, int seed, float p) -> Tensor(a!)");
  m.def("dropout_bias_backward(Tensor grad, int seed, float p, bool need_bias, ScalarType dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("bias_relu_", &harmodt::bias_relu_);
  m.impl("bias_relu_backward", &harmodt::bias_relu_backward);
  m.impl("bias_relu_backward_", &harmodt::bias_relu_backward_);
  m.impl("bias_dropout_add", &harmodt::bias_dropout_add);
  m.impl("bias_dropout_add_", &harmodt::bias_dropout_add_);
  m.impl("dropout_bias_backward", &harmodt::dropout_bias_backward);
  m.impl("column_sums", &harmodt::column_sums);
}
