// Shared helpers of the harmodt native CPU ops: the packed mask format.
//
// A bool mask [..., K] is stored as int32 words [..., ceil(K/32)]: bit j % 32 of word j / 32 is
// column j; padding bits past K are zero (kernels/reference.py's pack_masks).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace harmodt {

inline int64_t num_words(int64_t k) { return (k + 31) / 32; }

// Mask of the valid bits of the last word of a K-bit row (all ones when K % 32 == 0).
inline uint32_t last_word_mask(int64_t k) {
  const int64_t r = k % 32;
  return r == 0 ? 0xFFFFFFFFu : ((1u << r) - 1u);
}

inline int num_threads() { return at::get_num_threads(); }

// The packed words of an int32 tensor, read as unsigned bits.
inline const uint32_t* mask_words(const at::Tensor& words) { return reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()); }

}  // namespace harmodt
