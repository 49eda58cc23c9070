// The autograd of harmodt_kernels::masked_linear in C++: one dispatcher call from Python runs the
// forward and, when a gradient is needed, records its backward node, as an ATen op's generated
// autograd does (a Python torch.autograd.Function costs several times the op at small shapes, and
// torch::autograd::Function's context map a few microseconds more). The forward is the CPU kernel
// of masked_linear.cpp (masked_linear_forward), the backward its masked_linear_backward, both
// called through the dispatcher below the autograd key, so torch.compile traces them through their
// fake implementations (kernels/cpu.py). The variant that fills task_grads keeps Python's autograd
// (kernels/cpu.py): its backward writes into a tensor the forward only carries.
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>

namespace harmodt {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The backward of one masked_linear call: (dx, dweight, dbias) from dy, the saved inputs and, with
// ReLU, the saved output.
struct MaskedLinearBackward : public torch::autograd::Node {
  SavedVariable x_, weight_, masks_, task_ids_, out_;
  bool has_bias = false, relu = false;
  double dropout_p = 0.0;
  int64_t seed = 0;

  std::string name() const override { return "MaskedLinearBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    weight_.reset_data();
    masks_.reset_data();
    task_ids_.reset_data();
    out_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("harmodt_kernels::masked_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool, bool,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, int64_t)>();
    std::lock_guard<std::mutex> lock(mutex_);
    const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1);
    const bool need_b = has_bias && task_should_compute_output(2);
    if (!grads[0].defined() || !(need_x || need_w || need_b)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor x = x_.unpack(), weight = weight_.unpack(), masks = masks_.unpack(), task_ids = task_ids_.unpack();
    const std::optional<at::Tensor> out = relu ? std::optional<at::Tensor>(out_.unpack(getptr())) : std::nullopt;
    auto [dx, dw, db] = op.call(grads[0], x, weight, masks, task_ids, need_x, need_w, need_b, std::nullopt, out, relu, dropout_p, seed);
    return {need_x ? dx : at::Tensor(), need_w ? dw : at::Tensor(), need_b ? db : at::Tensor()};
  }
};

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& masks, const at::Tensor& task_ids, bool relu, double dropout_p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("harmodt_kernels::masked_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                         const at::Tensor&, bool, double, int64_t)>();
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    y = op.call(x, weight, bias, masks, task_ids, relu, dropout_p, seed);
  }
  if (!torch::autograd::compute_requires_grad(x, weight, bias)) return y;
  auto node = c10::make_intrusive<MaskedLinearBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
  node->x_ = SavedVariable(x, false);
  node->weight_ = SavedVariable(weight, false);
  node->masks_ = SavedVariable(masks, false);
  node->task_ids_ = SavedVariable(task_ids, false);
  node->has_bias = bias.has_value() && bias->defined();
  node->relu = relu;
  node->dropout_p = dropout_p;
  node->seed = seed;
  torch::autograd::set_history(y, node);
  if (relu) node->out_ = SavedVariable(y, true);
  return y;
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, Autograd, m) { m.impl("masked_linear", &harmodt::masked_linear_autograd); }
