// Shared helpers of the harmodt native CPU ops: the packed mask format.
//
// A bool mask [..., K] is stored as int32 words [..., ceil(K/32)]: bit j % 32 of word j / 32 is
// column j; padding bits past K are zero (kernels/reference.py's pack_masks).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>

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

namespace harmodt {

// Counter-based dropout (kernels/reference.py defines the bits): element i (its row-major index,
// modulo 2^32) of a tensor is kept iff counter_bits(i, seed) >= floor(p * 2^32); a kept element is
// multiplied by 1 / (1 - p). Two rounds of MurmurHash3's 32-bit finalizer.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

inline uint32_t counter_bits(uint32_t i, uint32_t k0, uint32_t k1) { return fmix32(fmix32(i * 0x9E3779B1u ^ k0) ^ k1); }

// What follows the GEMM of masked_linear (or stands alone as the dropout op): ReLU, then dropout.
struct Epilogue {
  bool relu = false;
  double p = 0.0;
  int64_t seed = 0;
  bool active() const { return relu || p > 0.0; }
};

// y (contiguous, float32 or bfloat16) <- dropout(relu?(y)) in place.
void epilogue_forward_(at::Tensor& y, const Epilogue& e);
// The gradient before the epilogue from the gradient after it: out is the epilogue's output
// (needed for ReLU: its gradient passes where out > 0). Returns a new contiguous tensor of g's dtype.
at::Tensor epilogue_backward(const at::Tensor& g, const std::optional<at::Tensor>& out, const Epilogue& e);

}  // namespace harmodt
