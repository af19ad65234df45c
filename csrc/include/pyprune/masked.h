// Masked / sparse linear and convolution: shared declarations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include <pyprune/packed_mask.h>

namespace pyprune {

// Validates x/weight/mask/bias of a masked layer (shapes, dtypes, devices).
// in_features is the size x's last dim (linear) or channel dim (conv) must have.
void check_masked_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& mask, const std::optional<at::Tensor>& bias);

// The integer arguments of a 2-d convolution: 2 entries each, stride and
// dilation >= 1, padding >= 0, groups >= 1, none above INT32_MAX (so no index
// computation of the kernels can overflow).
void check_conv_int_args(const char* op, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups);

// t [..., features] as [M, features], M the product of the leading dims (a
// view where possible). Unlike reshape({-1, features}), also for features == 0
// or M == 0.
at::Tensor as_rows(const at::Tensor& t, int64_t features);

// A conv weight [out, in/groups, kh, kw] as [out, in/groups * kh * kw] (the
// layout mask_pack packs), also when some dim is 0.
at::Tensor filters_2d(const at::Tensor& weight);

// pyprune::apply_mask through the dispatcher (so autograd sees it).
at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& mask);

// mask: bool, weight's shape and device.
void check_apply_mask(const at::Tensor& weight, const at::Tensor& mask);
// apply_mask_'s: the same, and weight writable (pyprune/inplace.h).
void check_apply_mask_inplace(const at::Tensor& weight, const at::Tensor& mask);

// A pyprune op's typed handle, for autograd functions that call ops through
// the dispatcher (so torch.compile sees opaque ops with fake kernels).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The CUDA sparse kernels' batch-last layout: x [..., features] -> x^T [features, M],
// contiguous (M = all leading dims), and back: rows [last, M] -> [..., last]
// with like's leading dims.
at::Tensor batch_last(const at::Tensor& x, int64_t features);
at::Tensor from_batch_last(const at::Tensor& rows, const at::Tensor& like, int64_t last);

// sparse_masked_linear's x and bias against a weight [out, in] (both backends).
void check_sparse_forward_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias);

// sparse_masked_conv2d's arguments (csrc/sparse_masked_conv2d.cpp): shapes,
// dtypes, devices, the convolution's geometry and the packed mask's shapes.
void check_sparse_conv2d_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& row_ptr, const at::Tensor& col_idx,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// grad_input of a convolution with stride (sh, sw) as up to sh * sw stride-1
// direct convolutions of grad_y (see pyprune/sparse_conv_tiles.h), one per
// phase (a, b) of grad_x (rows a::sh, columns b::sw): the kernel taps that reach
// a phase form a smaller kernel over grad_y, mirrored, with its own dilation and
// padding (negative where the phase starts inside grad_y). Line c (input
// channel) of a phase holds the kept weights (o, c, ty, tx) of the output
// channels o of its group whose taps reach the phase, key = o_in_group *
// kh*kw + ky * kw + kx in the phase's kernel; keys sorted within a line. Torch
// ops on the weight's device, no host sync (csrc/sparse_masked_conv2d.cpp).
struct ConvInputPhase {
  int64_t a, b;              // grad_x rows a::sh and columns b::sw
  int64_t rows, cols;        // the phase's size
  int64_t kh, kw, dh, dw;    // its kernel over grad_y (stride 1)
  int64_t ph, pw;            // and padding (may be negative)
  at::Tensor begin, end;     // [C]: line c's entries are [begin[c], end[c]) of key / values
};
struct ConvInputPhases {
  std::vector<ConvInputPhase> phases;  // the phases some tap reaches (the others' grad_x is 0)
  at::Tensor key, values;              // [nnz]
};
ConvInputPhases grad_input_phases(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, int64_t H, int64_t W);

// masked_linear (csrc/masked_linear.cpp): argument checks of the op and of its
// two gradient ops, and the generic kernels that mask the whole weight at once.
void check_masked_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& mask, const std::optional<at::Tensor>& bias);
void check_masked_linear_grad_input_args(const at::Tensor& grad_y, const at::Tensor& weight,
                                         const at::Tensor& mask);
void check_masked_linear_grad_weight_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask);
at::Tensor masked_linear_one_block(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                   const std::optional<at::Tensor>& bias);
at::Tensor masked_linear_grad_input_one_block(const at::Tensor& grad_y, const at::Tensor& weight,
                                              const at::Tensor& mask);
at::Tensor masked_linear_grad_weight_one_block(const at::Tensor& grad_y, const at::Tensor& x,
                                               const at::Tensor& mask);

// apply_mask_'s CPU kernel: weight zeroed in place where mask is False.
void apply_mask_inplace_cpu(at::Tensor& weight, const at::Tensor& mask);

// Whether masked_linear's CPU kernels split this weight into blocks.
bool masked_linear_cpu_blocked(const at::Tensor& weight);

// Block size in bytes of masked_linear's CPU kernels (csrc/cpu/masked_linear.cpp):
// sets it when bytes > 0 and returns the previous value.
int64_t masked_tile_bytes(int64_t bytes);

}  // namespace pyprune
