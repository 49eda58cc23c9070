// Shared helpers for the harmodt native CPU ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

namespace harmodt {

inline int64_t num_words(int64_t k) { return (k + 31) / 32; }

// Mask of the valid bits of the last word of a K-bit row (all ones when K % 32 == 0).
inline uint32_t last_word_mask(int64_t k) {
  const int64_t r = k % 32;
  return r == 0 ? 0xFFFFFFFFu : ((1u << r) - 1u);
}

inline int num_threads() { return at::get_num_threads(); }

}  // namespace harmodt
