// Autograd of apply_mask and sparse_masked_linear, in C++ (and apply_mask_'s
// in-place bookkeeping, pyprune/inplace.h): the masked layers
// call them on every forward, and a Python-registered autograd formula measured
// ~40 us (apply_mask) and ~100 us (sparse_masked_linear) per forward+backward on
// LeNet-size layers, as much as the layer itself. Also gives C++ users of the
// CMake library a differentiable masked path. The backward calls the gradient
// ops through the dispatcher, so torch.compile sees opaque ops with fake kernels.
#include <pyprune/inplace.h>
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace pyprune {
namespace {

class ApplyMask : public torch::autograd::Function<ApplyMask> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& mask) {
    ctx->save_for_backward({mask});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_apply_mask(weight, mask);
  }

  // d(where(mask, w, 0)) / dw: the incoming gradient, masked the same way.
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    return {call_apply_mask(grads[0], mask), at::Tensor()};
  }
};

at::Tensor apply_mask_autograd(const at::Tensor& weight, const at::Tensor& mask) {
  return ApplyMask::apply(weight, mask);
}

using ApplyMaskInplace = void(at::Tensor&, const at::Tensor&);

void apply_mask_inplace_autograd(at::Tensor& weight, const at::Tensor& mask) {
  refuse_grad_inplace("apply_mask_", weight, "weight");
  static const auto op = find_op<ApplyMaskInplace>("pyprune::apply_mask_");
  at::AutoDispatchBelowAutograd below_autograd;
  op.call(weight, mask);
}

void apply_mask_inplace_version(at::Tensor& weight, const at::Tensor& mask) {
  static const auto op = find_op<ApplyMaskInplace>("pyprune::apply_mask_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(weight, mask);
  }
  bump_version(weight);
}

using SparseForward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
using SparseGradInput = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using SparseGradWeight = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&);

// Inputs: x, weight, row_ptr, col_idx, col_ptr, row_idx, bias (the packed mask
// in the middle gets no gradient).
class SparseMaskedLinear : public torch::autograd::Function<SparseMaskedLinear> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& col_ptr,
                            const at::Tensor& row_idx, const std::optional<at::Tensor>& bias) {
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, row_ptr, col_idx, col_ptr, row_idx});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = find_op<SparseForward>("pyprune::sparse_masked_linear");
    return op.call(x, weight, row_ptr, col_idx, col_ptr, row_idx, bias);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    static const auto grad_input_op = find_op<SparseGradInput>("pyprune::sparse_masked_linear_grad_input");
    static const auto grad_weight_op = find_op<SparseGradWeight>("pyprune::sparse_masked_linear_grad_weight");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &row_ptr = saved[2], &col_idx = saved[3],
                     &col_ptr = saved[4], &row_idx = saved[5];
    const at::Tensor& grad_y = grads[0];
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) grad_x = grad_input_op.call(grad_y, weight, col_ptr, row_idx);
    if (ctx->needs_input_grad(1)) grad_w = grad_weight_op.call(grad_y, x, weight, row_ptr, col_idx);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(6)) {
      grad_b = as_rows(grad_y, grad_y.size(-1)).sum(0);
    }
    return {grad_x, grad_w, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_b};
  }
};

at::Tensor sparse_masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                                         const at::Tensor& col_idx, const at::Tensor& col_ptr,
                                         const at::Tensor& row_idx, const std::optional<at::Tensor>& bias) {
  return SparseMaskedLinear::apply(x, weight, row_ptr, col_idx, col_ptr, row_idx, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("apply_mask", &apply_mask_autograd);
  m.impl("apply_mask_", &apply_mask_inplace_autograd);
  m.impl("sparse_masked_linear", &sparse_masked_linear_autograd);
}

TORCH_LIBRARY_IMPL(pyprune, ADInplaceOrView, m) {
  m.impl("apply_mask_", &apply_mask_inplace_version);
}

}  // namespace pyprune
