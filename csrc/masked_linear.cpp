// masked_linear: y = x @ (weight * mask)^T + bias, forward and backward, with
// the mask applied one block of weight rows at a time.
//
// Why blocks: building weight * mask as one full-size temporary per call costs
// more than the GEMM itself on the CPU for large layers (a fresh 64 MB buffer
// for a 4096x4096 fp32 weight is mostly first-touch page faults: glibc serves
// allocations above 32 MB with a fresh mmap every time). A block of at most
// tile_bytes is recycled by the allocator, stays in cache, and feeds the GEMM
// right away. Layers whose weight fits in one block take the one-block path,
// which is exactly linear(x, apply_mask(weight, mask), bias).
//
// On CUDA the whole weight is one block (tile_bytes is ignored): the caching
// allocator has no page-fault cost and cuBLAS loses more on small GEMMs than
// the temporary costs.
//
// Autograd is a C++ function (one node per call instead of apply_mask + linear
// + their views: cheaper on small layers). Its backward calls the two gradient
// ops below, so torch.compile sees opaque ops with fake kernels.
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

namespace pyprune {
namespace {

// 4 MB: measured on the 2-core CPU (python -m benchmarks.masked): 1 MB blocks
// lose GEMM efficiency, above ~8 MB the page-fault cost returns.
std::atomic<int64_t> cpu_tile_bytes{4 << 20};

// Rows of weight per block for this call.
int64_t block_rows(const at::Tensor& weight) {
  const int64_t rows = weight.size(0);
  if (!weight.device().is_cpu() || rows == 0) return std::max<int64_t>(rows, 1);
  const int64_t row_bytes = std::max<int64_t>(weight.size(1) * weight.element_size(), 1);
  return std::clamp<int64_t>(cpu_tile_bytes.load() / row_bytes, 1, rows);
}

void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& mask, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [out, in], got ", weight.sizes());
  check_masked_args(op, x, weight, mask, bias);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x's last dim must be in_features = ",
              weight.size(1), ", got x of shape ", x.sizes());
}

// x [..., in] -> y [..., out].
at::Tensor masked_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& bias) {
  check_linear_args("masked_linear", x, weight, mask, bias);
  const int64_t out_f = weight.size(0), in_f = weight.size(1), rows = block_rows(weight);
  if (rows >= out_f) return at::linear(x, call_apply_mask(weight, mask), bias);

  const at::Tensor x2d = x.reshape({-1, in_f});
  at::Tensor y2d = at::empty({x2d.size(0), out_f}, x.options());
  for (int64_t r0 = 0; r0 < out_f; r0 += rows) {
    const int64_t n = std::min(rows, out_f - r0);
    const at::Tensor block = call_apply_mask(weight.narrow(0, r0, n), mask.narrow(0, r0, n));
    at::Tensor y_cols = y2d.narrow(1, r0, n);
    if (bias.has_value() && bias->defined()) {
      at::addmm_out(y_cols, bias->narrow(0, r0, n), x2d, block.t());
    } else {
      at::mm_out(y_cols, x2d, block.t());
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_f;
  return y2d.view(shape);
}

// grad_x = grad_y @ (weight * mask), summed block by block.
at::Tensor masked_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight,
                                    const at::Tensor& mask) {
  const char* op = "masked_linear_grad_input";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [out, in], got ", weight.sizes());
  check_apply_mask(weight, mask);
  const int64_t out_f = weight.size(0), in_f = weight.size(1), rows = block_rows(weight);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == out_f, op, ": grad_y's last dim must be out_features = ",
              out_f, ", got ", grad_y.sizes());
  std::vector<int64_t> shape(grad_y.sizes().begin(), grad_y.sizes().end());
  shape.back() = in_f;
  if (rows >= out_f) return at::matmul(grad_y, call_apply_mask(weight, mask));

  const at::Tensor gy2d = grad_y.reshape({-1, out_f});
  at::Tensor gx2d = at::zeros({gy2d.size(0), in_f}, grad_y.options());
  for (int64_t r0 = 0; r0 < out_f; r0 += rows) {
    const int64_t n = std::min(rows, out_f - r0);
    const at::Tensor block = call_apply_mask(weight.narrow(0, r0, n), mask.narrow(0, r0, n));
    gx2d.addmm_(gy2d.narrow(1, r0, n), block);
  }
  return gx2d.view(shape);
}

// grad_weight = (grad_y^T @ x) * mask: exact zeros at pruned positions. Each
// block is masked while it is still in cache.
at::Tensor masked_linear_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask) {
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
  const at::Tensor gy2d = grad_y.reshape({-1, out_f}), x2d = x.reshape({-1, in_f});
  at::Tensor grad_w = at::empty({out_f, in_f}, x.options());
  const int64_t rows = block_rows(grad_w);
  for (int64_t r0 = 0; r0 < out_f; r0 += rows) {
    const int64_t n = std::min(rows, out_f - r0);
    at::Tensor block = grad_w.narrow(0, r0, n);
    at::mm_out(block, gy2d.narrow(1, r0, n).t(), x2d);
    block.mul_(mask.narrow(0, r0, n));
  }
  return grad_w;
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

class MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& mask,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, weight, mask});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(x, weight, mask, bias);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mask = saved[2];
    const at::Tensor& grad_y = grads[0];
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) grad_x = call_grad_input(grad_y, weight, mask);
    if (ctx->needs_input_grad(1)) grad_w = call_grad_weight(grad_y, x, mask);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_b = grad_y.reshape({-1, grad_y.size(-1)}).sum(0);
    }
    return {grad_x, grad_w, at::Tensor(), grad_b};
  }
};

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& bias) {
  return MaskedLinearFunction::apply(x, weight, mask, bias);
}

}  // namespace

int64_t masked_tile_bytes(int64_t bytes) {
  return bytes > 0 ? cpu_tile_bytes.exchange(bytes) : cpu_tile_bytes.load();
}

TORCH_LIBRARY_IMPL(pyprune, CompositeExplicitAutograd, m) {
  m.impl("masked_linear", &masked_linear_forward);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input);
  m.impl("masked_linear_grad_weight", &masked_linear_grad_weight);
}

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("masked_linear", &masked_linear_autograd);
}

}  // namespace pyprune
