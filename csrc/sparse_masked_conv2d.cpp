// sparse_masked_conv2d: conv2d(x, weight * mask, bias, ...) with the mask given
// in packed form (mask_pack(mask.view(out, -1)): CSR over out channels), for
// every stride, padding, dilation and groups.
//
// Here: argument checks, the phases and entries that grad_input reads on CUDA,
// and the autograd function. The kernels: a direct sparse convolution forward
// and a sparse backward (grad_x as a sparse transposed convolution, grad_w at
// the kept positions only), on the CPU (csrc/cpu/sparse_masked_conv2d.cpp;
// backward for stride 1 with padding <= dilation * (kernel - 1)) and CUDA
// (csrc/cuda/sparse_masked_conv2d.cu; every geometry). Other CPU geometries
// take the dense-masked backward: torch's convolution backward on the masked
// filter bank, its weight gradient masked.
#include <pyprune/masked.h>
#include <pyprune/packed_mask.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <numeric>
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

namespace {

// One axis of grad_input's phases: for a kernel of k taps, dilation d, stride s
// and padding p over an input axis of `size`, grad_x index a + s*m reads grad_y
// index m + (a + p - t*d) / s through tap t iff a = (t*d - p) mod s. A phase's
// taps, descending (the mirrored order), are t_max, t_max - s/g, ... (g =
// gcd(s, d)), their grad_y offsets first_offset, + d/g, ...
struct AxisPhase {
  int64_t taps = 0, dilation = 1, padding = 0, length = 0;
};

std::vector<AxisPhase> axis_phases(int64_t k, int64_t s, int64_t p, int64_t d, int64_t size) {
  std::vector<AxisPhase> phases(s);
  std::vector<int64_t> first_offset(s, 0);
  for (int64_t t = k - 1; t >= 0; --t) {
    const int64_t a = ((t * d - p) % s + s) % s;
    const int64_t offset = (a + p - t * d) / s;  // exact
    AxisPhase& ph = phases[a];
    if (ph.taps == 0) {
      first_offset[a] = offset;
      ph.padding = -offset;
    } else if (ph.taps == 1) {
      ph.dilation = offset - first_offset[a];
    }
    ++ph.taps;
  }
  for (int64_t a = 0; a < s; ++a) phases[a].length = a < size ? (size - a + s - 1) / s : 0;
  return phases;
}

// Per entry (as tensors): its phase along one axis and its index among that
// phase's taps (descending), and the phase's tap count, from the tap t alone.
struct AxisOfEntries {
  at::Tensor phase, index, count;
};

AxisOfEntries axis_of_entries(const at::Tensor& t, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t step = s / std::gcd(s, d);  // taps apart within a phase
  AxisOfEntries e;
  e.phase = (t * d - p).remainder(s);
  e.index = at::div((k - 1) - t, step, "floor");
  e.count = e.index + at::div(t, step, "floor") + 1;
  return e;
}

}  // namespace

ConvInputPhases grad_input_phases(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, int64_t H, int64_t W) {
  const int64_t O = weight.size(0), per_group = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t taps = kh * kw, C = per_group * groups, out_per_group = O / groups, nnz = col_idx.numel();
  const int64_t sh = stride[0], sw = stride[1], P = sh * sw;
  // output_size given: no host sync to size the result
  const at::Tensor line = at::repeat_interleave(at::diff(row_ptr), std::optional<int64_t>(nnz));  // output channel
  const at::Tensor tap = col_idx.remainder(taps), source = at::div(col_idx, taps, "floor");
  const at::Tensor group = at::div(line, out_per_group, "floor");
  const at::Tensor channel = group * per_group + source, line_in_group = line - group * out_per_group;
  const AxisOfEntries y = axis_of_entries(at::div(tap, kw, "floor"), kh, sh, padding[0], dilation[0]);
  const AxisOfEntries x = axis_of_entries(tap.remainder(kw), kw, sw, padding[1], dilation[1]);
  const at::Tensor phase_line = channel * P + y.phase * sw + x.phase;
  // by (input channel, phase), then output channel, then the phase's tap: keys sorted within each line
  const at::Tensor order = at::argsort((phase_line * O + line) * taps + y.index * kw + x.index);
  const at::Tensor ptr = at::searchsorted(phase_line.index_select(0, order), at::arange(C * P + 1, col_idx.options()));
  ConvInputPhases out;
  out.key = (line_in_group * (y.count * x.count) + y.index * x.count + x.index).index_select(0, order);
  out.values = weight.reshape({-1}).index_select(0, (line * (per_group * taps) + col_idx).index_select(0, order));
  const std::vector<AxisPhase> rows = axis_phases(kh, sh, padding[0], dilation[0], H);
  const std::vector<AxisPhase> cols = axis_phases(kw, sw, padding[1], dilation[1], W);
  for (int64_t a = 0; a < sh; ++a) {
    for (int64_t b = 0; b < sw; ++b) {
      const AxisPhase &r = rows[a], &c = cols[b];
      if (r.taps == 0 || c.taps == 0 || r.length == 0 || c.length == 0) continue;
      const int64_t phase = a * sw + b;
      out.phases.push_back({a, b, r.length, c.length, r.taps, c.taps, r.dilation, c.dilation, r.padding, c.padding,
                            ptr.slice(0, phase, C * P, P).contiguous(),
                            ptr.slice(0, phase + 1, C * P + 1, P).contiguous()});
    }
  }
  return out;
}

namespace {

using SparseConvGrad = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::IntArrayRef, at::IntArrayRef, int64_t, at::IntArrayRef);

// Whether the sparse backward kernels serve this call: CUDA at every geometry;
// CPU float32/float64 at stride 1 with padding within the dilated kernel's reach.
bool sparse_backward_applies(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  if (weight.device().is_cuda()) return true;
  if (!weight.device().is_cpu() || (weight.scalar_type() != at::kFloat && weight.scalar_type() != at::kDouble)) {
    return false;
  }
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
        grad_x = grad_input_op.call(grads[0], x, weight, row_ptr, col_idx, padding, dilation, groups, stride);
      }
      if (ctx->needs_input_grad(1)) {
        grad_w = grad_weight_op.call(grads[0], x, weight, row_ptr, col_idx, padding, dilation, groups, stride);
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
