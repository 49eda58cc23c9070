// The autograd of harmodt_kernels::masked_linear in C++: one dispatcher call from Python runs the
// forward and records its backward node, as an ATen op's autograd does (a Python
// torch.autograd.Function costs several times the op at small shapes). The forward is the CPU
// kernel of masked_linear.cpp (masked_linear_forward), the backward its masked_linear_backward,
// both called through the dispatcher below the autograd key, so torch.compile traces them through
// their fake implementations (kernels/cpu.py). The variant that fills task_grads keeps Python's
// autograd (kernels/cpu.py): its backward writes into a tensor the forward only carries.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace harmodt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_below_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& masks, const at::Tensor& task_ids, bool relu, double dropout_p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("harmodt_kernels::masked_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                         const at::Tensor&, bool, double, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weight, bias, masks, task_ids, relu, dropout_p, seed);
}

class MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& masks, const at::Tensor& task_ids, bool relu, double dropout_p, int64_t seed) {
    at::Tensor y = forward_below_autograd(x, weight, bias, masks, task_ids, relu, dropout_p, seed);
    ctx->save_for_backward({x, weight, masks, task_ids, relu ? y : at::Tensor()});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("harmodt_kernels::masked_linear_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool, bool,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, int64_t)>();
    const variable_list saved = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    auto [dx, dw, db] = op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], need_x, need_w, need_b, std::nullopt,
                                relu ? std::optional<at::Tensor>(saved[4]) : std::nullopt, relu, ctx->saved_data["dropout_p"].toDouble(),
                                ctx->saved_data["seed"].toInt());
    return {need_x ? dx : at::Tensor(), need_w ? dw : at::Tensor(), need_b ? db : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& masks, const at::Tensor& task_ids, bool relu, double dropout_p, int64_t seed) {
  return MaskedLinearFunction::apply(x, weight, bias, masks, task_ids, relu, dropout_p, seed);
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_IMPL(harmodt_kernels, Autograd, m) { m.impl("masked_linear", &harmodt::masked_linear_autograd); }
