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
  // Blocks of 4 elements share one 64-bit draw; parallel chunks start on a block boundary.
  const int64_t blocks = (n + 3) / 4;
  at::parallel_for(0, blocks, 4096, [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      const __m512i thr = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold > 0xFFFF ? 0xFFFF : threshold)));
      const __m512 vscale = _mm512_set1_ps(scale);
      if (threshold <= 0xFFFF) {
        for (; b + 8 <= b1 && (b + 8) * 4 <= n; b += 8) {
          const __mmask32 keep = _mm512_cmpge_epu16_mask(splitmix8(seed, b), thr);
          const int64_t i0 = b * 4;
          _mm512_storeu_ps(y + i0, _mm512_maskz_mul_ps(static_cast<__mmask16>(keep), _mm512_loadu_ps(x + i0), vscale));
          _mm512_storeu_ps(y + i0 + 16, _mm512_maskz_mul_ps(static_cast<__mmask16>(keep >> 16), _mm512_loadu_ps(x + i0 + 16), vscale));
        }
      }
    }
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {  // widen to fp32, scale, round back (RNE)
      const __m512i thr = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(threshold > 0xFFFF ? 0xFFFF : threshold)));
      const __m512 vscale = _mm512_set1_ps(scale);
      const uint16_t* xs = reinterpret_cast<const uint16_t*>(x);
      uint16_t* ys = reinterpret_cast<uint16_t*>(y);
      auto widen = [](const uint16_t* src) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
      };
      if (threshold <= 0xFFFF) {
        for (; b + 8 <= b1 && (b + 8) * 4 <= n; b += 8) {
          const __mmask32 keep = _mm512_cmpge_epu16_mask(splitmix8(seed, b), thr);
          const int64_t i0 = b * 4;
          const __m256bh lo = _mm512_cvtneps_pbh(_mm512_maskz_mul_ps(static_cast<__mmask16>(keep), widen(xs + i0), vscale));
          const __m256bh hi = _mm512_cvtneps_pbh(_mm512_maskz_mul_ps(static_cast<__mmask16>(keep >> 16), widen(xs + i0 + 16), vscale));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ys + i0), reinterpret_cast<const __m256i&>(lo));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ys + i0 + 16), reinterpret_cast<const __m256i&>(hi));
        }
      }
    }
#endif
#endif
    for (; b < b1; ++b) {
      const uint64_t h = splitmix(seed, static_cast<uint64_t>(b));
      const int64_t i0 = b * 4;
      const int64_t lim = i0 + 4 <= n ? 4 : n - i0;
      for (int64_t q = 0; q < lim; ++q) {
        const uint32_t r = static_cast<uint32_t>((h >> (16 * q)) & 0xFFFFu);
        const float v = static_cast<float>(x[i0 + q]) * scale;
        y[i0 + q] = static_cast<scalar_t>(r >= threshold ? v : 0.0f);
      }
    }
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
