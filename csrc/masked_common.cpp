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
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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

void check_apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "apply_mask: mask must be a bool tensor, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), "apply_mask: mask must have weight's shape ",
              weight.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == weight.device(), "apply_mask: mask must be on weight's device (",
              weight.device(), "), got ", mask.device());
}

at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprune::apply_mask", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(weight, mask);
}

at::Tensor batch_last(const at::Tensor& x, int64_t features) {
  return x.reshape({-1, features}).t().contiguous();
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

void check_packed_shapes(const char* op, const at::Tensor& weight, const at::Tensor& ptr,
                         const at::Tensor& idx, int64_t ptr_len, const char* ptr_name,
                         const char* idx_name) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [out, in], got ", weight.sizes());
  for (const auto* t : {&ptr, &idx}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, op, ": ",
                t == &ptr ? ptr_name : idx_name,
                " must be a 1-d int64 tensor (from mask_pack), got ", t->scalar_type(), " of shape ",
                t->sizes());
    TORCH_CHECK(t->device() == weight.device(), op, ": ", t == &ptr ? ptr_name : idx_name,
                " must be on weight's device");
  }
  TORCH_CHECK(ptr.size(0) == ptr_len, op, ": ", ptr_name, " must have ", ptr_len,
              " entries for a weight of shape ", weight.sizes(), ", got ", ptr.size(0),
              " (was the mask packed for another layer?)");
}

void check_packed_ends(const char* op, const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx,
                       bool rows_first) {
  const char* ptr_name = rows_first ? "row_ptr" : "col_ptr";
  const char* idx_name = rows_first ? "col_idx" : "row_idx";
  const int64_t lines = weight.size(rows_first ? 0 : 1);
  check_packed_shapes(op, weight, ptr, idx, lines + 1, ptr_name, idx_name);
  TORCH_CHECK(ptr.is_cpu(), op, ": ", ptr_name, " must be on the CPU here");
  const at::Tensor p = ptr.contiguous();
  const int64_t* data = p.const_data_ptr<int64_t>();
  TORCH_CHECK(data[0] == 0 && data[lines] == idx.numel(), op, ": ", ptr_name, " must start at 0 and end at ",
              idx_name, ".numel() = ", idx.numel());
}

void check_packed_rows_ok(const char* op, bool ok, const at::Tensor& weight, bool rows_first) {
  const char* ptr_name = rows_first ? "row_ptr" : "col_ptr";
  const char* idx_name = rows_first ? "col_idx" : "row_idx";
  TORCH_CHECK(ok, op, ": the packed mask has entries outside their range: ", ptr_name,
              " must be non-decreasing and every ", idx_name, " entry in [0, ", weight.size(rows_first ? 1 : 0),
              ") (was it built by mask_pack for this layer?)");
}

namespace {

// Any device: ATen's where (the CPU has a faster kernel in csrc/cpu).
at::Tensor apply_mask_generic(const at::Tensor& weight, const at::Tensor& mask) {
  check_apply_mask(weight, mask);
  return at::where(mask, weight, 0);
}

// masked_fill_, not mul_: a pruned inf or NaN must become 0 like in apply_mask.
void apply_mask_inplace_generic(at::Tensor& weight, const at::Tensor& mask) {
  check_apply_mask(weight, mask);
  weight.masked_fill_(mask.logical_not(), 0);
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "masked_conv2d";
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-d [out, in/groups, kh, kw], got ",
              weight.sizes());
  check_masked_args(op, x, weight, mask, bias);
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, op, ": groups=", groups,
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
