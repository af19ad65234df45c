// sparse_masked_conv2d: conv2d(x, weight * mask, bias, ...) with the mask given
// in packed form (mask_pack(mask.view(out, -1)): CSR over out channels), for
// every stride, padding, dilation and groups.
//
// Here: argument checks, the entries by input channel that grad_input reads on
// CUDA, and the autograd function. The kernels: a direct sparse convolution
// forward, and for stride 1 (padding <= dilation * (kernel - 1)) a sparse
// backward (grad_x as a sparse transposed convolution, grad_w at the kept
// positions only), on the CPU (csrc/cpu/sparse_masked_conv2d.cpp) and CUDA
// (csrc/cuda/sparse_masked_conv2d.cu). Other geometries take the dense-masked
// backward: torch's convolution backward on the masked filter bank, its weight
// gradient masked.
#include <pyprune/masked.h>
#include <pyprune/packed_mask.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace pyprune {

void check_sparse_conv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& row_ptr, const at::Tensor& col_idx,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(weight.dim() == 4 && weight.is_floating_point(), op,
              ": weight must be a 4-d floating-point tensor [out, in/groups, kh, kw], got ", weight.scalar_type(),
              " of shape ", weight.sizes());
  check_conv_int_args(op, stride, padding, dilation, groups);
  TORCH_CHECK(weight.size(0) >= 1, op, ": weight has 0 output channels; a convolution needs at least 1 "
              "(torch's conv2d refuses an empty filter bank too)");
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": groups=", groups,
              " must divide out_channels=", weight.size(0));
  TORCH_CHECK(x.dim() == 4 && x.size(1) == weight.size(1) * groups, op, ": x must be [N, C, H, W] with C = ",
              weight.size(1) * groups, " channels, got ", x.sizes());
  TORCH_CHECK(x.device() == weight.device() && x.scalar_type() == weight.scalar_type(), op,
              ": x must match weight's dtype and device, got ", x.scalar_type(), " on ", x.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == weight.device() && bias->scalar_type() == weight.scalar_type(), op,
                ": bias must match weight's dtype and device");
  }
  for (int i = 0; i < 2; ++i) {
    const int64_t extent = x.size(2 + i) + 2 * padding[i] - dilation[i] * (weight.size(2 + i) - 1);
    TORCH_CHECK(extent >= 1, op, ": the padded input ", x.sizes(), " is smaller than the dilated kernel ",
                weight.sizes());
  }
  const at::Tensor w2d = filters_2d(weight);
  check_packed_shapes(op, w2d, row_ptr, col_idx, weight.size(0) + 1, "row_ptr", "col_idx");
}

ConvEntries transposed_conv_entries(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                    int64_t groups) {
  const int64_t O = weight.size(0), per_group = weight.size(1), taps = weight.size(2) * weight.size(3);
  const int64_t C = per_group * groups, out_per_group = O / groups, nnz = col_idx.numel();
  // output_size given: no host sync to size the result
  const at::Tensor line = at::repeat_interleave(at::diff(row_ptr), std::optional<int64_t>(nnz));  // each entry's output channel
  const at::Tensor source = at::div(col_idx, taps, "floor"), mirrored = (taps - 1) - col_idx.remainder(taps);
  const at::Tensor group = at::div(line, out_per_group, "floor");
  const at::Tensor channel = group * per_group + source, line_in_group = line - group * out_per_group;
  // by input channel, then output channel, then mirrored tap: keys sorted within each line
  const at::Tensor order = at::argsort((channel * O + line) * taps + mirrored);
  ConvEntries e;
  e.ptr = at::searchsorted(channel.index_select(0, order), at::arange(C + 1, col_idx.options()));
  e.key = (line_in_group * taps + mirrored).index_select(0, order);
  e.values = weight.reshape({-1}).index_select(0, (line * (per_group * taps) + col_idx).index_select(0, order));
  return e;
}

namespace {

using SparseConvGrad = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::IntArrayRef, at::IntArrayRef, int64_t);

// Whether the sparse backward kernels serve this call (CPU float32/float64 or
// CUDA, stride 1, padding within the dilated kernel's reach).
bool sparse_backward_applies(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const bool cpu_dtype = weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble;
  if (!(weight.device().is_cuda() || (weight.device().is_cpu() && cpu_dtype))) return false;
  for (int i = 0; i < 2; ++i) {
    if (stride[i] != 1 || padding[i] > dilation[i] * (weight.size(2 + i) - 1)) return false;
  }
  return true;
}

using SparseConvForward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                     at::IntArrayRef, int64_t);

class SparseMaskedConv2d : public torch::autograd::Function<SparseMaskedConv2d> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->save_for_backward({x, weight, row_ptr, col_idx});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = find_op<SparseConvForward>("pyprune::sparse_masked_conv2d");
    return op.call(x, weight, row_ptr, col_idx, bias, stride, padding, dilation, groups);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &row_ptr = saved[2], &col_idx = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector(),
                               padding = ctx->saved_data["padding"].toIntVector(),
                               dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor grad_x, grad_w, grad_b;
    if (sparse_backward_applies(weight, stride, padding, dilation)) {
      static const auto grad_input_op = find_op<SparseConvGrad>("pyprune::sparse_masked_conv2d_grad_input");
      static const auto grad_weight_op = find_op<SparseConvGrad>("pyprune::sparse_masked_conv2d_grad_weight");
      if (ctx->needs_input_grad(0)) {
        grad_x = grad_input_op.call(grads[0], x, weight, row_ptr, col_idx, padding, dilation, groups);
      }
      if (ctx->needs_input_grad(1)) {
        grad_w = grad_weight_op.call(grads[0], x, weight, row_ptr, col_idx, padding, dilation, groups);
      }
      if (has_bias && ctx->needs_input_grad(4)) grad_b = grads[0].sum({0, 2, 3});
    } else {
      const at::Tensor mask = mask_from_pack(row_ptr, col_idx, weight);
      const std::vector<int64_t> bias_sizes{weight.size(0)};
      std::tie(grad_x, grad_w, grad_b) = at::convolution_backward(
          grads[0], x, call_apply_mask(weight, mask),
          has_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(), stride, padding, dilation,
          /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
          {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(4)});
      if (grad_w.defined()) grad_w = call_apply_mask(grad_w, mask);  // pruned weights: exactly 0
    }
    return {grad_x, grad_w, at::Tensor(), at::Tensor(), grad_b, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor sparse_masked_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                                         const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups) {
  return SparseMaskedConv2d::apply(x, weight, row_ptr, col_idx, bias, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("sparse_masked_conv2d", &sparse_masked_conv2d_autograd);
}

}  // namespace pyprune
