// CPU kernels of masked_linear and its two gradient ops: the mask is applied
// to one block of the weight at a time, right before the GEMM that reads it,
// so no full-size weight * mask temporary is ever built.
//
// Why: for a large layer that temporary costs more than the GEMM on the CPU (a
// fresh 64 MB buffer for a 4096x4096 fp32 weight is mostly first-touch page
// faults: glibc serves allocations above 32 MB with a fresh mmap every call).
// A block of at most tile_bytes is recycled by the allocator and still in cache
// when the GEMM reads it.
//
// Each op is ONE parallel region: every thread masks its own blocks and runs a
// single-threaded GEMM on each (MKL runs sequentially inside an OpenMP region).
// Separate regions per block (mask, then a multi-threaded GEMM) measured up to
// 5x slower when other processes compete for the cores: every region's barrier
// then waits for a descheduled thread.
//
// Small layers (under 16 KB of weight, or any layer on one thread below the
// block size) and float16 / bfloat16 take the generic path (apply_mask + one
// GEMM).
#include <pyprune/cpu_masking.h>
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

namespace pyprune {
namespace {

// 4 MB: on the 2-core CPU, 1 MB blocks lose GEMM efficiency and above ~8 MB
// the page faults return (measured by timing masked_linear with
// pyprune_ext.ops.masked_tile_bytes set to 1, 4 and 8 MB).
std::atomic<int64_t> cpu_tile_bytes{4 << 20};

// Weights below this size take the one-block path whatever the thread count:
// a parallel region costs more than it saves on them.
constexpr int64_t kMinSplitBytes = 16 * 1024;

// Splits `extent` lines of `line_bytes` each into blocks of at most
// tile_bytes and at least one per thread, as a multiple of the thread count so
// every thread gets the same share. Even a layer that fits in one block is
// split between the threads: each thread masking its own rows and running a
// single-threaded GEMM on them measured 1.2-1.3x faster than masking the whole
// weight and then one multi-threaded GEMM (100x300 to 1024x1024 at batch 60, 2
// threads): the masked rows stay in the cache of the core that reads them.
// Weights under kMinSplitBytes are split only by the block size.
int64_t block_count(int64_t extent, int64_t line_bytes) {
  const int64_t total = extent * std::max<int64_t>(line_bytes, 1);
  const int64_t threads = std::max(at::get_num_threads(), 1);
  const int64_t tile = cpu_tile_bytes.load();
  int64_t wanted = (total + tile - 1) / tile;
  if (total > kMinSplitBytes) wanted = std::max(wanted, threads);
  if (extent <= 1 || wanted <= 1) return 1;
  return std::min(extent, (wanted + threads - 1) / threads * threads);
}

// [begin, end) of block b of n over extent lines.
std::pair<int64_t, int64_t> block_range(int64_t b, int64_t n, int64_t extent) {
  return {extent * b / n, extent * (b + 1) / n};
}

bool blockable(const at::Tensor& weight) {
  const auto dtype = weight.scalar_type();
  return dtype == at::kFloat || dtype == at::kDouble;
}

// Runs body(block) for blocks [0, n) in one parallel region, the worker
// threads dispatching below autograd like the calling kernel (thread-local
// dispatch state is not inherited by OpenMP workers).
template <typename Body>
void for_each_block(int64_t n, const Body& body) {
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b = b0; b < b1; ++b) body(b);
  });
}

// out[r - r0, :] = (w * m)[r, c0:c1] for r in [r0, r1): one block, contiguous.
template <typename scalar_t>
void mask_block(scalar_t* out, const scalar_t* w, const bool* m, int64_t ld, int64_t r0, int64_t r1,
                int64_t c0, int64_t c1) {
  for (int64_t r = r0; r < r1; ++r) {
    select_kept(out + (r - r0) * (c1 - c0), w + r * ld + c0, m + r * ld + c0, c1 - c0);
  }
}

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const std::optional<at::Tensor>& bias) {
  check_masked_linear_args("masked_linear", x, weight, mask, bias);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  const int64_t blocks = blockable(weight) ? block_count(out_f, in_f * weight.element_size()) : 1;
  if (blocks == 1) return masked_linear_one_block(x, weight, mask, bias);

  const at::Tensor x2d = as_rows(x, in_f).contiguous();
  const at::Tensor w = weight.contiguous(), m = mask.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y2d = at::empty({x2d.size(0), out_f}, x.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "masked_linear_cpu", [&] {
    for_each_block(blocks, [&](int64_t b) {
      const auto [r0, r1] = block_range(b, blocks, out_f);
      at::Tensor block = at::empty({r1 - r0, in_f}, w.options());
      mask_block(block.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(), in_f, r0,
                 r1, 0, in_f);
      at::Tensor y_cols = y2d.narrow(1, r0, r1 - r0);
      if (has_bias) {
        at::addmm_out(y_cols, bias->narrow(0, r0, r1 - r0), x2d, block.t());
      } else {
        at::mm_out(y_cols, x2d, block.t());
      }
    });
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_f;
  return y2d.view(shape);
}

// grad_x = grad_y @ (w * m), by blocks of grad_x's columns (= weight columns),
// so each thread writes its own part of the result.
at::Tensor masked_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& weight,
                                        const at::Tensor& mask) {
  check_masked_linear_grad_input_args(grad_y, weight, mask);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  const int64_t blocks = blockable(weight) ? block_count(in_f, out_f * weight.element_size()) : 1;
  if (blocks == 1) return masked_linear_grad_input_one_block(grad_y, weight, mask);

  const at::Tensor gy2d = as_rows(grad_y, out_f).contiguous();
  const at::Tensor w = weight.contiguous(), m = mask.contiguous();
  at::Tensor gx2d = at::empty({gy2d.size(0), in_f}, grad_y.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "masked_linear_grad_input_cpu", [&] {
    for_each_block(blocks, [&](int64_t b) {
      const auto [c0, c1] = block_range(b, blocks, in_f);
      at::Tensor block = at::empty({out_f, c1 - c0}, w.options());
      mask_block(block.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(), in_f, 0,
                 out_f, c0, c1);
      at::Tensor gx_cols = gx2d.narrow(1, c0, c1 - c0);
      at::mm_out(gx_cols, gy2d, block);
    });
  });
  std::vector<int64_t> shape(grad_y.sizes().begin(), grad_y.sizes().end());
  shape.back() = in_f;
  return gx2d.view(shape);
}

// grad_w = (grad_y^T x) * m, by blocks of rows, each masked while in cache.
at::Tensor masked_linear_grad_weight_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask) {
  check_masked_linear_grad_weight_args(grad_y, x, mask);
  const int64_t out_f = mask.size(0), in_f = mask.size(1);
  const bool floating = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (!floating) return masked_linear_grad_weight_one_block(grad_y, x, mask);
  const int64_t blocks = block_count(out_f, in_f * x.element_size());

  const at::Tensor gy2d = as_rows(grad_y, out_f).contiguous(), x2d = as_rows(x, in_f).contiguous();
  const at::Tensor m = mask.contiguous();
  if (blocks == 1) {  // one multi-threaded GEMM, then the in-place masking pass
    at::Tensor grad_w = at::mm(gy2d.t(), x2d);
    apply_mask_inplace_cpu(grad_w, m);
    return grad_w;
  }
  at::Tensor grad_w = at::empty({out_f, in_f}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_linear_grad_weight_cpu", [&] {
    for_each_block(blocks, [&](int64_t b) {
      const auto [r0, r1] = block_range(b, blocks, out_f);
      at::Tensor rows = grad_w.narrow(0, r0, r1 - r0);
      at::mm_out(rows, gy2d.narrow(1, r0, r1 - r0).t(), x2d);
      zero_pruned(rows.data_ptr<scalar_t>(), m.const_data_ptr<bool>() + r0 * in_f, (r1 - r0) * in_f);
    });
  });
  return grad_w;
}

}  // namespace

bool masked_linear_cpu_blocked(const at::Tensor& weight) {
  return weight.device().is_cpu() && weight.dim() == 2 && blockable(weight) &&
         block_count(weight.size(0), weight.size(1) * weight.element_size()) > 1;
}

int64_t masked_tile_bytes(int64_t bytes) {
  return bytes > 0 ? cpu_tile_bytes.exchange(bytes) : cpu_tile_bytes.load();
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_grad_input", &masked_linear_grad_input_cpu);
  m.impl("masked_linear_grad_weight", &masked_linear_grad_weight_cpu);
}

}  // namespace pyprune
