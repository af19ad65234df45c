// masked_linear: y = x @ (weight * mask)^T + bias, and its backward as two
// ops (grad_x = grad_y @ (weight * mask), grad_w = (grad_y^T x) * mask).
//
// Here: argument checks, the generic "one block" kernels (apply_mask, then one
// GEMM) registered for every backend (CompositeExplicitAutograd; on CUDA the
// caching allocator makes the masked temporary cheap), and the autograd
// function. The CPU kernels (csrc/cpu/masked_linear.cpp) mask block by block
// and fall back to these for small layers.
//
// Autograd is a C++ function: one node per call instead of apply_mask + linear
// and their views (cheaper on small layers). Its backward calls the two
// gradient ops, so torch.compile sees opaque ops with fake kernels.
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>


namespace pyprune {

void check_masked_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [out, in], got ", weight.sizes());
  check_masked_args(op, x, weight, mask, bias);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x's last dim must be in_features = ",
              weight.size(1), ", got x of shape ", x.sizes());
}

void check_masked_linear_grad_input_args(const at::Tensor& grad_y, const at::Tensor& weight,
                                         const at::Tensor& mask) {
  const char* op = "masked_linear_grad_input";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [out, in], got ", weight.sizes());
  check_apply_mask(weight, mask);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == weight.size(0), op,
              ": grad_y's last dim must be out_features = ", weight.size(0), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == weight.device() && grad_y.scalar_type() == weight.scalar_type(), op,
              ": grad_y must match weight's dtype and device");
}

void check_masked_linear_grad_weight_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask) {
  const char* op = "masked_linear_grad_weight";
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool, op,
              ": mask must be a 2-d bool tensor [out, in], got ", mask.scalar_type(), " of shape ", mask.sizes());
  const int64_t out_f = mask.size(0), in_f = mask.size(1);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == out_f, op, ": grad_y's last dim must be out_features = ",
              out_f, ", got ", grad_y.sizes());
  TORCH_CHECK(x.dim() == grad_y.dim() && x.size(-1) == in_f &&
                  x.sizes().slice(0, x.dim() - 1) == grad_y.sizes().slice(0, grad_y.dim() - 1),
              op, ": x must be [..., ", in_f, "] with grad_y's leading dims, got x ", x.sizes(), " and grad_y ",
              grad_y.sizes());
  TORCH_CHECK(x.device() == mask.device() && grad_y.device() == mask.device(), op,
              ": grad_y, x and mask must be on one device");
  TORCH_CHECK(x.scalar_type() == grad_y.scalar_type(), op, ": grad_y and x must have the same dtype");
}

at::Tensor masked_linear_one_block(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                   const std::optional<at::Tensor>& bias) {
  return at::linear(x, call_apply_mask(weight, mask), bias);
}

at::Tensor masked_linear_grad_input_one_block(const at::Tensor& grad_y, const at::Tensor& weight,
                                              const at::Tensor& mask) {
  return at::matmul(grad_y, call_apply_mask(weight, mask));
}

at::Tensor masked_linear_grad_weight_one_block(const at::Tensor& grad_y, const at::Tensor& x,
                                               const at::Tensor& mask) {
  at::Tensor grad_w = at::mm(as_rows(grad_y, mask.size(0)).t(), as_rows(x, mask.size(1)));
  // masked_fill_, not mul_: a NaN at a pruned position (an inf in x or grad_y)
  // must become the exact 0 the sparse path gives, not NaN * 0 = NaN.
  return grad_w.masked_fill_(mask.logical_not(), 0);
}

namespace {

at::Tensor masked_linear_generic(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& bias) {
  check_masked_linear_args("masked_linear", x, weight, mask, bias);
  return masked_linear_one_block(x, weight, mask, bias);
}

at::Tensor masked_linear_grad_input_generic(const at::Tensor& grad_y, const at::Tensor& weight,
                                            const at::Tensor& mask) {
  check_masked_linear_grad_input_args(grad_y, weight, mask);
  return masked_linear_grad_input_one_block(grad_y, weight, mask);
}

at::Tensor masked_linear_grad_weight_generic(const at::Tensor& grad_y, const at::Tensor& x,
                                             const at::Tensor& mask) {
  check_masked_linear_grad_weight_args(grad_y, x, mask);
  return masked_linear_grad_weight_one_block(grad_y, x, mask);
}

at::Tensor call_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprune::masked_linear_grad_input", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_y, weight, mask);
}

at::Tensor call_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprune::masked_linear_grad_weight", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_y, x, mask);
}

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                        const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyprune::masked_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&)>();
  return op.call(x, weight, mask, bias);
}

// Small layers (the CPU kernels would not split the weight, and every other
// device): the masked weight is built once in the forward and kept for grad_x,
// as linear(x, weight * mask) would keep it, instead of masking again in the
// backward. Large CPU layers keep nothing extra (their backward masks block by
// block again). Symbolic shapes (torch.compile with dynamic weights) take the
// op path, which needs no size decisions here.
bool keep_masked_weight(const at::Tensor& weight) {
  if (weight.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return false;
  return !masked_linear_cpu_blocked(weight);
}

class MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& mask,
                            const std::optional<at::Tensor>& bias) {
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool keep = keep_masked_weight(weight);
    ctx->saved_data["masked_weight"] = keep;
    if (!keep) {
      ctx->save_for_backward({x, weight, mask});
      return call_forward(x, weight, mask, bias);
    }
    check_masked_linear_args("masked_linear", x, weight, mask, bias);
    const at::Tensor masked = call_apply_mask(weight, mask);
    ctx->save_for_backward({x, masked, mask});
    return at::linear(x, masked, bias);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight_or_masked = saved[1], &mask = saved[2];
    const at::Tensor& grad_y = grads[0];
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) {
      grad_x = ctx->saved_data["masked_weight"].toBool() ? at::matmul(grad_y, weight_or_masked)
                                                         : call_grad_input(grad_y, weight_or_masked, mask);
    }
    if (ctx->needs_input_grad(1)) grad_w = call_grad_weight(grad_y, x, mask);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_b = as_rows(grad_y, grad_y.size(-1)).sum(0);
    }
    return {grad_x, grad_w, at::Tensor(), grad_b};
  }
};

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& bias) {
  return MaskedLinearFunction::apply(x, weight, mask, bias);
}

// masked_linear_prezeroed: the weight is already zero where mask is False (the
// masked modules know it from the weight's version counter, see
// pyprune_ext.nn.masked), so the forward and grad_x are torch's own GEMMs on
// the weight itself, with no masked copy; only grad_w is masked.
at::Tensor masked_linear_prezeroed_generic(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                           const std::optional<at::Tensor>& bias) {
  check_masked_linear_args("masked_linear_prezeroed", x, weight, mask, bias);
  return at::linear(x, weight, bias);
}

at::Tensor call_prezeroed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                          const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyprune::masked_linear_prezeroed", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&)>();
  return op.call(x, weight, mask, bias);
}

class MaskedLinearPrezeroedFunction : public torch::autograd::Function<MaskedLinearPrezeroedFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& mask,
                            const std::optional<at::Tensor>& bias) {
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, weight, mask});
    return call_prezeroed(x, weight, mask, bias);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mask = saved[2];
    const at::Tensor& grad_y = grads[0];
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) grad_x = at::matmul(grad_y, weight);
    if (ctx->needs_input_grad(1)) grad_w = call_grad_weight(grad_y, x, mask);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_b = as_rows(grad_y, grad_y.size(-1)).sum(0);
    }
    return {grad_x, grad_w, at::Tensor(), grad_b};
  }
};

at::Tensor masked_linear_prezeroed_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                            const std::optional<at::Tensor>& bias) {
  return MaskedLinearPrezeroedFunction::apply(x, weight, mask, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CompositeExplicitAutograd, m) {
  m.impl("masked_linear", &masked_linear_generic);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input_generic);
  m.impl("masked_linear_grad_weight", &masked_linear_grad_weight_generic);
  m.impl("masked_linear_prezeroed", &masked_linear_prezeroed_generic);
}

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("masked_linear", &masked_linear_autograd);
  m.impl("masked_linear_prezeroed", &masked_linear_prezeroed_autograd);
}

}  // namespace pyprune
