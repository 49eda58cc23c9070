// One transformer block's training step (fp32, or bf16 GEMMs under CPU autocast) as ONE C++ autograd
// node (the op fused_block):
//
//   h1 = LN1(x);  qkv = h1 W_qkv^T + b_qkv;  att = attention(qkv)            (causal, dropout p_attn;
//                                                                           the attention adds b_qkv)
//   x1 = x[query] + drop(att W_proj^T + b_proj);  h2 = LN2(x1)
//   z = relu(h2 W_fc^T + b_fc);  out = x1 + drop(z W_mlp^T + b_mlp)
//
// with the backward written out. It calls the library's ops (gemm, attention_forward/backward, the
// GEMM epilogues, layer_norm_forward/backward) through the dispatcher, below autograd, so profilers
// and dispatch modes still see each of them (bench/ replays the GEMMs it captures that way); what
// it removes is the Python between them (~30 op calls per block and step from Python, an
// autograd.Function's bookkeeping). harmodt/model.py's Block calls it with the same arguments and
// dropout seeds as its per-op path, whose result it equals bit for bit (tests/test_model.py).
//
// query: empty (every token's output) or {start, stop, step}, a slice of the T tokens (the last
// block computes the state tokens only); key_valid / query_pos are then those of the queries.
//
// masks: the task's packed masks of the 4 matrices (HarmoDT's single-task training step). Each
// forward GEMM then multiplies by W * M, expanded from the bits into a buffer right before it (and
// kept for the backward's dx GEMM), and each weight gradient is masked (Eq. 4) right after its GEMM,
// while it is in cache, its sum of squares written to grad_sq_norms for gradient clipping. That
// replaces two passes over all masked matrices per step (W * M before the blocks, the gradients'
// masking after them), whose 19 MB at the paper's size come from and go to memory.
//
// bf16 on the AVX512-BF16 kernel (gemm_bf16.cpp): the GEMMs read the fp32 W through its mask
// (b_mask; W * M rounded to bf16 as packed, no W * M buffer) and carry their epilogues
// (gemm_epilogue: fc bias + ReLU, bias + dropout + residual, ReLU's backward with the fc bias
// gradient, each weight gradient's masking and sum of squares).
// gemm_dtype: None/float32, or bfloat16 (harmodt/model.py passes it under CPU bf16 autocast): the
// GEMMs then take bf16 operands and give bf16 outputs (W * M is rounded to bf16 as it is expanded,
// the layer norms write bf16 outputs and read the bf16 gradients of them), attention runs on the
// bf16 projection, and the residual
// stream, layer norms, bias and weight gradients stay fp32 -- the dtypes autocast gives the per-op
// blocks, whose result this matches to bf16 rounding (not bit for bit: autocast's own layer norm
// and bias handling round elsewhere).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace harmodt {
namespace {

using Opt = std::optional<at::Tensor>;

// b_mask: with bf16 a and an fp32 weight b (W or W^T), W * M rounded to bf16 as the GEMM packs it.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const Opt& bias, const std::string& engine, const Opt& b_mask = std::nullopt) {
  static const auto op =
      handle<at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, c10::string_view, const Opt&)>("harmodt_kernels::gemm");
  return op.call(a, b, bias, engine, b_mask);
}
// A GEMM with the pass after it fused in (gemm.cpp's gemm_epilogue; the bf16 blocks use it).
std::tuple<at::Tensor, at::Tensor> gemm_epilogue(const at::Tensor& a, const at::Tensor& b, const char* epilogue, const Opt& bias,
                                                 const Opt& residual, const Opt& mask, int64_t seed, double p, const std::string& engine,
                                                 const Opt& b_mask = std::nullopt) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::string_view, const Opt&,
                                                                   const Opt&, const Opt&, int64_t, double, c10::string_view, const Opt&)>(
      "harmodt_kernels::gemm_epilogue");
  return op.call(a, b, epilogue, bias, residual, mask, seed, p, engine, b_mask);
}
// The attention adds the projection's bias to q/k/v itself (the GEMM writes qkv without it).
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& qkv, const at::Tensor& key_valid,
                                                     const at::Tensor& query_pos, double p, int64_t seed,
                                                     const at::Tensor& qkv_bias) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const Opt&, const at::Tensor&,
                                                                   const at::Tensor&, double, int64_t, bool, const Opt&)>(
      "harmodt_kernels::attention_forward");
  return op.call(qkv, std::nullopt, std::nullopt, key_valid, query_pos, p, seed, true, qkv_bias);
}
at::Tensor attention_backward(const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& key_valid,
                              const at::Tensor& query_pos, const at::Tensor& lse, double p, int64_t seed,
                              const at::Tensor& qkv_bias) {
  static const auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, double, int64_t, const Opt&)>(
      "harmodt_kernels::attention_backward");
  return op.call(grad, qkv, std::nullopt, std::nullopt, key_valid, query_pos, lse, p, seed, qkv_bias);
}
at::Tensor bias_relu_(const at::Tensor& z, const at::Tensor& bias) {
  static const auto op = handle<at::Tensor(at::Tensor, const at::Tensor&)>("harmodt_kernels::bias_relu_");
  return op.call(z, bias);
}
at::Tensor bias_relu_backward_(const at::Tensor& grad, const at::Tensor& out) {  // grad <- grad * (out > 0); returns db
  static const auto op = handle<at::Tensor(at::Tensor, const at::Tensor&, bool)>("harmodt_kernels::bias_relu_backward_");
  return op.call(grad, out, true);
}
at::Tensor bias_dropout_add_(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& residual, int64_t seed, double p) {
  static const auto op = handle<at::Tensor(at::Tensor, const at::Tensor&, const at::Tensor&, int64_t, double)>(
      "harmodt_kernels::bias_dropout_add_");
  return op.call(y, bias, residual, seed, p);  // residual + dropout(y + bias), written over y
}
at::Tensor bias_dropout_add(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& residual, int64_t seed, double p) {
  static const auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>(
      "harmodt_kernels::bias_dropout_add");
  return op.call(y, bias, residual, seed, p);  // residual + dropout(y + bias), in the residual's dtype
}
// residual + dropout(y + bias): over y when both share a dtype (fp32), else a fresh tensor of the
// residual's dtype (bf16 GEMM output, fp32 stream)
at::Tensor add_to_stream(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& residual, int64_t seed, double p) {
  return y.scalar_type() == residual.scalar_type() ? bias_dropout_add_(y, bias, residual, seed, p)
                                                   : bias_dropout_add(y, bias, residual, seed, p);
}
std::tuple<at::Tensor, at::Tensor> dropout_bias_backward(const at::Tensor& grad, int64_t seed, double p, at::ScalarType dtype) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, double, bool, at::ScalarType)>(
      "harmodt_kernels::dropout_bias_backward");
  return op.call(grad, seed, p, true, dtype);  // (dropout(grad) in `dtype`, fp32 bias gradient)
}
// y in the GEMMs' dtype (written by the norm itself), mean and rstd in fp32
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                                  double eps, at::ScalarType y_dtype) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                                const at::Tensor&, double,
                                                                                std::optional<at::ScalarType>)>(
      "harmodt_kernels::layer_norm_forward");
  return op.call(x, w, b, eps, y_dtype);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& w, const Opt& extra) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&)>(
      "harmodt_kernels::layer_norm_backward");
  return op.call(grad, x, mean, rstd, w, extra);
}

at::Tensor column_sums(const at::Tensor& grad) {  // fp32 (N,) sums over the rows of a bf16 or fp32 (M, N)
  static const auto op = handle<at::Tensor(const at::Tensor&)>("harmodt_kernels::column_sums");
  return op.call(grad);
}

// W * M for a GEMM in the GEMMs' dtype (W itself, or W cast, without a mask), into a fresh buffer
// that the GEMM reads right away (the block keeps it for the backward's dx GEMM). fp32 W with bf16
// GEMMs: expanded and rounded to bf16 in the same pass.
at::Tensor effective(const at::Tensor& w, const at::Tensor& mask, at::ScalarType dtype) {
  if (!mask.defined()) return w.to(dtype);
  static const auto op = handle<void(at::TensorList, at::TensorList, at::TensorList)>("harmodt_kernels::apply_masks_");
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(dtype));
  op.call({out}, {w}, {mask});
  return out;
}
// grad * M (Eq. 4) while the gradient is fresh from its GEMM, in place, or (a bf16 GEMM's gradient
// of an fp32 weight) widened into a new fp32 tensor in the same pass; the sum of squares goes to *sq.
at::Tensor mask_grad(const at::Tensor& grad, const at::Tensor& mask, at::ScalarType dtype, double* sq) {
  static const auto op =
      handle<at::Tensor(at::TensorList, at::TensorList, at::TensorList)>("harmodt_kernels::apply_masks_sq_norms_");
  const at::Tensor out = grad.scalar_type() == dtype ? grad : at::empty(grad.sizes(), grad.options().dtype(dtype));
  *sq = op.call({out}, {grad}, {mask}).item<double>();
  return out;
}

// Whether the block's GEMMs take each fp32 W with its task's packed mask (b_mask), masking it as they
// pack it, instead of a W * M buffer: the native kernels do (bf16 GEMMs on the AVX512-BF16 kernel,
// fp32 GEMMs on the AVX-512 or AVX2 one), the other engines would run a masking pass per GEMM.
bool masks_in_gemms(at::ScalarType gd, at::ScalarType wd, const std::string& engine) {
  if (wd != at::kFloat || (engine != "auto" && engine != "native")) return false;
  if (gd == at::kBFloat16) return bf16_gemm_available();
  return gd == at::kFloat && f32_gemm_available() && (engine == "native" || f32_native_by_default());
}

struct Dropouts {
  double p_attn, p_proj, p_mlp;
  int64_t seed_attn, seed_proj, seed_mlp;
};

// The tensors the backward needs, in this order (kWDtype: an empty tensor of the weights' dtype;
// kQkv: the projection without its bias kBQkv, which the attention adds).
enum Saved { kX2, kH1, kMean1, kRstd1, kQkv, kAtt, kLse, kX1, kH2, kMean2, kRstd2, kZ,
             kLn1W, kWQkv, kWProj, kLn2W, kWFc, kWMlp /* W * M where masked (on the native kernels: W) */, kKeyValid, kQueryPos, kMQkv, kMProj, kMFc, kMMlp,
             kWDtype, kBQkv, kNumSaved };

// The four GEMM matrices' packed masks (qkv, proj, fc, mlp_proj), undefined where unmasked.
using Masks = std::vector<at::Tensor>;

at::Tensor query_rows(const at::Tensor& x, const std::vector<int64_t>& query) {  // x (B, T, C) -> x[:, query]
  return query.empty() ? x : x.slice(1, query[0], query[1], query[2]);
}

// The forward; `saved` (if given) receives what the backward reads. gd: the GEMMs' dtype. fp32, or
// bf16 (CPU bf16 autocast): then the GEMMs take bf16 operands (W * M rounded once per step, the layer
// norms writing bf16 outputs) and give bf16 outputs, attention runs on the bf16 projection,
// and the residual stream, layer norms, biases and every gradient the node returns stay fp32 -- the
// dtypes autocast gives the per-op blocks.
at::Tensor block_forward(const at::Tensor& x, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& w_qkv,
                         const at::Tensor& b_qkv, const at::Tensor& w_proj, const at::Tensor& b_proj, const at::Tensor& ln2_w,
                         const at::Tensor& ln2_b, const at::Tensor& w_fc, const at::Tensor& b_fc, const at::Tensor& w_mlp,
                         const at::Tensor& b_mlp, const at::Tensor& key_valid, const at::Tensor& query_pos, int64_t n_head,
                         double eps, const Dropouts& d, const std::vector<int64_t>& query, const std::string& engine,
                         const Masks& masks, at::ScalarType gd, std::vector<at::Tensor>* saved) {
  TORCH_CHECK_VALUE(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == at::kFloat,
                    "fused_block: x must be a contiguous float32 (B, T, C) tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK_VALUE(gd == at::kFloat || gd == at::kBFloat16, "fused_block: gemm_dtype must be float32 or bfloat16, got ", gd);
  TORCH_CHECK_VALUE(query.empty() || query.size() == 3, "fused_block: query must be empty or [start, stop, step]");
  const int64_t b = x.size(0), t = x.size(1), c = x.size(2);
  TORCH_CHECK_VALUE(n_head > 0 && c % n_head == 0, "fused_block: n_head ", n_head, " must divide the width ", c);
  TORCH_CHECK_VALUE(masks.size() == 4, "fused_block: masks must list the 4 matrices' masks (or None), got ", masks.size());
  const at::Tensor x2 = x.view({b * t, c});  // (BT, C)
  auto [h1, mean1, rstd1] = layer_norm_forward(x2, ln1_w, ln1_b, eps, gd);
  // W * M of each masked matrix, expanded from the bits right before its GEMM and kept for the
  // backward's (recomputing it there measured 2-4 % slower per step than keeping these 19 MB)
  // On the native kernels (AVX512-BF16 for bf16, AVX-512 or AVX2 for fp32) the fp32 W goes to the GEMMs as it
  // is, with its mask: the kernel masks W (and rounds it to bf16) while it packs it, for the forward
  // and again for the backward's dx, so no W * M buffer is written or kept.
  const bool pack_w = masks_in_gemms(gd, w_qkv.scalar_type(), engine);
  auto eff = [&](const at::Tensor& w, const at::Tensor& mask) { return pack_w ? w : effective(w, mask, gd); };
  auto bm = [&](int i) -> Opt { return pack_w && masks[i].defined() ? Opt(masks[i]) : Opt(); };
  const at::Tensor we_qkv = eff(w_qkv, masks[0]), we_proj = eff(w_proj, masks[1]);
  const at::Tensor we_fc = eff(w_fc, masks[2]), we_mlp = eff(w_mlp, masks[3]);
  // (B, T, 3, nh, hd) without the bias, which the attention adds as it reads q/k/v (in fp32)
  const at::Tensor qkv = gemm(h1, we_qkv.t(), std::nullopt, engine, bm(0)).view({b, t, 3, n_head, c / n_head});
  auto [att3, lse] = attention_forward(qkv, key_valid, query_pos, d.p_attn, d.seed_attn, b_qkv);  // (B, Tq, C)
  const int64_t tq = att3.size(1);
  const at::Tensor att = att3.view({b * tq, c});
  const at::Tensor res = query.empty() ? x2 : query_rows(x, query).reshape({b * tq, c});  // the stream at the queries
  // bf16 GEMMs, and fp32 ones on the native kernel, take their bias, ReLU, dropout and residual add
  // into the GEMM itself (gemm_epilogue)
  const bool fuse = gd == at::kBFloat16 || pack_w;
  const at::Tensor x1 = fuse ? std::get<0>(gemm_epilogue(att, we_proj.t(), "bias_dropout_add", b_proj, res.contiguous(), std::nullopt,
                                                         d.seed_proj, d.p_proj, engine, bm(1)))
                             : add_to_stream(gemm(att, we_proj.t(), std::nullopt, engine), b_proj, res, d.seed_proj, d.p_proj);
  auto [h2, mean2, rstd2] = layer_norm_forward(x1, ln2_w, ln2_b, eps, gd);
  const at::Tensor z = fuse ? std::get<0>(gemm_epilogue(h2, we_fc.t(), "bias_relu", b_fc, std::nullopt, std::nullopt, 0, 0.0, engine, bm(2)))
                            : bias_relu_(gemm(h2, we_fc.t(), std::nullopt, engine), b_fc);  // (BTq, 4C)
  const at::Tensor out = fuse ? std::get<0>(gemm_epilogue(z, we_mlp.t(), "bias_dropout_add", b_mlp, x1, std::nullopt, d.seed_mlp,
                                                          d.p_mlp, engine, bm(3)))
                              : add_to_stream(gemm(z, we_mlp.t(), std::nullopt, engine), b_mlp, x1, d.seed_mlp, d.p_mlp);
  if (saved != nullptr)
    *saved = {x2, h1, mean1, rstd1, qkv, att, lse, x1, h2, mean2, rstd2, z, ln1_w, we_qkv, we_proj, ln2_w, we_fc, we_mlp,
              key_valid, query_pos, masks[0], masks[1], masks[2], masks[3], at::empty({0}, w_qkv.options()), b_qkv};
  return out.view({b, tq, c});
}

// (dx, dln1_w, dln1_b, dw_qkv, db_qkv, dw_proj, db_proj, dln2_w, dln2_b, dw_fc, db_fc, dw_mlp, db_mlp)
// With masks, each weight gradient is masked (Eq. 4) right after its GEMM and its sum of squares
// goes to sq_norms[i] (float64 (4,), if defined) for gradient clipping. The GEMMs run in the dtype
// the forward's did; weight gradients come back in the weights' dtype.
std::vector<at::Tensor> block_backward(const at::Tensor& grad, const std::vector<at::Tensor>& s, const Dropouts& d,
                                       const std::vector<int64_t>& query, const std::string& engine, const at::Tensor& sq_norms) {
  const at::ScalarType gd = s[kQkv].scalar_type(), wd = s[kWDtype].scalar_type();
  // the saved W of matrix i: W * M in the GEMMs' dtype, or (on the native kernels, masks_in_gemms)
  // the fp32 W itself, masked (and rounded) as the dx GEMM packs it
  const bool packed_w = masks_in_gemms(gd, wd, engine);
  auto w_mask = [&](int i) -> Opt { return packed_w && s[kMQkv + i].defined() ? Opt(s[kMQkv + i]) : Opt(); };
  // dW = dy^T x for matrix i, masked (Eq. 4) with its sum of squares recorded: the native kernels
  // (bf16, and fp32 with masks_in_gemms) mask it in their output blocks (gemm_epilogue), other fp32
  // GEMMs right after (apply_masks_sq_norms_, whose sum order the fp32 epilogue shares, so the per-op
  // blocks get the same bits)
  auto weight_grad = [&](const at::Tensor& dy, const at::Tensor& x, int i) {
    const at::Tensor& m = s[kMQkv + i];
    if (!m.defined()) return gemm(dy.t(), x, std::nullopt, engine).to(wd);
    double sq = 0.0;
    at::Tensor out;
    if ((gd == at::kBFloat16 && wd == at::kFloat) || packed_w) {
      at::Tensor sq_t;
      std::tie(out, sq_t) = gemm_epilogue(dy.t(), x, "masked_grad", std::nullopt, std::nullopt, m, 0, 0.0, engine);
      sq = sq_t.item<double>();
    } else {
      out = mask_grad(gemm(dy.t(), x, std::nullopt, engine), m, wd, &sq);
    }
    if (sq_norms.defined()) sq_norms.data_ptr<double>()[i] = sq;
    return out;
  };
  const at::Tensor& qkv = s[kQkv];
  const int64_t b = qkv.size(0), t = qkv.size(1), c = s[kX2].size(1), tq = s[kX1].size(0) / b;
  const at::Tensor g = grad.reshape({b * tq, c}).contiguous().to(at::kFloat);  // (BTq, C), the fp32 stream's
  // MLP: out = x1 + drop(z W_mlp^T + b_mlp), z = relu(h2 W_fc^T + b_fc), h2 = LN2(x1)
  auto [dy2, db_mlp] = dropout_bias_backward(g, d.seed_mlp, d.p_mlp, gd);
  at::Tensor dz, db_fc;  // (BTq, 4C): ReLU's gradient applied while dz is in cache (z then is for dW), and fc's bias gradient
  if (gd == at::kBFloat16 || packed_w) {  // (fp32 on other engines: bias_relu_backward_ after the GEMM; the same sums)
    std::tie(dz, db_fc) = gemm_epilogue(dy2, s[kWMlp], "relu_grad", std::nullopt, s[kZ], std::nullopt, 0, 0.0, engine, w_mask(3));
  } else {
    dz = gemm(dy2, s[kWMlp], std::nullopt, engine, w_mask(3));
    db_fc = bias_relu_backward_(dz, s[kZ]);
  }
  const at::Tensor dw_mlp = weight_grad(dy2, s[kZ], 3);
  const at::Tensor dh2 = gemm(dz, s[kWFc], std::nullopt, engine, w_mask(2));  // the layer norm reads it in gd
  const at::Tensor dw_fc = weight_grad(dz, s[kH2], 2);
  auto [dx1, dln2_w, dln2_b] = layer_norm_backward(dh2, s[kX1], s[kMean2], s[kRstd2], s[kLn2W], g);  // + g: the residual's
  // attention: x1 = x + drop(att W_proj^T + b_proj), att = attention(LN1(x) W_qkv^T + b_qkv)
  auto [dy1, db_proj] = dropout_bias_backward(dx1, d.seed_proj, d.p_proj, gd);
  const at::Tensor datt = gemm(dy1, s[kWProj], std::nullopt, engine, w_mask(1));
  const at::Tensor dw_proj = weight_grad(dy1, s[kAtt], 1);
  const at::Tensor dqkv = attention_backward(datt.view({b, tq, c}), qkv, s[kKeyValid], s[kQueryPos], s[kLse], d.p_attn, d.seed_attn,
                                             s[kBQkv]).view({b * t, 3 * c});
  // first, while the attention's output is still in cache (fp32 sums)
  const at::Tensor db_qkv = gd == at::kFloat ? dqkv.sum(0) : column_sums(dqkv);
  const at::Tensor dh1 = gemm(dqkv, s[kWQkv], std::nullopt, engine, w_mask(0));
  const at::Tensor dw_qkv = weight_grad(dqkv, s[kH1], 0);
  auto [dx, dln1_w, dln1_b] =
      layer_norm_backward(dh1, s[kX2], s[kMean1], s[kRstd1], s[kLn1W], query.empty() ? Opt(dx1) : Opt());
  if (!query.empty())  // the residual stream's gradient goes back to the query tokens only
    query_rows(dx.view({b, t, c}), query).add_(dx1.view({b, tq, c}));
  return {dx.view({b, t, c}), dln1_w, dln1_b, dw_qkv, db_qkv, dw_proj, db_proj, dln2_w, dln2_b, dw_fc, db_fc, dw_mlp, db_mlp};
}

constexpr int kNumTensorArgs = 15;

// The masks and the norms' output, one argument that autograd does not take for inputs (it has no
// gradient for them, and some may be undefined).
struct MaskArgs {
  Masks masks;
  at::Tensor sq_norms;
  at::ScalarType gemm_dtype;
};

Masks mask_list(const c10::List<std::optional<at::Tensor>>& masks) {
  TORCH_CHECK_VALUE(masks.size() == 0 || masks.size() == 4, "fused_block: masks must be empty or list the 4 matrices' "
                    "packed masks (qkv, proj, fc, mlp_proj; None where unmasked), got ", masks.size());
  Masks out(4);
  for (size_t i = 0; i < masks.size(); ++i) {
    const std::optional<at::Tensor> m = masks[i];
    if (m.has_value() && m->defined()) out[i] = *m;
  }
  return out;
}

at::Tensor norms_arg(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->scalar_type() == at::kDouble && t->numel() == 4 && t->is_contiguous(),
                    "fused_block: grad_sq_norms must be a contiguous float64 tensor of 4 values, got ", t->sizes(), " ",
                    t->scalar_type());
  return *t;
}

class FusedBlockFunction : public torch::autograd::Function<FusedBlockFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ln1_w,
                            const at::Tensor& ln1_b, const at::Tensor& w_qkv, const at::Tensor& b_qkv, const at::Tensor& w_proj,
                            const at::Tensor& b_proj, const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& w_fc,
                            const at::Tensor& b_fc, const at::Tensor& w_mlp, const at::Tensor& b_mlp,
                            const at::Tensor& key_valid, const at::Tensor& query_pos, int64_t n_head, double eps,
                            double p_attn, int64_t seed_attn, double p_proj, int64_t seed_proj, double p_mlp, int64_t seed_mlp,
                            std::vector<int64_t> query, std::string engine, MaskArgs mask_args) {
    const Masks& masks = mask_args.masks;
    const at::Tensor& sq_norms = mask_args.sq_norms;
    const Dropouts d{p_attn, p_proj, p_mlp, seed_attn, seed_proj, seed_mlp};
    std::vector<at::Tensor> saved;
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = block_forward(x, ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b, w_fc, b_fc, w_mlp, b_mlp, key_valid,
                          query_pos, n_head, eps, d, query, engine, masks, mask_args.gemm_dtype, &saved);
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["sq_norms"] = sq_norms;
    ctx->saved_data["p"] = std::vector<double>{p_attn, p_proj, p_mlp};
    ctx->saved_data["seed"] = std::vector<int64_t>{seed_attn, seed_proj, seed_mlp};
    ctx->saved_data["query"] = query;
    ctx->saved_data["engine"] = engine;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();
    const auto p = ctx->saved_data["p"].toDoubleVector();
    const auto seed = ctx->saved_data["seed"].toIntVector();
    const Dropouts d{p[0], p[1], p[2], seed[0], seed[1], seed[2]};
    std::vector<at::Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      const c10::IValue& sq = ctx->saved_data["sq_norms"];
      out = block_backward(grads[0], saved, d, ctx->saved_data["query"].toIntVector(), ctx->saved_data["engine"].toStringRef(),
                           sq.isTensor() ? sq.toTensor() : at::Tensor());
    }
    out.resize(kNumTensorArgs + 11);  // none for key_valid, query_pos and the other arguments
    return out;
  }
};

at::Tensor fused_block_autograd(const at::Tensor& x, const at::Tensor& ln1_w, const at::Tensor& ln1_b, const at::Tensor& w_qkv,
                                const at::Tensor& b_qkv, const at::Tensor& w_proj, const at::Tensor& b_proj,
                                const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& w_fc, const at::Tensor& b_fc,
                                const at::Tensor& w_mlp, const at::Tensor& b_mlp, const at::Tensor& key_valid,
                                const at::Tensor& query_pos, int64_t n_head, double eps, double p_attn, int64_t seed_attn,
                                double p_proj, int64_t seed_proj, double p_mlp, int64_t seed_mlp, at::OptionalIntArrayRef query,
                                c10::string_view engine, const c10::List<std::optional<at::Tensor>>& masks,
                                const std::optional<at::Tensor>& grad_sq_norms, std::optional<at::ScalarType> gemm_dtype) {
  return FusedBlockFunction::apply(x, ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b, w_fc, b_fc, w_mlp, b_mlp,
                                   key_valid, query_pos, n_head, eps, p_attn, seed_attn, p_proj, seed_proj, p_mlp, seed_mlp,
                                   query.has_value() ? query->vec() : std::vector<int64_t>{}, std::string(engine),
                                   MaskArgs{mask_list(masks), norms_arg(grad_sq_norms), gemm_dtype.value_or(at::kFloat)});
}

// Without autograd (no gradient wanted): the forward alone.
at::Tensor fused_block_forward_only(const at::Tensor& x, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                                    const at::Tensor& w_qkv, const at::Tensor& b_qkv, const at::Tensor& w_proj,
                                    const at::Tensor& b_proj, const at::Tensor& ln2_w, const at::Tensor& ln2_b,
                                    const at::Tensor& w_fc, const at::Tensor& b_fc, const at::Tensor& w_mlp,
                                    const at::Tensor& b_mlp, const at::Tensor& key_valid, const at::Tensor& query_pos,
                                    int64_t n_head, double eps, double p_attn, int64_t seed_attn, double p_proj,
                                    int64_t seed_proj, double p_mlp, int64_t seed_mlp, at::OptionalIntArrayRef query,
                                    c10::string_view engine, const c10::List<std::optional<at::Tensor>>& masks,
                                    const std::optional<at::Tensor>& grad_sq_norms, std::optional<at::ScalarType> gemm_dtype) {
  return block_forward(x, ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b, w_fc, b_fc, w_mlp, b_mlp, key_valid,
                       query_pos, n_head, eps, Dropouts{p_attn, p_proj, p_mlp, seed_attn, seed_proj, seed_mlp},
                       query.has_value() ? query->vec() : std::vector<int64_t>{}, std::string(engine), mask_list(masks),
                       gemm_dtype.value_or(at::kFloat), nullptr);
}

}  // namespace
}  // namespace harmodt

TORCH_LIBRARY_FRAGMENT(harmodt_kernels, m) {
  m.def(
      "fused_block(Tensor x, Tensor ln1_w, Tensor ln1_b, Tensor w_qkv, Tensor b_qkv, Tensor w_proj, Tensor b_proj, "
      "Tensor ln2_w, Tensor ln2_b, Tensor w_fc, Tensor b_fc, Tensor w_mlp, Tensor b_mlp, Tensor key_valid, "
      "Tensor query_pos, int n_head, float eps, float p_attn, int seed_attn, float p_proj, int seed_proj, "
      "float p_mlp, int seed_mlp, int[]? query, str engine, Tensor?[] masks, Tensor(a!)? grad_sq_norms, "
      "ScalarType? gemm_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(harmodt_kernels, CPU, m) { m.impl("fused_block", &harmodt::fused_block_forward_only); }

TORCH_LIBRARY_IMPL(harmodt_kernels, Autograd, m) { m.impl("fused_block", &harmodt::fused_block_autograd); }
