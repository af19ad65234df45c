// Masked layers: argument checks, masked_conv2d, and the packing of a mask
// into index structures for the sparse path (masked_linear has its own file).
//
// masked_conv2d is registered as CompositeImplicitAutograd: conv2d on
// apply_mask(weight, mask), whose gradient is the masked incoming gradient
// (csrc/masked_autograd.cpp), so grad_weight has exact zeros at pruned
// positions. It serves every device and dtype torch's convolution serves. The
// masked filter bank is built whole: conv weights are small next to their
// activations, and splitting a convolution by output channels would cost an
// extra copy of the (much larger) output.
#include <pyprune/inplace.h>
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace pyprune {

void check_masked_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.is_floating_point(), op, ": weight must be a floating-point tensor, got ",
              weight.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), op, ": mask must have weight's shape ",
              weight.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == weight.device(), op, ": mask must be on weight's device (",
              weight.device(), "), got ", mask.device());
  TORCH_CHECK(x.device() == weight.device(), op, ": x must be on weight's device (",
              weight.device(), "), got ", x.device());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight must have the same dtype, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == weight.device() && bias->scalar_type() == weight.scalar_type(),
                op, ": bias must match weight's dtype and device");
  }
}

void check_conv_int_args(const char* op, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const auto check = [&](at::IntArrayRef v, const char* name, int64_t low) {
    TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries, got ", v);
    for (int64_t e : v) {
      TORCH_CHECK(e >= low && e <= kMax, op, ": ", name, " must be in [", low, ", ", kMax, "], got ", v);
    }
  };
  check(stride, "stride", 1);
  check(padding, "padding", 0);
  check(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1 && groups <= kMax, op, ": groups must be in [1, ", kMax, "], got ", groups);
}

void check_apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "apply_mask: mask must be a bool tensor, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), "apply_mask: mask must have weight's shape ",
              weight.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == weight.device(), "apply_mask: mask must be on weight's device (",
              weight.device(), "), got ", mask.device());
}

void check_apply_mask_inplace(const at::Tensor& weight, const at::Tensor& mask) {
  check_apply_mask(weight, mask);
  check_writable("apply_mask_", weight, "weight");
  check_not_aliased("apply_mask_", weight, "weight", mask, "mask");
}

at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprune::apply_mask", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(weight, mask);
}

at::Tensor as_rows(const at::Tensor& t, int64_t features) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, features});
}

at::Tensor filters_2d(const at::Tensor& weight) {
  int64_t per_filter = 1;
  for (int64_t d = 1; d < weight.dim(); ++d) per_filter *= weight.size(d);
  return weight.reshape({weight.size(0), per_filter});
}

at::Tensor batch_last(const at::Tensor& x, int64_t features) {
  return as_rows(x, features).t().contiguous();
}

at::Tensor from_batch_last(const at::Tensor& rows, const at::Tensor& like, int64_t last) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape.back() = last;
  return rows.t().contiguous().view(shape);
}

void check_sparse_forward_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_f, op, ": x's last dim must be in_features = ", in_f,
              ", got x of shape ", x.sizes());
  TORCH_CHECK(x.device() == weight.device() && x.scalar_type() == weight.scalar_type(), op,
              ": x must match weight's dtype and device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_f && bias->scalar_type() == weight.scalar_type() &&
                    bias->device() == weight.device(),
                op, ": bias must be [", out_f, "] of weight's dtype and device, got ", bias->sizes());
  }
}

namespace {

// Any device: ATen's where (the CPU has a faster kernel in csrc/cpu).
at::Tensor apply_mask_generic(const at::Tensor& weight, const at::Tensor& mask) {
  check_apply_mask(weight, mask);
  return at::where(mask, weight, 0);
}

// masked_fill_, not mul_: a pruned inf or NaN must become 0 like in apply_mask.
void apply_mask_inplace_generic(at::Tensor& weight, const at::Tensor& mask) {
  check_apply_mask_inplace(weight, mask);
  weight.masked_fill_(mask.logical_not(), 0);
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "masked_conv2d";
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-d [out, in/groups, kh, kw], got ",
              weight.sizes());
  check_masked_args(op, x, weight, mask, bias);
  check_conv_int_args(op, stride, padding, dilation, groups);
  TORCH_CHECK(weight.size(0) >= 1, op, ": weight has 0 output channels; a convolution needs at least 1 "
              "(torch's conv2d refuses an empty filter bank too)");
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": groups=", groups,
              " must divide out_channels=", weight.size(0));
  TORCH_CHECK((x.dim() == 3 || x.dim() == 4) && x.size(-3) == weight.size(1) * groups, op,
              ": x must be [N, C, H, W] or [C, H, W] with C = ", weight.size(1) * groups,
              " channels, got ", x.sizes());
  return at::conv2d(x, call_apply_mask(weight, mask), bias, stride, padding, dilation, groups);
}

// CSR and CSC index structure of a 2-d bool mask, with ATen ops only, so the
// same code serves every device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mask_pack(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2,
              "mask_pack: mask must be a 2-d bool tensor [out, in], got ", mask.scalar_type(),
              " of shape ", mask.sizes());
  auto compress = [](const at::Tensor& m) {
    // nonzero() lists (row, col) pairs in row-major order: exactly CSR order.
    const at::Tensor nz = m.nonzero();
    const at::Tensor counts = m.sum(1, /*keepdim=*/false, at::kLong);
    const at::Tensor ptr = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
    // clone, not contiguous(): a fresh tensor even when the select is already contiguous.
    return std::make_tuple(ptr, nz.select(1, 1).clone(at::MemoryFormat::Contiguous));
  };
  auto [row_ptr, col_idx] = compress(mask);
  auto [col_ptr, row_idx] = compress(mask.t());
  return {row_ptr, col_idx, col_ptr, row_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CompositeImplicitAutograd, m) {
  m.impl("masked_conv2d", &masked_conv2d);
}

TORCH_LIBRARY_IMPL(pyprune, CompositeExplicitAutograd, m) {
  m.impl("mask_pack", &mask_pack);
  m.impl("apply_mask", &apply_mask_generic);
  m.impl("apply_mask_", &apply_mask_inplace_generic);
}

}  // namespace pyprune
