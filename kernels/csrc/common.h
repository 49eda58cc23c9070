// Shared helpers for the harmodt native CPU ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace harmodt {

inline int64_t num_words(int64_t k) { return (k + 31) / 32; }

// Mask of the valid bits of the last word of a K-bit row (all ones when K % 32 == 0).
inline uint32_t last_word_mask(int64_t k) {
  const int64_t r = k % 32;
  return r == 0 ? 0xFFFFFFFFu : ((1u << r) - 1u);
}

inline int num_threads() { return at::get_num_threads(); }

// One row of K columns through its packed mask words (bit j % 32 of word j / 32 is column j).
// With AVX-512, 16 bits of a word are the lane mask of one zero-masked load or masked add.

// out[j] = bit j ? src[j] : 0 (a select: masked inf/nan give 0); out may be src.
inline void select_row_bits(const float* src, const uint32_t* words, int64_t k, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= k; j += 16)
    _mm512_storeu_ps(out + j, _mm512_maskz_loadu_ps(static_cast<__mmask16>(words[j >> 5] >> (j & 31)), src + j));
#endif
  for (; j < k; ++j) out[j] = ((words[j >> 5] >> (j & 31)) & 1u) ? src[j] : 0.0f;
}

// dst[j] += src[j] where bit j is set (dst untouched elsewhere).
inline void add_row_bits(const float* src, const uint32_t* words, int64_t k, float* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= k; j += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(words[j >> 5] >> (j & 31));
    const __m512 d = _mm512_loadu_ps(dst + j);
    _mm512_storeu_ps(dst + j, _mm512_mask_add_ps(d, lanes, d, _mm512_maskz_loadu_ps(lanes, src + j)));
  }
#endif
  for (; j < k; ++j)
    if ((words[j >> 5] >> (j & 31)) & 1u) dst[j] += src[j];
}

}  // namespace harmodt
