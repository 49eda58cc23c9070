// pack_masks / unpack_masks: bool [..., K] <-> int32 words [..., ceil(K/32)];
// bit j % 32 of word j / 32 is column j, padding bits are zero.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace harmodt {
namespace {

at::Tensor pack_masks(const at::Tensor& mask_in) {
  TORCH_CHECK_VALUE(mask_in.scalar_type() == at::kBool, "pack_masks: mask must be bool, got ", mask_in.scalar_type());
  TORCH_CHECK_VALUE(mask_in.dim() >= 1, "pack_masks: mask must have at least one dimension");
  const at::Tensor mask = mask_in.contiguous();
  const int64_t k = mask.size(-1);
  const int64_t w = num_words(k);
  auto out_shape = mask.sizes().vec();
  out_shape.back() = w;
  at::Tensor out = at::empty(out_shape, mask.options().dtype(at::kInt));
  const int64_t rows = k == 0 ? 0 : mask.numel() / k;
  if (rows == 0 || w == 0) return out;
  const uint8_t* src = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (rows > grain)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* s = src + r * k;
    uint32_t* d = dst + r * w;
    const int64_t full = k / 32;
    for (int64_t i = 0; i < full; ++i) {
      uint32_t word = 0;
      for (int j = 0; j < 32; ++j) word |= uint32_t(s[i * 32 + j] != 0) << j;
      d[i] = word;
    }
    if (full < w) {
      uint32_t word = 0;
      for (int64_t j = 0; j < k - full * 32; ++j) word |= uint32_t(s[full * 32 + j] != 0) << j;
      d[full] = word;
    }
  }
  return out;
}

at::Tensor unpack_masks(const at::Tensor& words_in, int64_t k) {
  TORCH_CHECK_VALUE(words_in.scalar_type() == at::kInt, "unpack_masks: words must be int32, got ",
                    words_in.scalar_type());
  TORCH_CHECK_VALUE(words_in.dim() >= 1, "unpack_masks: words must have at least one dimension");
  TORCH_CHECK_VALUE(k >= 0, "unpack_masks: k must be >= 0, got ", k);
  const int64_t w = num_words(k);
  TORCH_CHECK_VALUE(words_in.size(-1) == w, "unpack_masks: ", words_in.size(-1), " words cannot hold K=", k,
                    " bits (need ", w, ")");
  const at::Tensor words = words_in.contiguous();
  auto out_shape = words.sizes().vec();
  out_shape.back() = k;
  at::Tensor out = at::empty(out_shape, words.options().dtype(at::kBool));
  const int64_t rows = w == 0 ? 0 : words.numel() / w;
  if (rows == 0 || k == 0) return out;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  uint8_t* dst = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (rows > grain)
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* s = src + r * w;
    uint8_t* d = dst + r * k;
    const int64_t full = k / 32;
    for (int64_t i = 0; i < full; ++i) {
      const uint32_t word = s[i];
      for (int j = 0; j < 32; ++j) d[i * 32 + j] = uint8_t((word >> j) & 1u);
    }
    for (int64_t j = full * 32; j < k; ++j) d[j] = uint8_t((s[full] >> (j - full * 32)) & 1u);
  }
  return out;
}

// out = where(mask, src, 0) for fp32 tensors; out may be src (in place). mask is bool of src's
// shape, or its bit-packed int32 words [..., ceil(K/32)] (8x less to read). The forward W * M of a
// training step's masked weights and the backward grad * M (Eq. 4), one vectorized pass each
// (torch.where / masked_fill_ with a negated mask take two passes and an allocation).
// With sq given, also returns the sum of squares of the written out (per parallel chunk in fp32,
// chunks summed in double).
template <typename Ts, typename To>
double select_rows_cvt(const Ts* s, const uint32_t* words, int64_t rows, int64_t k, To* o, bool sq) {
  std::vector<double> parts(static_cast<size_t>(num_threads()), 0.0);
  const int64_t w = num_words(k);
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    double acc = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      const Ts* sr = s + r * k;
      const uint32_t* wr = words + r * w;
      To* orow = o + r * k;
      int64_t j = 0;
#if defined(HARMODT_AVX512_CVT)
      if constexpr (vector16_ok<Ts>() && vector16_ok<To>()) {
        __m512 vsq = _mm512_setzero_ps();
        for (; j < k; j += 16) {
          const __mmask16 live = tail_mask(k - j);
          const __m512 v = load16(sr + j, static_cast<__mmask16>(live & (wr[j >> 5] >> (j & 31))));  // zero outside the mask
          store16(orow + j, v, live);
          vsq = _mm512_fmadd_ps(v, v, vsq);
        }
        acc += static_cast<double>(_mm512_reduce_add_ps(vsq));
      }
#elif defined(HARMODT_AVX2)
      if constexpr (vector8_ok<Ts>() && vector8_ok<To>()) {
        __m256 sq_lo = _mm256_setzero_ps(), sq_hi = _mm256_setzero_ps();  // the 16 lanes of the AVX-512 path's sum
        for (; j < k; j += 16) {
          const uint32_t bits = wr[j >> 5] >> (j & 31);
          const __m256 m0 = _mm256_castsi256_ps(bits8(bits)), m1 = _mm256_castsi256_ps(bits8(bits >> 8));
          __m256 lo, hi;  // zero outside the mask
          if (j + 16 <= k) {
            lo = _mm256_and_ps(m0, load8(sr + j));
            hi = _mm256_and_ps(m1, load8(sr + j + 8));
            store8(orow + j, lo);
            store8(orow + j + 8, hi);
          } else {  // the last columns: only the live lanes are read and written
            lo = _mm256_and_ps(m0, load8(sr + j, k - j));
            hi = _mm256_and_ps(m1, load8(sr + j + 8, k - j - 8));
            store8(orow + j, lo, k - j);
            store8(orow + j + 8, hi, k - j - 8);
          }
          sq_lo = _mm256_fmadd_ps(lo, lo, sq_lo);
          sq_hi = _mm256_fmadd_ps(hi, hi, sq_hi);
        }
        acc += static_cast<double>(reduce_add16(sq_lo, sq_hi));
      }
#endif
      for (; j < k; ++j) {
        const float v = ((wr[j >> 5] >> (j & 31)) & 1u) ? static_cast<float>(sr[j]) : 0.0f;
        orow[j] = static_cast<To>(v);
        acc += static_cast<double>(v) * v;
      }
    }
    if (sq) parts[at::get_thread_num()] += acc;
  });
  double total = 0.0;
  for (double v : parts) total += v;
  return total;
}

// With sq given, also returns the sum of squares of the written out (per parallel chunk in fp32,
// chunks summed in double; out must then be float32). Besides fp32 -> fp32, a packed mask also
// converts fp32 -> bf16 (the step's W * M straight in autocast's dtype) and bf16 -> fp32 (its
// gradient back to the weight's dtype).
double apply_mask_impl(at::Tensor& out, const at::Tensor& src, const at::Tensor& mask, bool sq) {
  const bool packed = mask.scalar_type() == at::kInt;
  const bool same = src.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat;
  const bool cvt = packed && ((src.scalar_type() == at::kFloat && out.scalar_type() == at::kBFloat16) ||
                              (src.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kFloat));
  TORCH_CHECK_VALUE(same || cvt, "apply_mask_: src and out must be float32 (or, with a packed mask, one of them bfloat16), got ",
                    src.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK_VALUE(!sq || out.scalar_type() == at::kFloat, "apply_masks_sq_norms_: out must be float32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(packed || mask.scalar_type() == at::kBool, "apply_mask_: mask must be bool or packed int32, got ",
                    mask.scalar_type());
  TORCH_CHECK_VALUE(src.dim() >= 1 && out.sizes() == src.sizes(), "apply_mask_: src ", src.sizes(), " and out ",
                    out.sizes(), " must have one shape (at least 1-D)");
  const int64_t k = src.size(-1);
  if (packed) {
    auto want = src.sizes().vec();
    want.back() = num_words(k);
    TORCH_CHECK_VALUE(mask.sizes() == at::IntArrayRef(want), "apply_mask_: packed mask ", mask.sizes(),
                      " does not fit src ", src.sizes(), " (needs ", at::IntArrayRef(want), ")");
  } else {
    TORCH_CHECK_VALUE(mask.sizes() == src.sizes(), "apply_mask_: mask ", mask.sizes(), " and src ", src.sizes(),
                      " must have one shape");
  }
  TORCH_CHECK_VALUE(src.is_contiguous() && mask.is_contiguous() && out.is_contiguous(),
                    "apply_mask_: src, mask and out must be contiguous");
  const int64_t n = src.numel();
  if (n == 0) return 0.0;
  if (cvt) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
    if (src.scalar_type() == at::kFloat)
      return select_rows_cvt(src.data_ptr<float>(), words, n / k, k, out.data_ptr<c10::BFloat16>(), sq);
    return select_rows_cvt(src.data_ptr<c10::BFloat16>(), words, n / k, k, out.data_ptr<float>(), sq);
  }
  const float* s = src.data_ptr<float>();
  float* o = out.data_ptr<float>();
  std::vector<double> parts(static_cast<size_t>(num_threads()), 0.0);  // per-thread sums of squares
  auto add_squares = [&](const float* x, int64_t len) {  // 16 fp32 lanes (or a double), summed in double
    double acc = 0.0;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 v = _mm512_setzero_ps();
    for (; i + 16 <= len; i += 16) {
      const __m512 xi = _mm512_loadu_ps(x + i);
      v = _mm512_fmadd_ps(xi, xi, v);
    }
    acc = static_cast<double>(_mm512_reduce_add_ps(v));
#elif defined(HARMODT_AVX2)
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // the 16 lanes of the AVX-512 path
    for (; i + 16 <= len; i += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      lo = _mm256_fmadd_ps(x0, x0, lo);
      hi = _mm256_fmadd_ps(x1, x1, hi);
    }
    acc = static_cast<double>(reduce_add16(lo, hi));
#endif
    for (; i < len; ++i) acc += static_cast<double>(x[i]) * x[i];
    parts[at::get_thread_num()] += acc;
  };
  if (!packed) {
    const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      for (; i + 16 <= end; i += 16) {  // 16 mask bytes -> a 16-bit lane mask -> zero-masked load
        const __mmask16 lanes = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i)),
                                                   _mm_set1_epi8(static_cast<char>(0xFF)));
        _mm512_storeu_ps(o + i, _mm512_maskz_loadu_ps(lanes, s + i));
      }
#elif defined(HARMODT_AVX2)
      for (; i + 8 <= end; i += 8) {  // 8 mask bytes -> 8 lanes (all ones where the byte is nonzero) -> and
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + i)));
        const __m256 lanes = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
        _mm256_storeu_ps(o + i, _mm256_and_ps(lanes, _mm256_loadu_ps(s + i)));
      }
#endif
      for (; i < end; ++i) o[i] = m[i] ? s[i] : 0.0f;
      if (sq) add_squares(o + begin, end - begin);
    });
  } else {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
    const int64_t w = num_words(k), rows = n / k;
#if defined(HARMODT_AVX512_GEMM) || defined(HARMODT_AVX2)
    if (sq) {
      // The sum of squares in the blocks of kSumRows rows x 16 columns of the native fp32 GEMM's
      // masked_grad epilogue (gemm_avx512.cpp, gemm_avx2.cpp), so a weight gradient masked there and
      // one masked here give the same bits: per block, fp32 lanes over its rows in order (AVX-512:
      // 16 lanes, reduced as _mm512_reduce_add_ps; AVX2: 8 lanes over each row's two halves, reduced
      // as reduce_add16); the blocks' values summed in double, row block by row block.
      const int64_t tiles = (rows + kSumRows - 1) / kSumRows, panels = (k + 15) / 16;
      std::vector<float> block(static_cast<size_t>(tiles * panels));
      at::parallel_for(0, tiles, std::max<int64_t>(1, (1 << 15) / (kSumRows * k)), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * kSumRows, r1 = std::min(rows, r0 + kSumRows);
          for (int64_t r = r0; r < r1; ++r) select_row_bits(s + r * k, words + r * w, k, o + r * k);
          for (int64_t p = 0; p < panels; ++p) {
            const int64_t n0 = p * 16, nc = std::min<int64_t>(16, k - n0);
#if defined(HARMODT_AVX512_GEMM)
            __m512 sum = _mm512_setzero_ps();
            for (int64_t r = r0; r < r1; ++r) {
              const __m512 v = load16(o + r * k + n0, tail_mask(nc));
              sum = _mm512_fmadd_ps(v, v, sum);
            }
            block[t * panels + p] = _mm512_reduce_add_ps(sum);
#else
            __m256 sum = _mm256_setzero_ps();
            for (int64_t r = r0; r < r1; ++r)
              for (int64_t h = 0; h < (nc > 8 ? 2 : 1); ++h) {
                const __m256 v = load8(o + r * k + n0 + 8 * h, nc - 8 * h);
                sum = _mm256_fmadd_ps(v, v, sum);
              }
            block[t * panels + p] = reduce_add16(sum, _mm256_setzero_ps());
#endif
          }
        }
      });
      double total = 0.0;
      for (float v : block) total += static_cast<double>(v);
      return total;
    }
#endif
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 15) / k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        select_row_bits(s + r * k, words + r * w, k, o + r * k);
        if (sq) add_squares(o + r * k, k);  // the row is in L1
      }
    });
  }
  double total = 0.0;
  for (double v : parts) total += v;
  return total;
}

void apply_mask_(at::Tensor out, const at::Tensor& src, const at::Tensor& mask) { apply_mask_impl(out, src, mask, false); }

// apply_mask_ over lists (one call for all of a model's masked matrices).
void apply_masks_(at::TensorList out, at::TensorList src, at::TensorList mask) {
  TORCH_CHECK_VALUE(out.size() == src.size() && src.size() == mask.size(), "apply_masks_: got ", out.size(), " outputs, ",
                    src.size(), " sources and ", mask.size(), " masks");
  for (size_t i = 0; i < out.size(); ++i) apply_mask_(out[i], src[i], mask[i]);
}

// apply_masks_, also returning each output's sum of squares (float64 [len]): the backward masks a
// training step's weight gradients and gradient clipping gets their norms from the same pass.
at::Tensor apply_masks_sq_norms_(at::TensorList out, at::TensorList src, at::TensorList mask) {
  TORCH_CHECK_VALUE(out.size() == src.size() && src.size() == mask.size(), "apply_masks_sq_norms_: got ", out.size(),
                    " outputs, ", src.size(), " sources and ", mask.size(), " masks");
  at::Tensor sq = at::empty({static_cast<int64_t>(out.size())}, at::kDouble);
  double* q = sq.data_ptr<double>();
  for (size_t i = 0; i < out.size(); ++i) {
    at::Tensor o = out[i];
    q[i] = apply_mask_impl(o, src[i], mask[i], true);
  }
  return sq;
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("apply_mask_", &harmodt::apply_mask_);
  m.impl("apply_masks_", &harmodt::apply_masks_);
  m.impl("apply_masks_sq_norms_", &harmodt::apply_masks_sq_norms_);
  m.impl("pack_masks", &harmodt::pack_masks);
  m.impl("unpack_masks", &harmodt::unpack_masks);
}
