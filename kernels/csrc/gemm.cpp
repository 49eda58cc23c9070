// Dense GEMMs of the native ops and of the model's linear layers: out = a b (+ bias on every row).
//
// fp32 goes through oneDNN's matmul (the AVX-512 brgemm kernels PyTorch ships) rather than
// at::mm, which calls MKL's sgemm: on this project's AMD Zen 4 machines MKL dispatches to its AVX2
// "zen" kernels, and bench/test_bench_kernels.py measured oneDNN 5-30 % faster on the model's
// shapes (M ~600 rows, K and N 256-1024) for the forward GEMM and both backward GEMMs (dx = dy W,
// dW = dy^T x). PyTorch exports its oneDNN entry point at::native::mkldnn_matmul but does not
// install its header, so it is declared here as a weak symbol: a PyTorch build without it loads
// this library all the same and the "auto" engine falls back to at::mm. bf16 already goes through
// oneDNN inside at::mm.
//
// The op linear(x, weight, bias) is F.linear with its forward GEMM and both backward GEMMs through
// harmodt_kernels::gemm; its autograd node is C++ (registered for the Autograd key), so a call costs one
// dispatch, not a Python autograd.Function.
//
// Operands may be contiguous or transposed views (oneDNN reads both layouts; anything else is
// copied to contiguous first). Under torch.backends.mkldnn's reduced-precision fp32 settings
// oneDNN follows them, as at::mm would.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

#include "common.h"

namespace at {
namespace native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace native
}  // namespace at

namespace harmodt {

// oneDNN's matmul entry point refuses CPUs it has no reduced-precision path for (PyTorch 2.13 checks
// for AVX-512 BW/VL/DQ, AVX-NE-CONVERT or Graviton3 even for fp32 operands; AMD Zen 3 has none of them),
// so besides the symbol and the build flag it is asked once, on a 1x1 product, whether it runs here.
bool onednn_gemm_available() {
  static const bool ok = [] {
    if (&at::native::mkldnn_matmul == nullptr || !at::hasMKLDNN()) return false;
    try {
      const at::Tensor a = at::ones({1, 1}, at::kFloat);
      at::Tensor out = at::zeros({1, 1}, at::kFloat);
      at::native::mkldnn_matmul(a, a, out, 0.0f, 1.0f);
      return out.item<float>() == 1.0f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

namespace {

bool plain_or_transposed(const at::Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) ||
         (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0)));
}

GemmEngine parse_engine(c10::string_view name) {
  if (name == "auto") return GemmEngine::kAuto;
  if (name == "native") return GemmEngine::kNative;
  if (name == "onednn") return GemmEngine::kOneDnn;
  if (name == "blas") return GemmEngine::kBlas;
  TORCH_CHECK_VALUE(false, "gemm: engine must be 'auto', 'native', 'onednn' or 'blas', got '", std::string(name), "'");
}

bool transposed_view(const at::Tensor& b) { return b.stride(0) == 1 && b.stride(1) != 1; }

// For an fp32 b (a block GEMM's weight W or W^T, with its task's packed mask b_mask over W's rows,
// or none) and an a of dtype `dtype`: b * M in `dtype` (bf16: rounded), in b's layout -- what the
// native kernels do while they pack b, here as a pass of its own for the other engines.
at::Tensor operand_as(const at::Tensor& b, const at::Tensor& b_mask, at::ScalarType dtype) {
  if (b.scalar_type() == dtype && !b_mask.defined()) return b;
  const at::Tensor w = (transposed_view(b) ? b.t() : b).contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(dtype));
  if (b_mask.defined()) {
    static const auto op = handle<void(at::TensorList, at::TensorList, at::TensorList)>("harmodt_kernels::apply_masks_");
    op.call({out}, {w}, {b_mask});
  } else {
    out.copy_(w);
  }
  return transposed_view(b) ? out.t() : out;
}

// b's checks: a's dtype, or fp32 for a bf16 a; an fp32 b with a packed mask over W's rows must be
// W or W^T of a contiguous W.
void check_b_operand(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& b_mask) {
  if ((a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kFloat) && b.scalar_type() == at::kFloat &&
      (a.scalar_type() == at::kBFloat16 || b_mask.defined())) {
    const at::Tensor w = transposed_view(b) ? b.t() : b;
    TORCH_CHECK_VALUE(w.is_contiguous(), op, ": an fp32 b with a bf16 a or a b_mask must be a contiguous matrix W or its transpose, got strides ",
                      b.strides());
    TORCH_CHECK_VALUE(!b_mask.defined() || (b_mask.scalar_type() == at::kInt && b_mask.sizes() == at::IntArrayRef({w.size(0), (w.size(1) + 31) / 32})),
                      op, ": b_mask must be W's packed mask, int32 (", w.size(0), ", ", (w.size(1) + 31) / 32, "), got ",
                      b_mask.defined() ? b_mask.sizes() : at::IntArrayRef{}, " ", b_mask.defined() ? b_mask.scalar_type() : at::kInt);
    return;
  }
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16), op,
                    ": a and b must both be float32 or both bfloat16 (or a bfloat16 with an fp32 b), got ", a.scalar_type(), " and ",
                    b.scalar_type());
  TORCH_CHECK_VALUE(!b_mask.defined(), op, ": b_mask goes with an fp32 b only");
}

// engine "native": gemm_avx512.cpp's AVX512-BF16 kernel for bf16; for fp32 its AVX-512 kernel, or
// gemm_avx2.cpp's AVX2 one in builds without AVX-512.
void check_native_engine(const char* op, GemmEngine engine, at::ScalarType dtype) {
  if (engine != GemmEngine::kNative) return;
  if (dtype == at::kBFloat16) {
    TORCH_CHECK_VALUE(bf16_gemm_available(), op, ": engine 'native' for bf16 is the AVX512-BF16 kernel (gemm_avx512.cpp); this build "
                      "or CPU lacks AVX512-BF16");
    return;
  }
  TORCH_CHECK_VALUE(f32_gemm_available(), op, ": engine 'native' for fp32 is the AVX-512 kernel (gemm_avx512.cpp) or, built "
                    "without AVX-512, the AVX2 + FMA one (gemm_avx2.cpp); this build or CPU has neither (", dtype, ")");
}

// fp32 on the native kernel: asked for, or "auto" where f32_native_by_default().
bool use_f32_native(GemmEngine engine) {
  return engine == GemmEngine::kNative || (engine == GemmEngine::kAuto && f32_native_by_default());
}

}  // namespace

bool f32_native_by_default() {
#if defined(HARMODT_AVX512_GEMM)
  return f32_gemm_available();
#else
  return f32_gemm_available() && !onednn_gemm_available();
#endif
}

void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b_in, const at::Tensor& bias, GemmEngine engine,
              const at::Tensor& b_mask) {
  check_native_engine("gemm", engine, a.scalar_type());
  if (a.scalar_type() == at::kBFloat16 && out.is_contiguous() &&
      (engine == GemmEngine::kNative || (engine == GemmEngine::kAuto && bf16_gemm_available()))) {
    bf16_gemm_out(out, a, b_in, bias, b_mask);
    return;
  }
  if (a.scalar_type() == at::kFloat && out.is_contiguous() && use_f32_native(engine)) {
    f32_gemm_out(out, a, b_in, bias, b_mask);
    return;
  }
  const at::Tensor b = operand_as(b_in, b_mask, a.scalar_type());
  if (a.scalar_type() == at::kBFloat16 && engine == GemmEngine::kAuto && !onednn_gemm_available()) {
    // No bf16 matmul instructions and no oneDNN bf16 path on this CPU (AVX2 only): at::mm's bf16
    // fallback there runs at a few GFLOP/s. The operands widen to fp32 exactly, so the fp32 GEMM
    // of the widened operands, rounded once to bf16, is a bf16 GEMM with fp32 accumulation (what
    // oneDNN computes, up to the order of the sums), at fp32 speed.
    // (Called under CPU autocast by the bf16 block nodes: keep autocast from casting the fp32
    // operands back to bf16 for at::mm.)
    // The fp32 GEMM is gemm_avx2.cpp's kernel where it runs, else at::mm.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet(c10::DispatchKey::AutocastCPU));
    const at::Tensor a32 = a.to(at::kFloat), b32 = b.to(at::kFloat);
    at::Tensor out32 = at::empty({a.size(0), b.size(1)}, a32.options());
    gemm_out(out32, a32, b32, bias.defined() ? bias.to(at::kFloat) : at::Tensor(), GemmEngine::kAuto);
    out.copy_(out32);
    return;
  }
  const bool onednn = engine == GemmEngine::kOneDnn ||
                      (engine == GemmEngine::kAuto && a.scalar_type() == at::kFloat && onednn_gemm_available());
  TORCH_CHECK(!(engine == GemmEngine::kOneDnn && !onednn_gemm_available()),
              "gemm: engine 'onednn' requested but this PyTorch build does not export at::native::mkldnn_matmul "
              "(or was built without oneDNN); use engine 'auto' or 'blas'");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (!onednn || m == 0 || n == 0 || k == 0 || !out.is_contiguous()) {
    if (bias.defined())
      at::addmm_out(out, bias, a, b);
    else
      at::mm_out(out, a, b);
    return;
  }
  const at::Tensor a_ = plain_or_transposed(a) ? a : a.contiguous();
  const at::Tensor b_ = plain_or_transposed(b) ? b : b.contiguous();
  if (bias.defined()) out.copy_(bias.expand({m, n}));
  at::native::mkldnn_matmul(a_, b_, out, bias.defined() ? 1.0f : 0.0f, 1.0f);
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias, c10::string_view engine,
                const std::optional<at::Tensor>& b_mask) {
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu(), "gemm: a and b must be CPU tensors");
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "gemm: a (M, K) and b (K, N) must be 2-D with one K, got ",
                    a.sizes(), " and ", b.sizes());
  const at::Tensor b_mask_t = b_mask.has_value() ? *b_mask : at::Tensor();
  check_b_operand("gemm", a, b, b_mask_t);
  at::Tensor bias_t;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == b.size(1) && bias->scalar_type() == a.scalar_type(),
                      "gemm: bias must be (", b.size(1), ",) of a's dtype, got ", bias->sizes(), " ", bias->scalar_type());
    bias_t = *bias;
  }
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_out(out, a, b, bias_t, parse_engine(engine), b_mask_t);
  return out;
}

// gemm_epilogue(a, b, epilogue, bias, residual, mask, seed, p, engine) -> (out, sq): a GEMM and the
// pass that follows it in a training block, as one op:
//   "bias_relu"         out = relu(a b + bias)                        in a's dtype (fc)
//   "bias_dropout_add"  out = residual + dropout(a b + bias, seed, p) in fp32 (proj, mlp_proj)
//   "masked_grad"       out = (a b) * mask, sq = sum(out^2)           in fp32 (a weight gradient, Eq. 4)
//   "relu_grad"         out = (a b) * (z > 0), sq = its column sums   in a's dtype (ReLU's backward and
//                       the fc bias gradient; z, the ReLU's output in a's dtype, comes as `residual`)
// (bias fp32 (N,), residual fp32 (M, N), mask packed int32 (M, ceil(N / 32)); sq float64 0-dim for
// masked_grad, fp32 (N,) for relu_grad, undefined for the other two). bf16 operands on the native kernel ("auto" where available, or
// "native") fuse the epilogue into the GEMM's output blocks: nothing of (M, N) goes through memory
// in between, and it is not rounded to bf16 first. Otherwise: the GEMM, then the epilogue ops
// (bias_relu_, bias_dropout_add(_), apply_masks_sq_norms_) -- for fp32 exactly what the blocks ran
// before this op existed.
std::tuple<at::Tensor, at::Tensor> gemm_epilogue(const at::Tensor& a, const at::Tensor& b, c10::string_view epilogue,
                                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                                 const std::optional<at::Tensor>& mask, int64_t seed, double p,
                                                 c10::string_view engine_name, const std::optional<at::Tensor>& b_mask) {
  const GemmEngine engine = parse_engine(engine_name);
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "gemm_epilogue: a (M, K) and b (K, N) must be 2-D with one K, got ",
                    a.sizes(), " and ", b.sizes());
  const at::Tensor b_mask_t = b_mask.has_value() ? *b_mask : at::Tensor();
  check_b_operand("gemm_epilogue", a, b, b_mask_t);
  const int64_t m = a.size(0), n = b.size(1);
  GemmEpilogue kind;
  if (epilogue == "bias_relu")
    kind = GemmEpilogue::kBiasRelu;
  else if (epilogue == "bias_dropout_add")
    kind = GemmEpilogue::kBiasDropoutAdd;
  else if (epilogue == "masked_grad")
    kind = GemmEpilogue::kMaskedGrad;
  else if (epilogue == "relu_grad")
    kind = GemmEpilogue::kReluGrad;
  else
    TORCH_CHECK_VALUE(false, "gemm_epilogue: epilogue must be 'bias_relu', 'bias_dropout_add', 'masked_grad' or 'relu_grad', got '",
                      std::string(epilogue), "'");
  at::Tensor bias_t, res_t, mask_t;
  if (kind == GemmEpilogue::kReluGrad) {
    TORCH_CHECK_VALUE(residual.has_value() && residual->defined() && residual->sizes() == at::IntArrayRef({m, n}) &&
                          residual->scalar_type() == a.scalar_type(),
                      "gemm_epilogue: 'relu_grad' needs residual = the ReLU's output, ", a.scalar_type(), " (", m, ", ", n, ")");
    res_t = *residual;
  }
  if (kind == GemmEpilogue::kBiasRelu || kind == GemmEpilogue::kBiasDropoutAdd) {
    TORCH_CHECK_VALUE(bias.has_value() && bias->defined() && bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat,
                      "gemm_epilogue: '", std::string(epilogue), "' needs bias, float32 (", n, ",)");
    bias_t = *bias;
  }
  if (kind == GemmEpilogue::kBiasDropoutAdd) {
    TORCH_CHECK_VALUE(residual.has_value() && residual->defined() && residual->sizes() == at::IntArrayRef({m, n}) &&
                          residual->scalar_type() == at::kFloat,
                      "gemm_epilogue: 'bias_dropout_add' needs residual, float32 (", m, ", ", n, ")");
    TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "gemm_epilogue: p must be in [0, 1), got ", p);
    res_t = *residual;
  }
  if (kind == GemmEpilogue::kMaskedGrad) {
    TORCH_CHECK_VALUE(mask.has_value() && mask->defined() && mask->sizes() == at::IntArrayRef({m, (n + 31) / 32}) &&
                          mask->scalar_type() == at::kInt,
                      "gemm_epilogue: 'masked_grad' needs mask, packed int32 (", m, ", ", (n + 31) / 32, ")");
    mask_t = *mask;
  }
  check_native_engine("gemm_epilogue", engine, a.scalar_type());
  if (a.scalar_type() == at::kBFloat16 && (engine == GemmEngine::kNative || (engine == GemmEngine::kAuto && bf16_gemm_available())))
    return bf16_gemm_epilogue(a, b, kind, bias_t, res_t, mask_t, seed, p, b_mask_t);
  if (a.scalar_type() == at::kFloat && use_f32_native(engine))
    return f32_gemm_epilogue(a, b, kind, bias_t, res_t, mask_t, seed, p, b_mask_t);
  // the GEMM, then its epilogue op
  at::Tensor y = at::empty({m, n}, a.options());
  gemm_out(y, a, b, at::Tensor(), engine, b_mask_t);
  switch (kind) {
    case GemmEpilogue::kBiasRelu: {
      static const auto op = handle<at::Tensor(at::Tensor, const at::Tensor&)>("harmodt_kernels::bias_relu_");
      return {op.call(y, bias_t), at::Tensor()};
    }
    case GemmEpilogue::kBiasDropoutAdd: {
      if (y.scalar_type() == at::kFloat) {
        static const auto op = handle<at::Tensor(at::Tensor, const at::Tensor&, const at::Tensor&, int64_t, double)>(
            "harmodt_kernels::bias_dropout_add_");
        return {op.call(y, bias_t, res_t, seed, p), at::Tensor()};
      }
      static const auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>(
          "harmodt_kernels::bias_dropout_add");
      return {op.call(y, bias_t, res_t, seed, p), at::Tensor()};
    }
    case GemmEpilogue::kReluGrad: {
      static const auto op = handle<at::Tensor(at::Tensor, const at::Tensor&, bool)>("harmodt_kernels::bias_relu_backward_");
      at::Tensor db = op.call(y, res_t, true);
      return {y, db};
    }
    case GemmEpilogue::kMaskedGrad:
    default: {
      static const auto op =
          handle<at::Tensor(at::TensorList, at::TensorList, at::TensorList)>("harmodt_kernels::apply_masks_sq_norms_");
      const at::Tensor out = y.scalar_type() == at::kFloat ? y : at::empty({m, n}, a.options().dtype(at::kFloat));
      const at::Tensor sq = op.call({out}, {y}, {mask_t});
      return {out, sq.reshape({})};
    }
  }
}

namespace {

// The GEMMs of linear go through the dispatcher as harmodt_kernels::gemm calls (below autograd), so
// dispatch modes see them (bench/test_bench_train.py captures a step's GEMMs that way).
at::Tensor dispatch_gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  static const auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                                           const std::optional<at::Tensor>&)>("harmodt_kernels::gemm");
  return op.call(a, b, bias, "auto", std::nullopt);
}

// The forward below autograd: y (M, N) = x (M, K) weight^T (+ bias); the gemm op checks the
// operands (weight^T is its b).
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "linear: weight must be 2-D (N, K), got ", weight.sizes());
  return dispatch_gemm(x, weight.t(), bias);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_forward(x, weight, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    at::Tensor gy = grads[0].scalar_type() == x.scalar_type() ? grads[0] : grads[0].to(x.scalar_type());  // (M, N)
    at::Tensor dx, dw, db;
    at::AutoDispatchBelowADInplaceOrView guard;
    if (ctx->needs_input_grad(0)) dx = dispatch_gemm(gy, weight, std::nullopt);     // (M, K) = gy weight
    if (ctx->needs_input_grad(1)) dw = dispatch_gemm(gy.t(), x, std::nullopt);      // (N, K) = gy^T x
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2))  // (N,): fp32 row sums
      db = at::sum(gy, {0}, false, at::kFloat).to(gy.scalar_type());
    return {dx, dw, db};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return LinearFunction::apply(x, weight, bias);
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def("gemm(Tensor a, Tensor b, Tensor? bias, str engine, Tensor? b_mask=None) -> Tensor");
  m.def("onednn_gemm_available() -> bool", &harmodt::onednn_gemm_available);
  m.def("bf16_gemm_available() -> bool", &harmodt::bf16_gemm_available);
  m.def("f32_gemm_available() -> bool", &harmodt::f32_gemm_available);
  m.def("f32_native_by_default() -> bool", &harmodt::f32_native_by_default);
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("gemm_epilogue(Tensor a, Tensor b, str epilogue, Tensor? bias, Tensor? residual, Tensor? mask, int seed, float p, str engine, "
        "Tensor? b_mask=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) {
  m.impl("gemm", &harmodt::gemm);
  m.impl("gemm_epilogue", &harmodt::gemm_epilogue);
  m.impl("linear", &harmodt::linear_forward);
}

TORCH_LIBRARY_IMPL(harmodt_kernels, Autograd, m) { m.impl("linear", &harmodt::linear_autograd); }
