// masked_linear on the CPU: y[r] = x[r] @ (W * M[task_ids[r]])^T + b, with the backward
// dX[r] = dY[r] @ (W * M_t), dW = sum_t M_t * (dY_t^T X_t), db = sum_r dY[r], for a single task or
// a mixed-task batch, without a [T, N, K] stack of masked weights; then the epilogue in one pass over
// y: ReLU and counter-based dropout (dropout.cpp) when asked.
//
// Rows are grouped by task with a stable counting sort (task_ids of shape [1]: every row is that
// task, no grouping). When the rows are not already in task order, x (and dY) are gathered into
// task order once and the outputs scattered back once, so each task's rows are one contiguous
// block. For each task present, W * M_t is expanded from the packed bits into one reused [N, K]
// buffer and the task's block goes through one ATen GEMM (at::addmm_out / at::mm_out: oneDNN or
// MKL underneath, with their own threads).
//
// Weight gradient: dY_t^T X_t of each task goes through one GEMM into a reused [N, K] buffer and
// one native pass masks it into dW (and adds it unmasked into task_grads[t] when asked). With one
// task present (the usual training batch) the buffer is masked in place and becomes dW; with
// several, the masked products are summed in fp32.
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace harmodt {
namespace {

// Rows per parallel chunk of an element-wise pass over an [N, K] matrix: the model's matrices
// (<= 256 x 1024) stay on one thread, where a fork/join costs more than the pass itself.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(k, 1)); }

// out[r, j] = bit j of row r's mask words ? w[r, j] : 0 on the raw bits of the element type
// (uint32_t for fp32, uint16_t for bf16; all-zero bits are +0.0 in both), so a masked inf or NaN
// weight gives 0 as torch.where does. The integer select vectorizes.
template <typename U>
void select_bits(const U* w, const uint32_t* words, int64_t rows, int64_t k, U* out) {
  const int64_t nw = num_words(k);
  at::parallel_for(0, rows, row_grain(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < nw; ++i) {
        const uint32_t bits = words[r * nw + i];
        const int64_t base = r * k + i * 32, lim = std::min<int64_t>(32, k - i * 32);
        for (int64_t b = 0; b < lim; ++b) out[base + b] = ((bits >> b) & 1u) ? w[base + b] : U(0);
      }
  });
}

// Task t's W * M_t into out ([N, K], weight's dtype).
void expand_task(const at::Tensor& weight, const at::Tensor& masks, int64_t t, at::Tensor& out) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const uint32_t* words = mask_words(masks) + t * n * num_words(k);
  if (weight.scalar_type() == at::kFloat)
    select_bits(static_cast<const uint32_t*>(weight.const_data_ptr()), words, n, k, static_cast<uint32_t*>(out.data_ptr()));
  else
    select_bits(static_cast<const uint16_t*>(weight.const_data_ptr()), words, n, k, static_cast<uint16_t*>(out.data_ptr()));
}

// One task's weight gradient p = dY_t^T X_t ([N, K], unmasked), in one pass: added into
// task_grad (fp32 [N, K], when given); then masked in place when dw32 is null (p becomes dW), else
// added masked into dw32 (the fp32 sum over the tasks present).
template <typename T>
void mask_grad(T* p, const uint32_t* words, int64_t n, int64_t k, float* task_grad, float* dw32) {
  const int64_t nw = num_words(k);
  at::parallel_for(0, n, row_grain(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < nw; ++i) {
        const uint32_t bits = words[r * nw + i];
        const int64_t base = r * k + i * 32, lim = std::min<int64_t>(32, k - i * 32);
        T* pr = p + base;
        if (task_grad != nullptr)
          for (int64_t b = 0; b < lim; ++b) task_grad[base + b] += static_cast<float>(pr[b]);
        if (dw32 == nullptr)
          for (int64_t b = 0; b < lim; ++b) pr[b] = ((bits >> b) & 1u) ? pr[b] : T(0);
        else
          for (int64_t b = 0; b < lim; ++b) dw32[base + b] += ((bits >> b) & 1u) ? static_cast<float>(pr[b]) : 0.0f;
      }
  });
}

struct Groups {
  std::vector<int64_t> offsets;  // [T + 1]: task t owns rows [offsets[t], offsets[t + 1]) in task order
  at::Tensor order;              // [R] int64: row indices in task order (stable); undefined when the rows already are
  int64_t present = 0;           // tasks with at least one row
  int64_t single = -1;           // the one task present when the rows need no reordering, else -1
};

Groups group_rows(const at::Tensor& task_ids, int64_t r, int64_t t_count) {
  Groups g;
  g.offsets.assign(t_count + 1, 0);
  const int64_t* ids = task_ids.const_data_ptr<int64_t>();
  const int64_t m = task_ids.numel();
  bool ordered = true;
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < t_count, "masked_linear: task_ids[", i, "] = ", ids[i], " is out of range [0, ",
                      t_count, ") (masks hold ", t_count, " tasks)");
    ++g.offsets[ids[i] + 1];
    ordered = ordered && (i == 0 || ids[i - 1] <= ids[i]);
  }
  if (m == 1) g.offsets[ids[0] + 1] = r;  // task_ids [1]: every row is that task
  for (int64_t t = 0; t < t_count; ++t) {
    g.present += g.offsets[t + 1] > 0;
    g.offsets[t + 1] += g.offsets[t];
  }
  if (g.present == 1) g.single = ids[0];
  if (!ordered) {
    g.order = at::empty({r}, task_ids.options());
    int64_t* o = g.order.data_ptr<int64_t>();
    std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
    for (int64_t i = 0; i < r; ++i) o[next[ids[i]]++] = i;
  }
  return g;
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks, const at::Tensor& task_ids, const char* op) {
  for (const at::Tensor* t : {&x, &weight, &masks, &task_ids})
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ", t->device());
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1), op, ": x [R, K] and weight [N, K] do not fit: ",
                    x.sizes(), " and ", weight.sizes());
  TORCH_CHECK_VALUE((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && weight.scalar_type() == x.scalar_type(),
                    op, ": x and weight must both be float32 or both bfloat16, got ", x.scalar_type(), " and ", weight.scalar_type());
  const int64_t n = weight.size(0), nw = num_words(weight.size(1));
  TORCH_CHECK_VALUE(masks.scalar_type() == at::kInt && masks.dim() == 3 && masks.size(1) == n && masks.size(2) == nw, op,
                    ": masks must be packed int32 [T, ", n, ", ", nw, "], got ", masks.scalar_type(), " ", masks.sizes());
  TORCH_CHECK_VALUE(task_ids.scalar_type() == at::kLong && task_ids.dim() == 1 && (task_ids.size(0) == x.size(0) || task_ids.size(0) == 1),
                    op, ": task_ids must be int64 [", x.size(0), "] or [1], got ", task_ids.scalar_type(), " ", task_ids.sizes());
}

at::Tensor masked_linear_forward(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                                 const at::Tensor& masks_in, const at::Tensor& task_ids_in, bool relu, double dropout_p, int64_t seed) {
  check_args(x_in, weight_in, masks_in, task_ids_in, "masked_linear");
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0 && seed >= 0, "masked_linear: dropout p must be in [0, 1) and the seed >= 0, got ",
                    dropout_p, " and ", seed);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), masks = masks_in.contiguous(), task_ids = task_ids_in.contiguous();
  const int64_t r = x.size(0), k = x.size(1), n = weight.size(0), t_count = masks.size(0);
  const at::Tensor bias = bias_in.has_value() ? *bias_in : at::Tensor();
  TORCH_CHECK_VALUE(!bias.defined() || (bias.dim() == 1 && bias.size(0) == n && bias.scalar_type() == x.scalar_type() && bias.device().is_cpu()),
                    "masked_linear: bias must be a CPU tensor [", n, "] of x's dtype ", x.scalar_type(), ", got ", bias.scalar_type(), " ",
                    bias.sizes(), " on ", bias.device());
  if (r == 0) return at::empty({r, n}, x.options());
  const Groups g = group_rows(task_ids, r, t_count);
  if (g.single >= 0) {  // one task, rows in order (a training batch): one GEMM straight into y, no views
    at::Tensor wbuf = at::empty({n, k}, weight.options());
    expand_task(weight, masks, g.single, wbuf);
    at::Tensor y = bias.defined() ? at::addmm(bias, x, wbuf.t()) : at::mm(x, wbuf.t());
    epilogue_forward_(y, Epilogue{relu, dropout_p, seed});
    return y;
  }
  at::Tensor y = at::empty({r, n}, x.options());
  const at::Tensor xs = g.order.defined() ? x.index_select(0, g.order) : x;
  at::Tensor ys = g.order.defined() ? at::empty({r, n}, x.options()) : y;
  at::Tensor wbuf = at::empty({n, k}, weight.options());
  for (int64_t t = 0; t < t_count; ++t) {
    const int64_t begin = g.offsets[t], count = g.offsets[t + 1] - begin;
    if (count == 0) continue;
    expand_task(weight, masks, t, wbuf);
    at::Tensor out = ys.narrow(0, begin, count);
    if (bias.defined())
      at::addmm_out(out, bias, xs.narrow(0, begin, count), wbuf.t());
    else
      at::mm_out(out, xs.narrow(0, begin, count), wbuf.t());
  }
  if (g.order.defined()) y.index_copy_(0, g.order, ys);
  epilogue_forward_(y, Epilogue{relu, dropout_p, seed});
  return y;
}

// The gradient first goes back through the epilogue (dropout's bits recomputed from the seed; ReLU's
// from out, the forward's output). Returns (dx, dw, db); a gradient not asked for is an empty [0] tensor (fixed shapes for the fake
// implementation). task_grads: fp32 [T, N, K], each task's unmasked dY_t^T X_t added into it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                                      const at::Tensor& weight_in, const at::Tensor& masks_in,
                                                                      const at::Tensor& task_ids_in, bool need_x, bool need_weight,
                                                                      bool need_bias, const std::optional<at::Tensor>& task_grads_in,
                                                                      const std::optional<at::Tensor>& out, bool relu, double dropout_p,
                                                                      int64_t seed) {
  check_args(x_in, weight_in, masks_in, task_ids_in, "masked_linear_backward");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), masks = masks_in.contiguous(), task_ids = task_ids_in.contiguous();
  const int64_t r = x.size(0), k = x.size(1), n = weight.size(0), t_count = masks.size(0);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == r && grad_y.size(1) == n, "masked_linear_backward: grad_y must be [", r, ", ",
                    n, "], got ", grad_y.sizes());
  const at::Tensor gy = epilogue_backward(grad_y.to(x.scalar_type()), out, Epilogue{relu, dropout_p, seed});
  at::Tensor task_grads = task_grads_in.has_value() && need_weight ? *task_grads_in : at::Tensor();
  TORCH_CHECK_VALUE(!task_grads.defined() || (task_grads.scalar_type() == at::kFloat && task_grads.is_contiguous() &&
                                              task_grads.sizes() == at::IntArrayRef({t_count, n, k})),
                    "masked_linear: task_grads must be contiguous float32 [", t_count, ", ", n, ", ", k, "], got ",
                    task_grads.scalar_type(), " ", task_grads.sizes());
  auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one each: outputs must not alias
  at::Tensor dx = need_x ? at::empty({r, k}, x.options()) : none();
  at::Tensor db = need_bias ? gy.sum(0) : none();
  if (!need_weight && (!need_x || r == 0)) return {dx, none(), db};
  if (r == 0) return {dx, at::zeros({n, k}, weight.options()), db};
  const Groups g = group_rows(task_ids, r, t_count);
  const bool permuted = g.order.defined(), single = g.present == 1;
  const at::Tensor gys = permuted ? gy.index_select(0, g.order) : gy;
  const at::Tensor xs = permuted && need_weight ? x.index_select(0, g.order) : x;
  at::Tensor dxs = need_x && permuted ? at::empty({r, k}, x.options()) : dx;
  at::Tensor wbuf = need_x ? at::empty({n, k}, weight.options()) : at::Tensor();
  at::Tensor pbuf = need_weight ? at::empty({n, k}, weight.options()) : at::Tensor();
  at::Tensor dw32 = need_weight && !single ? at::zeros({n, k}, weight.options().dtype(at::kFloat)) : at::Tensor();
  for (int64_t t = 0; t < t_count; ++t) {
    const int64_t begin = g.offsets[t], count = g.offsets[t + 1] - begin;
    if (count == 0) continue;
    const at::Tensor gyt = count == r ? gys : gys.narrow(0, begin, count);  // (one task: no view)
    if (need_x) {
      expand_task(weight, masks, t, wbuf);
      at::Tensor out = count == r ? dxs : dxs.narrow(0, begin, count);
      at::mm_out(out, gyt, wbuf);
    }
    if (need_weight) {
      at::mm_out(pbuf, gyt.t(), count == r ? xs : xs.narrow(0, begin, count));
      const uint32_t* words = mask_words(masks) + t * n * num_words(k);
      float* tg = task_grads.defined() ? task_grads.data_ptr<float>() + t * n * k : nullptr;
      float* acc = single ? nullptr : dw32.data_ptr<float>();
      if (weight.scalar_type() == at::kFloat)
        mask_grad(pbuf.data_ptr<float>(), words, n, k, tg, acc);
      else
        mask_grad(pbuf.data_ptr<at::BFloat16>(), words, n, k, tg, acc);
    }
  }
  if (need_x && permuted) dx.index_copy_(0, g.order, dxs);
  at::Tensor dw = !need_weight ? none() : single ? pbuf : dw32.to(weight.scalar_type());
  return {dx, dw, db};
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("masked_linear_forward", &harmodt::masked_linear_forward);
  m.impl("masked_linear", &harmodt::masked_linear_forward);
  m.impl("masked_linear_backward", &harmodt::masked_linear_backward);
}
