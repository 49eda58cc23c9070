// masked_linear forward/backward: y[r] = x[r] @ (W * M[task_ids[r]])^T + b without materializing
// the masked weight copies of all tasks.
//
// Rows are grouped per task with a stable counting sort. For each task present, its masked weight
// is expanded from the packed bits ONCE into one reused [N, K] buffer (the expansion is
// parallelized with OpenMP) and the task's rows go through GEMMs (gemm.cpp's gemm_out: oneDNN for fp32,
// with its own threads): maximal runs of consecutive rows (>= kMinRun) are multiplied in place (no copies),
// shorter runs are gathered into a small [kChunk, *] buffer, multiplied and scattered back.
//
// Backward: dX per task the same way (dY_t @ (W*M_t)); dW = sum_t M_t * (dY_t^T X_t) with
// dY_t^T X_t computed into one reused [N, K] buffer and accumulated masked into dW (its unmasked
// value optionally added into task_grads[t]); db = sum_r dY[r]. When a single task is present
// (the usual training batch), dY^T X goes straight into the dW output and is masked in place.
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

namespace harmodt {
namespace {

constexpr int64_t kMinRun = 64;   // runs of consecutive rows at least this long are used in place
constexpr int64_t kChunk = 256;   // gathered rows per GEMM
// Element-wise passes over an [N, K] matrix go parallel only above this size: the model's matrices
// (<= 256 x 1024) take ~0.1-0.2 ms serially, and on a busy 2-core machine an extra OpenMP fork/join
// per task measured slower (single-task fwd+bwd of 256->1024, 600 rows: 88 ms parallel vs 64 ms
// serial under load from other processes; GEMMs use at::mm's own threads either way).
constexpr int64_t kParallelElems = int64_t(1) << 19;

struct Groups {
  int64_t num_tasks = 0;
  std::vector<int64_t> offsets;  // [T + 1]
  std::vector<int64_t> rows;     // [R], grouped by task, ascending within a task
  int64_t present = 0;           // tasks with at least one row
};

Groups group_rows(const at::Tensor& task_ids, int64_t num_tasks) {
  Groups g;
  g.num_tasks = num_tasks;
  const int64_t r = task_ids.numel();
  const int64_t* ids = task_ids.data_ptr<int64_t>();
  std::vector<int64_t> counts(num_tasks + 1, 0);
  for (int64_t i = 0; i < r; ++i) {
    const int64_t t = ids[i];
    TORCH_CHECK_VALUE(t >= 0 && t < num_tasks, "masked_linear: task_ids[", i, "] = ", t,
                      " is out of range [0, ", num_tasks, ") (masks hold ", num_tasks, " tasks)");
    ++counts[t + 1];
  }
  for (int64_t t = 0; t < num_tasks; ++t) {
    if (counts[t + 1] > 0) ++g.present;
    counts[t + 1] += counts[t];
  }
  g.offsets = counts;
  g.rows.resize(r);
  for (int64_t i = 0; i < r; ++i) g.rows[counts[ids[i]]++] = i;
  return g;
}

// out[n, k] = bit k of masks[n] ? w[n, k] : 0 (a select, so masked inf/nan weights give 0).
template <typename scalar_t>
void expand_masked_weight(const scalar_t* w, const uint32_t* mw, int64_t n_rows, int64_t k, scalar_t* out) {
  const int64_t nw = num_words(k);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n_rows * k > kParallelElems)
  for (int64_t n = 0; n < n_rows; ++n) {
    const scalar_t* wr = w + n * k;
    const uint32_t* mr = mw + n * nw;
    scalar_t* o = out + n * k;
    if constexpr (std::is_same_v<scalar_t, float>) {
      select_row_bits(wr, mr, k, o);
      continue;
    }
    for (int64_t i = 0; i < nw; ++i) {
      const uint32_t bits = mr[i];
      const int64_t base = i * 32;
      const int64_t lim = std::min<int64_t>(32, k - base);
      for (int64_t j = 0; j < lim; ++j) o[base + j] = ((bits >> j) & 1u) ? wr[base + j] : scalar_t(0);
    }
  }
}

// Single task: p <- where(M, p, 0) in place; task_grad += p (unmasked) first, if given.
template <typename scalar_t>
void mask_in_place(scalar_t* p, const uint32_t* mw, int64_t n_rows, int64_t k, float* task_grad) {
  const int64_t nw = num_words(k);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n_rows * k > kParallelElems)
  for (int64_t n = 0; n < n_rows; ++n) {
    scalar_t* pr = p + n * k;
    const uint32_t* mr = mw + n * nw;
    if (task_grad != nullptr) {
      float* tr = task_grad + n * k;
      for (int64_t j = 0; j < k; ++j) tr[j] += static_cast<float>(pr[j]);
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      select_row_bits(pr, mr, k, pr);
      continue;
    }
    for (int64_t i = 0; i < nw; ++i) {
      const uint32_t bits = mr[i];
      const int64_t base = i * 32;
      const int64_t lim = std::min<int64_t>(32, k - base);
      for (int64_t j = 0; j < lim; ++j) pr[base + j] = ((bits >> j) & 1u) ? pr[base + j] : scalar_t(0);
    }
  }
}

// Several tasks: dw += where(M_t, p, 0); task_grad += p, if given.
template <typename scalar_t>
void accumulate_masked(const scalar_t* p, const uint32_t* mw, int64_t n_rows, int64_t k, float* dw,
                       float* task_grad) {
  const int64_t nw = num_words(k);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n_rows * k > kParallelElems)
  for (int64_t n = 0; n < n_rows; ++n) {
    const scalar_t* pr = p + n * k;
    const uint32_t* mr = mw + n * nw;
    float* dr = dw + n * k;
    if (task_grad != nullptr) {
      float* tr = task_grad + n * k;
      for (int64_t j = 0; j < k; ++j) tr[j] += static_cast<float>(pr[j]);
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      add_row_bits(pr, mr, k, dr);
      continue;
    }
    for (int64_t i = 0; i < nw; ++i) {
      const uint32_t bits = mr[i];
      const int64_t base = i * 32;
      const int64_t lim = std::min<int64_t>(32, k - base);
      for (int64_t j = 0; j < lim; ++j) dr[base + j] += ((bits >> j) & 1u) ? static_cast<float>(pr[base + j]) : 0.0f;
    }
  }
}

// Splits one task's (ascending) rows into maximal runs of consecutive rows; long runs go to
// direct(start, len), the other rows are batched (up to kChunk) into gathered(index_tensor).
template <class Direct, class Gathered>
void for_each_block(const int64_t* rows, int64_t n, Direct direct, Gathered gathered) {
  std::vector<int64_t> pending;
  pending.reserve(kChunk);
  auto flush = [&]() {
    if (pending.empty()) return;
    at::Tensor idx = at::from_blob(pending.data(), {static_cast<int64_t>(pending.size())}, at::kLong);
    gathered(idx);
    pending.clear();
  };
  int64_t i = 0;
  while (i < n) {
    int64_t j = i;
    while (j + 1 < n && rows[j + 1] == rows[j] + 1) ++j;
    const int64_t len = j - i + 1;
    if (len >= kMinRun) {
      direct(rows[i], len);
    } else {
      for (int64_t q = i; q <= j; ++q) {
        pending.push_back(rows[q]);
        if (static_cast<int64_t>(pending.size()) == kChunk) flush();
      }
    }
    i = j + 1;
  }
  flush();
}

// Runs out = op(in) over one task's rows of x -> y: runs of consecutive rows in place, the other
// rows gathered through the [kChunk, *] buffers (allocated on first use) and scattered back.
template <class RowOp>
void map_task_rows(const Groups& g, int64_t t, const at::Tensor& x, at::Tensor& y, at::Tensor& xbuf, at::Tensor& ybuf,
                   RowOp op) {
  const int64_t begin = g.offsets[t], count = g.offsets[t + 1] - begin;
  for_each_block(
      g.rows.data() + begin, count,
      [&](int64_t start, int64_t len) {
        at::Tensor out = y.narrow(0, start, len);
        op(out, x.narrow(0, start, len));
      },
      [&](const at::Tensor& idx) {
        if (!xbuf.defined()) {
          xbuf = at::empty({kChunk, x.size(1)}, x.options());
          ybuf = at::empty({kChunk, y.size(1)}, y.options());
        }
        const int64_t m = idx.size(0);
        at::Tensor xg = xbuf.narrow(0, 0, m);
        at::index_select_out(xg, x, 0, idx);
        at::Tensor yg = ybuf.narrow(0, 0, m);
        op(yg, xg);
        y.index_copy_(0, idx, yg);
      });
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks, const at::Tensor& task_ids,
                  const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu() && masks.device().is_cpu() &&
                        task_ids.device().is_cpu(),
                    op, ": all tensors must be on the CPU");
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [R, K], got ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), op, ": x has ", x.size(1), " features, weight is ", weight.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type(), op, ": x is ", x.scalar_type(), " but weight is ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
                    ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(masks.scalar_type() == at::kInt, op, ": masks must be packed int32, got ", masks.scalar_type());
  TORCH_CHECK_VALUE(masks.dim() == 3 && masks.size(1) == weight.size(0) && masks.size(2) == num_words(weight.size(1)),
                    op, ": masks must be [T, ", weight.size(0), ", ", num_words(weight.size(1)), "], got ",
                    masks.sizes());
  TORCH_CHECK_VALUE(task_ids.scalar_type() == at::kLong, op, ": task_ids must be int64, got ", task_ids.scalar_type());
  TORCH_CHECK_VALUE(task_ids.dim() == 1 && task_ids.size(0) == x.size(0), op, ": task_ids must be [", x.size(0),
                    "], got ", task_ids.sizes());
}

// Optional task_weights: every task's W * M_t already expanded, [T, N, K] of x's dtype (evaluation
// expands them once for all its steps: the weights do not change there). The per-task matrices are
// then read from it instead of being expanded from the bits at every call.
at::Tensor task_weights_arg(const std::optional<at::Tensor>& tw, int64_t t_count, const at::Tensor& weight, const char* op) {
  if (!tw.has_value() || !tw->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(tw->device().is_cpu() && tw->scalar_type() == weight.scalar_type(), op, ": task_weights must be a CPU ",
                    weight.scalar_type(), " tensor, got ", tw->scalar_type());
  TORCH_CHECK_VALUE(tw->dim() == 3 && tw->size(0) == t_count && tw->size(1) == weight.size(0) && tw->size(2) == weight.size(1),
                    op, ": task_weights must be [", t_count, ", ", weight.size(0), ", ", weight.size(1), "] (one W * M per task), got ",
                    tw->sizes());
  return tw->contiguous();
}

// Task t's W * M_t as an [N, K] tensor: task_weights[t] when given, else expanded into wbuf.
at::Tensor task_matrix(const at::Tensor& task_weights, const at::Tensor& weight, const uint32_t* mbase, int64_t t,
                       at::Tensor& wbuf) {
  if (task_weights.defined()) return task_weights[t];
  const int64_t n = weight.size(0), k = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "masked_linear_expand", [&] {
    expand_masked_weight<scalar_t>(weight.data_ptr<scalar_t>(), mbase + t * n * num_words(k), n, k, wbuf.data_ptr<scalar_t>());
  });
  return wbuf;
}

at::Tensor masked_linear_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                 const std::optional<at::Tensor>& bias_in, const at::Tensor& masks_in,
                                 const at::Tensor& task_ids_in, const std::optional<at::Tensor>& task_weights_in) {
  check_common(x_in, weight_in, masks_in, task_ids_in, "masked_linear");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  const at::Tensor task_ids = task_ids_in.contiguous();
  const int64_t r = x.size(0), k = x.size(1), n = weight.size(0), t_count = masks.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = *bias_in;
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == n, "masked_linear: bias must be [", n, "], got ",
                      bias.sizes());
    TORCH_CHECK_VALUE(bias.scalar_type() == x.scalar_type(), "masked_linear: bias is ", bias.scalar_type(),
                      " but x is ", x.scalar_type());
  }
  const at::Tensor task_weights = task_weights_arg(task_weights_in, t_count, weight, "masked_linear");
  at::Tensor y = at::empty({r, n}, x.options());
  if (r == 0) return y;
  const Groups g = group_rows(task_ids, t_count);
  // The native fp32 GEMM takes W with the task's mask bits and masks it as it packs it: no W * M
  // expanded per task first.
  // (k > 1: W^T of a one-column W would read as a row-major b)
  const bool mask_in_gemm = !task_weights.defined() && weight.scalar_type() == at::kFloat && k > 1 && f32_native_by_default();
  at::Tensor wbuf = task_weights.defined() || mask_in_gemm ? at::Tensor() : at::empty({n, k}, weight.options());
  at::Tensor xbuf, ybuf, wt, wt_mask;
  const uint32_t* mbase = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  auto gemm = [&](at::Tensor& out, const at::Tensor& a) {
    gemm_out(out, a, wt, bias, GemmEngine::kAuto, wt_mask);
  };
  for (int64_t t = 0; t < t_count; ++t) {
    const int64_t begin = g.offsets[t], count = g.offsets[t + 1] - begin;
    if (count == 0) continue;
    if (mask_in_gemm) {
      wt = weight.t();
      wt_mask = masks[t];
    } else {
      wt = task_matrix(task_weights, weight, mbase, t, wbuf).t();
    }
    map_task_rows(g, t, x, y, xbuf, ybuf, gemm);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& masks_in,
    const at::Tensor& task_ids_in, bool need_x, bool need_weight, bool need_bias,
    const std::optional<at::Tensor>& task_grads_in) {
  check_common(x_in, weight_in, masks_in, task_ids_in, "masked_linear_backward");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor masks = masks_in.contiguous();
  const at::Tensor task_ids = task_ids_in.contiguous();
  const int64_t r = x.size(0), k = x.size(1), n = weight.size(0), t_count = masks.size(0);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 2 && grad_y_in.size(0) == r && grad_y_in.size(1) == n,
                    "masked_linear_backward: grad_y must be [", r, ", ", n, "], got ", grad_y_in.sizes());
  const at::Tensor gy = grad_y_in.to(x.scalar_type()).contiguous();
  at::Tensor task_grads;
  if (task_grads_in.has_value() && task_grads_in->defined() && need_weight) {
    task_grads = *task_grads_in;
    TORCH_CHECK_VALUE(task_grads.scalar_type() == at::kFloat, "masked_linear: task_grads must be float32, got ",
                      task_grads.scalar_type());
    TORCH_CHECK_VALUE(task_grads.dim() == 3 && task_grads.size(0) == t_count && task_grads.size(1) == n &&
                          task_grads.size(2) == k,
                      "masked_linear: task_grads must be [", t_count, ", ", n, ", ", k, "], got ", task_grads.sizes());
    TORCH_CHECK_VALUE(task_grads.is_contiguous(), "masked_linear: task_grads must be contiguous");
  }
  at::Tensor dx, dw, db;
  if (need_bias) db = gy.sum(0);
  if (need_x) dx = at::empty({r, k}, x.options());
  if (!need_x && !need_weight) return {dx, dw, db};
  if (r == 0) {
    if (need_weight) dw = at::zeros({n, k}, weight.options());
    return {dx, dw, db};
  }
  const Groups g = group_rows(task_ids, t_count);
  const bool single = g.present == 1;
  const uint32_t* mbase = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  const int64_t task_words = n * num_words(k);

  at::Tensor wbuf, pbuf, dw32;
  if (need_x) wbuf = at::empty({n, k}, weight.options());
  if (need_weight) {
    if (single) {
      pbuf = at::empty({n, k}, weight.options());  // becomes dw
    } else {
      pbuf = at::empty({n, k}, weight.options());
      dw32 = at::zeros({n, k}, weight.options().dtype(at::kFloat));
    }
  }
  at::Tensor gybuf, xbuf, dxbuf;
  for (int64_t t = 0; t < t_count; ++t) {
    const int64_t begin = g.offsets[t], count = g.offsets[t + 1] - begin;
    if (count == 0) continue;
    const uint32_t* mw = mbase + t * task_words;
    if (need_x) task_matrix(at::Tensor(), weight, mbase, t, wbuf);  // W * M_t into wbuf
    bool first = true;
    auto accumulate_p = [&](const at::Tensor& gyb, const at::Tensor& xb) {
      if (first)
        gemm_out(pbuf, gyb.t(), xb, at::Tensor());
      else
        pbuf.addmm_(gyb.t(), xb);
      first = false;
    };
    for_each_block(
        g.rows.data() + begin, count,
        [&](int64_t start, int64_t len) {
          const at::Tensor gyb = gy.narrow(0, start, len);
          if (need_x) {
            at::Tensor out = dx.narrow(0, start, len);
            gemm_out(out, gyb, wbuf, at::Tensor());
          }
          if (need_weight) accumulate_p(gyb, x.narrow(0, start, len));
        },
        [&](const at::Tensor& idx) {
          if (!gybuf.defined()) {
            gybuf = at::empty({kChunk, n}, x.options());
            if (need_x) dxbuf = at::empty({kChunk, k}, x.options());
            if (need_weight) xbuf = at::empty({kChunk, k}, x.options());
          }
          const int64_t m = idx.size(0);
          at::Tensor gyg = gybuf.narrow(0, 0, m);
          at::index_select_out(gyg, gy, 0, idx);
          if (need_x) {
            at::Tensor dxg = dxbuf.narrow(0, 0, m);
            gemm_out(dxg, gyg, wbuf, at::Tensor());
            dx.index_copy_(0, idx, dxg);
          }
          if (need_weight) {
            at::Tensor xg = xbuf.narrow(0, 0, m);
            at::index_select_out(xg, x, 0, idx);
            accumulate_p(gyg, xg);
          }
        });
    if (need_weight) {
      float* tg = task_grads.defined() ? task_grads.data_ptr<float>() + t * n * k : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "masked_linear_dw", [&] {
        if (single)
          mask_in_place<scalar_t>(pbuf.data_ptr<scalar_t>(), mw, n, k, tg);
        else
          accumulate_masked<scalar_t>(pbuf.data_ptr<scalar_t>(), mw, n, k, dw32.data_ptr<float>(), tg);
      });
    }
  }
  if (need_weight) dw = single ? pbuf : (weight.scalar_type() == at::kFloat ? dw32 : dw32.to(weight.scalar_type()));
  return {dx, dw, db};
}


// Inference MLP of a block: y[r] = relu(x[r] (W1*M1[t])^T + b1) (W2*M2[t])^T + b2, t = task_ids[r].
// Per task, both masked weights are expanded once and the task's rows go through fc, ReLU and the
// projection while their hidden activations ([rows of one block, H], ~2.4 MB for 590 rows of the
// paper model) are still in cache, instead of writing the whole batch's hidden tensor to memory
// and reading it twice. No autograd (the model calls it only without gradients).
at::Tensor masked_mlp_forward(const at::Tensor& x_in, const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in,
                              const at::Tensor& m1_in, const at::Tensor& w2_in, const std::optional<at::Tensor>& b2_in,
                              const at::Tensor& m2_in, const at::Tensor& task_ids_in,
                              const std::optional<at::Tensor>& task_w1_in, const std::optional<at::Tensor>& task_w2_in) {
  check_common(x_in, w1_in, m1_in, task_ids_in, "masked_mlp (fc)");
  TORCH_CHECK_VALUE(w2_in.dim() == 2 && w2_in.size(1) == w1_in.size(0), "masked_mlp: w2 must be [N, ", w1_in.size(0),
                    "], got ", w2_in.sizes());
  TORCH_CHECK_VALUE(w2_in.scalar_type() == x_in.scalar_type(), "masked_mlp: w2 is ", w2_in.scalar_type(), " but x is ",
                    x_in.scalar_type());
  TORCH_CHECK_VALUE(m2_in.scalar_type() == at::kInt && m2_in.dim() == 3 && m2_in.size(0) == m1_in.size(0) &&
                        m2_in.size(1) == w2_in.size(0) && m2_in.size(2) == num_words(w2_in.size(1)),
                    "masked_mlp: m2 must be packed int32 [", m1_in.size(0), ", ", w2_in.size(0), ", ",
                    num_words(w2_in.size(1)), "], got ", m2_in.sizes());
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor m1 = m1_in.contiguous(), m2 = m2_in.contiguous(), task_ids = task_ids_in.contiguous();
  const int64_t r = x.size(0), k = x.size(1), hd = w1.size(0), n = w2.size(0), t_count = m1.size(0);
  at::Tensor b1, b2;
  for (auto [bias_in, b, len, name] : {std::make_tuple(&b1_in, &b1, hd, "b1"), std::make_tuple(&b2_in, &b2, n, "b2")}) {
    if (bias_in->has_value() && (*bias_in)->defined()) {
      *b = **bias_in;
      TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == len && b->scalar_type() == x.scalar_type(), "masked_mlp: ", name,
                        " must be [", len, "] of x's dtype, got ", b->sizes(), " ", b->scalar_type());
    }
  }
  const at::Tensor tw1 = task_weights_arg(task_w1_in, t_count, w1, "masked_mlp (fc)");
  const at::Tensor tw2 = task_weights_arg(task_w2_in, t_count, w2, "masked_mlp (projection)");
  at::Tensor y = at::empty({r, n}, x.options());
  if (r == 0) return y;
  const Groups g = group_rows(task_ids, t_count);
  at::Tensor wbuf1 = tw1.defined() ? at::Tensor() : at::empty({hd, k}, w1.options());
  at::Tensor wbuf2 = tw2.defined() ? at::Tensor() : at::empty({n, hd}, w2.options());
  at::Tensor w1t, w2t;
  const uint32_t* mb1 = reinterpret_cast<const uint32_t*>(m1.data_ptr<int32_t>());
  const uint32_t* mb2 = reinterpret_cast<const uint32_t*>(m2.data_ptr<int32_t>());
  at::Tensor hbuf, xbuf, ybuf;
  auto mlp = [&](at::Tensor& out, const at::Tensor& a) {  // out = relu(a W1^T + b1) W2^T + b2
    const int64_t m = a.size(0);
    if (!hbuf.defined() || hbuf.size(0) < m) hbuf = at::empty({m, hd}, x.options());
    at::Tensor h = hbuf.narrow(0, 0, m);
    gemm_out(h, a, w1t, b1);
    h.clamp_min_(0);
    gemm_out(out, h, w2t, b2);
  };
  for (int64_t t = 0; t < t_count; ++t) {
    const int64_t begin = g.offsets[t], count = g.offsets[t + 1] - begin;
    if (count == 0) continue;
    w1t = task_matrix(tw1, w1, mb1, t, wbuf1).t();
    w2t = task_matrix(tw2, w2, mb2, t, wbuf2).t();
    map_task_rows(g, t, x, y, xbuf, ybuf, mlp);
  }
  return y;
}

// Inference attention input of a block: qkv = x (W*M[t])^T + b per batch row's task, then
// attention (kernels/csrc/attention.cpp) -- done per run of consecutive batch rows of one task
// (at most kQkvRows rows), so each run's packed q/k/v ([rows * T, 3C]) goes from the GEMM to the
// attention while it is in cache instead of through a [B * T, 3C] tensor in memory.
constexpr int64_t kQkvRows = 16;

at::Tensor masked_qkv_attention_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                        const std::optional<at::Tensor>& bias_in, const at::Tensor& masks_in,
                                        const at::Tensor& row_tasks_in, int64_t n_head, const at::Tensor& key_valid_in,
                                        const at::Tensor& query_pos, const std::optional<at::Tensor>& k_prefix,
                                        const std::optional<at::Tensor>& v_prefix,
                                        const std::optional<at::Tensor>& task_weights_in) {
  const at::Tensor row_tasks = row_tasks_in.contiguous();
  TORCH_CHECK_VALUE(row_tasks.scalar_type() == at::kLong && row_tasks.dim() == 1, "masked_qkv_attention: row_tasks must be int64 (B,)");
  const int64_t b_rows = row_tasks.size(0);
  TORCH_CHECK_VALUE(b_rows > 0 && x_in.dim() == 2 && x_in.size(0) % b_rows == 0, "masked_qkv_attention: x must be [B * T, C] for ",
                    b_rows, " batch rows, got ", x_in.sizes());
  const int64_t t = x_in.size(0) / b_rows, c = x_in.size(1);
  TORCH_CHECK_VALUE(weight_in.dim() == 2 && weight_in.size(0) == 3 * c && n_head > 0 && c % n_head == 0,
                    "masked_qkv_attention: weight must be [3C, C] with C divisible by n_head, got ", weight_in.sizes(),
                    " and n_head ", n_head);
  const at::Tensor ids = row_tasks.repeat_interleave(t);
  check_common(x_in, weight_in, masks_in, ids, "masked_qkv_attention");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), masks = masks_in.contiguous();
  const at::Tensor key_valid = key_valid_in.contiguous();
  const int64_t n = 3 * c, t_count = masks.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = *bias_in;
  const int64_t* tasks = row_tasks.data_ptr<int64_t>();
  for (int64_t b = 0; b < b_rows; ++b)
    TORCH_CHECK_VALUE(tasks[b] >= 0 && tasks[b] < t_count, "masked_qkv_attention: row_tasks[", b, "] = ", tasks[b],
                      " is out of range [0, ", t_count, ")");
  const at::Tensor task_weights = task_weights_arg(task_weights_in, t_count, weight, "masked_qkv_attention");
  at::Tensor out = at::empty({b_rows, query_pos.size(0), c}, x.options());
  at::Tensor wbuf = task_weights.defined() ? at::Tensor() : at::empty({n, c}, weight.options());
  at::Tensor wt;
  at::Tensor qbuf = at::empty({std::min(b_rows, kQkvRows) * t, n}, x.options());
  const uint32_t* mbase = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  int64_t expanded = -1;
  for (int64_t b0 = 0; b0 < b_rows;) {
    int64_t b1 = b0 + 1;
    while (b1 < b_rows && b1 - b0 < kQkvRows && tasks[b1] == tasks[b0]) ++b1;
    const int64_t nb = b1 - b0, task = tasks[b0];
    if (task != expanded) {
      wt = task_matrix(task_weights, weight, mbase, task, wbuf).t();
      expanded = task;
    }
    at::Tensor q = qbuf.narrow(0, 0, nb * t);
    const at::Tensor xs = x.narrow(0, b0 * t, nb * t);
    gemm_out(q, xs, wt, bias);
    std::optional<at::Tensor> kp, vp;
    if (k_prefix.has_value() && k_prefix->defined()) kp = k_prefix->narrow(0, b0, nb);
    if (v_prefix.has_value() && v_prefix->defined()) vp = v_prefix->narrow(0, b0, nb);
    auto [y, lse] = attention_forward_op(q.view({nb, t, 3, n_head, c / n_head}), kp, vp, key_valid.narrow(0, b0, nb),
                                         query_pos, 0.0, 0, false);
    out.narrow(0, b0, nb).copy_(y);
    b0 = b1;
  }
  return out;
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def(
      "masked_qkv_attention_forward(Tensor x, Tensor weight, Tensor? bias, Tensor masks, Tensor row_tasks, int n_head, "
      "Tensor key_valid, Tensor query_pos, Tensor? k_prefix, Tensor? v_prefix, Tensor? task_weights=None) -> Tensor");
  m.def(
      "masked_mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor m1, Tensor w2, Tensor? b2, Tensor m2, Tensor task_ids, "
      "Tensor? task_w1=None, Tensor? task_w2=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("masked_mlp_forward", &harmodt::masked_mlp_forward);
  m.impl("masked_qkv_attention_forward", &harmodt::masked_qkv_attention_forward);
  m.impl("masked_linear_forward", &harmodt::masked_linear_forward);
  m.impl("masked_linear_backward", &harmodt::masked_linear_backward);
}
