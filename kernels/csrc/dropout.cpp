// Counter-based dropout on the CPU, alone (harmodt_kernels::counter_dropout) and as masked_linear's
// epilogue: the keep bit of element i is a hash of (i, seed) (common.h, counter_bits), so nothing
// is stored for the backward, which recomputes the bits. kernels/reference.py's dropout and
// counter_keep define the same bits in plain PyTorch.
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"

namespace harmodt {
namespace {

constexpr int64_t kGrain = int64_t(1) << 15;  // elements per parallel chunk

uint32_t threshold(double p) { return static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0)); }

inline float load(const float* v, int64_t i) { return v[i]; }
inline float load(const at::BFloat16* v, int64_t i) { return static_cast<float>(v[i]); }
inline void store(float* v, int64_t i, float x) { v[i] = x; }
inline void store(at::BFloat16* v, int64_t i, float x) { v[i] = at::BFloat16(x); }

// out[i] = keep(i) ? relu?(in[i]) * scale : 0 (a kept value rounds to T after the multiply; with
// p == 0 no multiply). relu(x) = x > 0 ? x : (x is NaN ? x : 0), as torch.relu.
template <typename T>
void forward_loop(const T* in, T* out, int64_t n, const Epilogue& e) {
  const uint32_t k0 = static_cast<uint32_t>(e.seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(e.seed) >> 32);
  const uint32_t thr = threshold(e.p);
  const float scale = static_cast<float>(1.0 / (1.0 - e.p));
  const bool relu = e.relu, drop = e.p > 0.0;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float v = load(in, i);
      if (relu) v = (v > 0.0f || v != v) ? v : 0.0f;
      if (drop) v = counter_bits(static_cast<uint32_t>(i), k0, k1) >= thr ? v * scale : 0.0f;
      store(out, i, v);
    }
  });
}

// g_in[i] = keep(i) ? g[i] * scale : 0, then 0 where relu and !(out[i] > 0).
template <typename T>
void backward_loop(const T* g, const T* out, T* gin, int64_t n, const Epilogue& e) {
  const uint32_t k0 = static_cast<uint32_t>(e.seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(e.seed) >> 32);
  const uint32_t thr = threshold(e.p);
  const float scale = static_cast<float>(1.0 / (1.0 - e.p));
  const bool drop = e.p > 0.0;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float v = load(g, i);
      if (drop) v = counter_bits(static_cast<uint32_t>(i), k0, k1) >= thr ? v * scale : 0.0f;
      if (out != nullptr) v = load(out, i) > 0.0f ? v : 0.0f;
      store(gin, i, v);
    }
  });
}

// forward_loop over a float32 or bfloat16 tensor: from in to out (the same shape and dtype, both
// contiguous; out may be in).
void forward_into(const at::Tensor& in, at::Tensor& out, const Epilogue& e) {
  if (in.scalar_type() == at::kFloat)
    forward_loop(in.const_data_ptr<float>(), out.data_ptr<float>(), in.numel(), e);
  else
    forward_loop(in.const_data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), in.numel(), e);
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), op, ": ", name,
                    " must be a float32 or bfloat16 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor counter_dropout(const at::Tensor& x, double p, int64_t seed) {
  check_float(x, "counter_dropout", "x");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "counter_dropout: p must be in [0, 1), got ", p);
  const at::Tensor in = x.contiguous();
  at::Tensor y = at::empty_like(in);  // written in one pass from the input (no copy first)
  if (in.numel() == 0) return y;
  forward_into(in, y, Epilogue{false, p, seed});
  return y;
}

}  // namespace

void epilogue_forward_(at::Tensor& y, const Epilogue& e) {
  if (!e.active() || y.numel() == 0) return;
  TORCH_CHECK(y.is_contiguous(), "epilogue: the output must be contiguous");
  forward_into(y, y, e);
}

at::Tensor epilogue_backward(const at::Tensor& g_in, const std::optional<at::Tensor>& out_in, const Epilogue& e) {
  const at::Tensor g = g_in.contiguous();
  if (!e.active()) return g;
  check_float(g, "epilogue_backward", "grad");
  const at::Tensor out = e.relu && out_in.has_value() ? out_in->to(g.scalar_type()).contiguous() : at::Tensor();
  TORCH_CHECK_VALUE(!e.relu || (out.defined() && out.numel() == g.numel()), "epilogue_backward: relu needs the output of g's shape");
  at::Tensor gin = at::empty_like(g);
  if (g.numel() == 0) return gin;
  if (g.scalar_type() == at::kFloat)
    backward_loop(g.const_data_ptr<float>(), out.defined() ? out.const_data_ptr<float>() : nullptr, gin.data_ptr<float>(), g.numel(), e);
  else
    backward_loop(g.const_data_ptr<at::BFloat16>(), out.defined() ? out.const_data_ptr<at::BFloat16>() : nullptr,
                  gin.data_ptr<at::BFloat16>(), g.numel(), e);
  return gin;
}

}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) { m.impl("counter_dropout", &harmodt::counter_dropout); }
