// Non-finite inputs on the sparse paths (csrc/masked_nonfinite.cpp): after a
// sparse kernel, the outputs that the dense-masked path makes NaN (an inf or
// NaN input meeting a pruned weight: 0 * inf) are set to NaN, so that every
// path of every masked op returns the same values. A no-op (one scan of the
// input) when the input is finite.
#pragma once

#include <ATen/core/Tensor.h>

namespace pyprune {

// y [..., out] = x [..., in] through weight [out, in], mask from its CSR half.
void nonfinite_like_dense_linear(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx);

// grad_x [..., in] = grad_y [..., out] through the masked weight, mask from its CSC half.
void nonfinite_like_dense_linear_grad_input(at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& weight,
                                            const at::Tensor& col_ptr, const at::Tensor& row_idx);

// y = conv2d(x, weight * mask, ...), mask from the CSR half of mask_pack(mask.view(out, -1)).
void nonfinite_like_dense_conv2d(at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// grad_x of that convolution.
void nonfinite_like_dense_conv2d_grad_input(at::Tensor& grad_x, const at::Tensor& grad_y, const at::Tensor& x,
                                            const at::Tensor& weight, const at::Tensor& row_ptr,
                                            const at::Tensor& col_idx, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride);

// grad_w at the kept positions of that convolution.
void nonfinite_like_dense_conv2d_grad_weight(at::Tensor& grad_w, const at::Tensor& grad_y, const at::Tensor& x,
                                             const at::Tensor& weight, const at::Tensor& row_ptr,
                                             const at::Tensor& col_idx, at::IntArrayRef padding,
                                             at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride);

}  // namespace pyprune
