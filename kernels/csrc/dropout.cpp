// Dropout with a counter-based keep mask: nothing is stored between forward and backward.
//
// Element i of a call with seed s is kept iff bits 16*(i%4) .. 16*(i%4)+15 of
// splitmix64_output(s, i/4) are >= threshold, where splitmix64_output(s, j) = mix(s + (j+1) * golden)
// is the j-th output of the SplitMix64 generator started at s. Keep probability
// 1 - threshold / 65536 (threshold = round(p * 65536)). The backward applies the same mask to the
// gradient by calling the op again with the same seed. kernels/reference.py computes the same mask
// with torch integer ops (the tests compare them bit for bit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace harmodt {
namespace {

template <typename scalar_t>
void apply(const scalar_t* x, scalar_t* y, int64_t n, uint64_t seed, uint32_t threshold, float scale) {
  at::parallel_for(0, (n + 3) / 4, 1 << 12, [&](int64_t b0, int64_t b1) {  // chunks of whole 4-element blocks
    const int64_t i0 = 4 * b0, i1 = std::min(n, 4 * b1);
    dropout_row<vector_ok<scalar_t>()>(
        seed, threshold, i0, i1 - i0,
        [&](int64_t j, auto lanes, auto keep) {
#if defined(HARMODT_AVX512_CVT)
          store16(y + i0 + j, _mm512_maskz_mul_ps(keep, load16(x + i0 + j, lanes), _mm512_set1_ps(scale)), lanes);
#elif defined(HARMODT_AVX2)
          store8(y + i0 + j, _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_mul_ps(load8(x + i0 + j), _mm256_set1_ps(scale))));
#endif
        },
        [&](int64_t j, bool kept) { y[i0 + j] = static_cast<scalar_t>(kept ? static_cast<float>(x[i0 + j]) * scale : 0.0f); });
  });
}

at::Tensor dropout_apply(const at::Tensor& x_in, int64_t seed, double p) {
  TORCH_CHECK_VALUE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
                    "dropout_apply: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_apply: p must be in [0, 1), got ", p);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const uint32_t threshold = static_cast<uint32_t>(std::llround(p * 65536.0));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const uint64_t s = static_cast<uint64_t>(seed);
  if (x.scalar_type() == at::kFloat) {
    apply(x.data_ptr<float>(), y.data_ptr<float>(), n, s, threshold, scale);
  } else {
    apply(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), n, s, threshold, scale);
  }
  return y;
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) { m.def("dropout_apply(Tensor x, int seed, float p) -> Tensor"); }

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) { m.impl("dropout_apply", &harmodt::dropout_apply); }
