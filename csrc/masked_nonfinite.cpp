// One semantics for non-finite inputs on every path of the masked ops: IEEE
// arithmetic on where(mask, weight, 0), exactly what PyTorch's own linear or
// conv2d computes on the masked weight (the dense-masked path). A pruned
// weight is a zero, so an inf or NaN input that meets it gives 0 * inf = NaN,
// while a pruned inf or NaN weight is a plain zero.
//
// The sparse kernels never touch pruned weights, so on their own they would
// return finite numbers where the dense path returns NaN. After a sparse
// kernel, the input is scanned once (cheap next to the product); only when it
// holds a non-finite value are the outputs it reaches through a pruned weight
// found, by the same linear map on indicator tensors (non-finite inputs x
// pruned weights, summed: > 0 means "met"), and set to NaN. Kept weights went
// through the kernel's IEEE arithmetic already, so the results agree with the
// dense path everywhere.
#include <pyprune/masked.h>
#include <pyprune/masked_nonfinite.h>

#include <ATen/ATen.h>

#include <limits>

namespace pyprune {
namespace {

bool all_finite(const at::Tensor& t) { return t.numel() == 0 || at::isfinite(t).all().item<bool>(); }

at::Tensor indicator(const at::Tensor& t) { return at::isfinite(t).logical_not().to(at::kFloat); }

void set_nan_where(at::Tensor& out, const at::Tensor& met) {
  out.masked_fill_(met > 0, std::numeric_limits<double>::quiet_NaN());
}

}  // namespace

void nonfinite_like_dense_linear(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  if (all_finite(x)) return;
  const at::Tensor pruned = mask_from_pack(row_ptr, col_idx, weight).logical_not().to(at::kFloat);
  set_nan_where(y, at::linear(indicator(x), pruned).view(y.sizes()));
}

void nonfinite_like_dense_linear_grad_input(at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& weight,
                                            const at::Tensor& col_ptr, const at::Tensor& row_idx) {
  if (all_finite(grad_y)) return;
  const at::Tensor pruned = mask_from_pack(col_ptr, row_idx, weight.t()).t().logical_not().to(at::kFloat);
  set_nan_where(grad_x, at::matmul(indicator(grad_y), pruned).view(grad_x.sizes()));
}

void nonfinite_like_dense_conv2d(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (all_finite(x)) return;
  const at::Tensor pruned = mask_from_pack(row_ptr, col_idx, weight).logical_not().to(at::kFloat);
  set_nan_where(y, at::conv2d(indicator(x), pruned, {}, stride, padding, dilation, groups));
}

void nonfinite_like_dense_conv2d_grad_input(at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x,
                                            const at::Tensor& weight, const at::Tensor& row_ptr,
                                            const at::Tensor& col_idx, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride) {
  if (all_finite(grad_y)) return;
  const at::Tensor pruned = mask_from_pack(row_ptr, col_idx, weight).logical_not().to(at::kFloat);
  const at::Tensor met = std::get<0>(at::convolution_backward(
      indicator(grad_y), at::empty_like(x, x.options().dtype(at::kFloat)), pruned, std::nullopt, stride, padding,
      dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {true, false, false}));
  set_nan_where(grad_x, met);
}

void nonfinite_like_dense_conv2d_grad_weight(at::Tensor& grad_w, const at::Tensor& grad_y, const at::Tensor& x,
                                             const at::Tensor& weight, const at::Tensor& row_ptr,
                                             const at::Tensor& col_idx, at::IntArrayRef padding,
                                             at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride) {
  if (all_finite(grad_y)) return;
  // The dense weight gradient also multiplies grad_y by the zero padding of x,
  // which the sparse kernel never reads: an inf in grad_y whose window reaches
  // the border makes those taps NaN there.
  const int64_t H = x.size(2), W = x.size(3);
  at::Tensor border = at::ones({x.size(0), x.size(1), H + 2 * padding[0], W + 2 * padding[1]},
                               x.options().dtype(at::kFloat));
  border.narrow(2, padding[0], H).narrow(3, padding[1], W).zero_();
  const at::Tensor met = std::get<1>(at::convolution_backward(
      indicator(grad_y), border, at::empty_like(weight, weight.options().dtype(at::kFloat)), std::nullopt, stride,
      {0, 0}, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {false, true, false}));
  const at::Tensor kept = mask_from_pack(row_ptr, col_idx, weight);
  grad_w.masked_fill_((met > 0).logical_and_(kept), std::numeric_limits<double>::quiet_NaN());
}

}  // namespace pyprune
