// Operator schemas of the harmodt_kernels library (CPU implementations: masked_linear.cpp, autograd.cpp,
// dropout.cpp, masked_adamw.cpp, harmony_select.cpp; fake implementations for torch.compile: kernels/cpu.py).
#include <torch/library.h>

TORCH_LIBRARY(harmodt_kernels, m) {
  m.def(
      "masked_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor masks, Tensor task_ids, bool relu, float dropout_p, "
      "int seed) -> Tensor");
  // masked_linear: the differentiable op (autograd in autograd.cpp, CPU kernel masked_linear_forward's).
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor? bias, Tensor masks, Tensor task_ids, bool relu, float dropout_p, "
      "int seed) -> Tensor");
  m.def(
      "masked_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor masks, Tensor task_ids, "
      "bool need_x, bool need_weight, bool need_bias, Tensor(a!)? task_grads, Tensor? out, bool relu, float dropout_p, "
      "int seed) -> (Tensor, Tensor, Tensor)");
  m.def("counter_dropout(Tensor x, float p, int seed) -> Tensor");
  m.def(
      "adamw_group_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor?[] masks, "
      "Tensor(d!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, Tensor grad_scale) -> ()");
  m.def("harmony_select(Tensor harmony, Tensor recovery, Tensor masks, int k) -> Tensor");
}
