// Operator schemas of the harmodt_kernels library (implementations: masks.cpp,
// masked_linear.cpp, harmony_select.cpp).
#include <torch/library.h>

TORCH_LIBRARY(harmodt_kernels, m) {
  m.def("pack_masks(Tensor mask) -> Tensor");
  m.def("unpack_masks(Tensor words, int k) -> Tensor");
  m.def("apply_mask_(Tensor(a!) out, Tensor src, Tensor mask) -> ()");
  m.def("apply_masks_(Tensor(a!)[] out, Tensor[] src, Tensor[] mask) -> ()");
  m.def("apply_masks_sq_norms_(Tensor(a!)[] out, Tensor[] src, Tensor[] mask) -> Tensor");
  m.def("masked_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor masks, Tensor task_ids, Tensor? task_weights=None) -> Tensor");
  m.def(
      "masked_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor masks, Tensor task_ids, "
      "bool need_x, bool need_weight, bool need_bias, Tensor(a!)? task_grads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "harmony_select(Tensor masked_grads, Tensor grads, Tensor params, Tensor masks, int k, float lam, "
      "bool fisher) -> Tensor");
}
