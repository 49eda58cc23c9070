// pack_masks / unpack_masks: bool [..., K] <-> int32 words [..., ceil(K/32)];
// bit j % 32 of word j / 32 is column j, padding bits are zero.
#include <torch/library.h>

#include "common.h"

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

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("pack_masks", &harmodt::pack_masks);
  m.impl("unpack_masks", &harmodt::unpack_masks);
}
