// CUDA kernels of the sparse path of masked_linear, the same batch-last scheme
// as the CPU kernels: x^T [in, M], y^T [out, M]. Each thread owns one (row, m)
// output and walks that row's kept weights in index order (deterministic, fp32
// accumulation); the kept weight and its index are the same for the whole
// block (broadcast loads), the activations are read coalesced along m.
//
// Index bounds and order are checked on the device (CUDA_KERNEL_ASSERT), as
// PyTorch's own CUDA indexing ops do, instead of reading the indices back to
// the host; so is the agreement of the two halves (checksums, _assert_async).
#include <pyprune/cuda_launch.h>
#include <pyprune/masked.h>
#include <pyprune/masked_nonfinite.h>
#include <pyprune/packed_mask.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cub/warp/warp_reduce.cuh>

#include <type_traits>

namespace pyprune {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// out[r, m] = init[r] (or 0) + sum over p in [ptr[r], ptr[r+1]) of
//             w[r * w_row + idx[p] * w_idx] * src[idx[p], m]
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
gather_axpy_rows(scalar_t* __restrict__ out, int64_t M, const int64_t* __restrict__ ptr,
                 const int64_t* __restrict__ idx, int64_t idx_limit, int64_t nnz,
                 const scalar_t* __restrict__ src, const scalar_t* __restrict__ init,
                 const scalar_t* __restrict__ w, int64_t w_row, int64_t w_idx) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t m = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (m >= M) return;
  const int64_t begin = ptr[r], end = ptr[r + 1];
  CUDA_KERNEL_ASSERT(begin >= 0 && begin <= end && end <= nnz);
  const scalar_t* wr = w + r * w_row;
  acc_t acc = init ? static_cast<acc_t>(init[r]) : acc_t(0);
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = idx[p];
    CUDA_KERNEL_ASSERT(c >= 0 && c < idx_limit && (p == begin || idx[p - 1] < c));
    acc += static_cast<acc_t>(wr[c * w_idx]) * static_cast<acc_t>(src[c * M + m]);
  }
  out[r * M + m] = static_cast<scalar_t>(acc);
}

// grad_w[r, idx[p]] = dot(a[r, :], b[idx[p], :]) for the kept entries; one warp
// per kept entry, a block per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sampled_dots(scalar_t* __restrict__ out, int64_t M, int64_t K, const int64_t* __restrict__ ptr,
             const int64_t* __restrict__ idx, int64_t nnz, const scalar_t* __restrict__ a,
             const scalar_t* __restrict__ b) {
  using acc_t = acc_type_t<scalar_t>;
  using WarpReduce = cub::WarpReduce<acc_t>;
  __shared__ typename WarpReduce::TempStorage storage[kWarps];
  const int64_t r = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t begin = ptr[r], end = ptr[r + 1];
  CUDA_KERNEL_ASSERT(begin >= 0 && begin <= end && end <= nnz);
  for (int64_t p = begin + warp; p < end; p += kWarps) {
    const int64_t c = idx[p];
    CUDA_KERNEL_ASSERT(c >= 0 && c < K && (p == begin || idx[p - 1] < c));
    acc_t s = 0;
    for (int64_t m = lane; m < M; m += 32) {
      s += static_cast<acc_t>(a[r * M + m]) * static_cast<acc_t>(b[c * M + m]);
    }
    s = WarpReduce(storage[warp]).Sum(s);
    if (lane == 0) out[r * K + c] = static_cast<scalar_t>(s);
    __syncwarp();
  }
}

// *sum += the packed_entry_hash of every entry of one half, one thread per line.
__global__ void packed_checksum(unsigned int* sum, const int64_t* __restrict__ ptr,
                                const int64_t* __restrict__ idx, int64_t lines, int64_t nnz, int64_t limit,
                                bool rows_first, int64_t in) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= lines) return;
  CUDA_KERNEL_ASSERT(packed_line_ok(ptr, idx, r, nnz, limit));
  uint32_t h = 0;
  for (int64_t p = ptr[r]; p < ptr[r + 1]; ++p) {
    h += rows_first ? packed_entry_hash(r, idx[p], in) : packed_entry_hash(idx[p], r, in);
  }
  if (h != 0) atomicAdd(sum, static_cast<unsigned int>(h));
}

// The CUDA side of check_packed_halves_agree: both halves validated and their
// checksums compared on the device, without a host sync.
void check_halves_agree_cuda(const char* op, const at::Tensor& weight, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx) {
  const int64_t out_f = weight.size(0), in_f = weight.size(1), nnz = col_idx.numel();
  TORCH_CHECK(nnz == row_idx.numel(), op, ": the CSR half has ", nnz, " entries and the CSC half ",
              row_idx.numel(), ": they must describe the same mask (pack both with one mask_pack call)");
  at::Tensor sums = at::zeros({2}, row_ptr.options().dtype(at::kInt));  // two uint32 sums, wrapping
  auto* sum = reinterpret_cast<unsigned int*>(sums.data_ptr<int32_t>());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const at::Tensor cp = col_ptr.contiguous(), ri = row_idx.contiguous();
  const unsigned threads = 256;
  if (out_f > 0) {
    packed_checksum<<<static_cast<unsigned>((out_f + threads - 1) / threads), threads, 0, stream>>>(
        sum, rp.const_data_ptr<int64_t>(), ci.const_data_ptr<int64_t>(), out_f, nnz, in_f, true, in_f);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (in_f > 0) {
    packed_checksum<<<static_cast<unsigned>((in_f + threads - 1) / threads), threads, 0, stream>>>(
        sum + 1, cp.const_data_ptr<int64_t>(), ri.const_data_ptr<int64_t>(), in_f, nnz, out_f, false, in_f);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::_assert_async(sums[0] == sums[1],
                    "sparse_masked_linear: the CSR half (row_ptr, col_idx) and the CSC half (col_ptr, row_idx) "
                    "describe different masks (pack both halves with one mask_pack call)");
}

void check_cuda_args(const char* op, const at::Tensor& weight, const at::Tensor& x, int64_t features) {
  TORCH_CHECK(weight.is_floating_point(), op,
              ": the CUDA sparse path supports float32, float64, float16 and bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == features, op, ": the last dim must be ", features,
              ", got shape ", x.sizes());
  TORCH_CHECK(x.device() == weight.device() && x.scalar_type() == weight.scalar_type(), op,
              ": inputs must match weight's dtype and device");
}

dim3 grid_for(int64_t rows, int64_t M, const char* op) {
  const int64_t chunks = (M + kThreads - 1) / kThreads;
  TORCH_CHECK(chunks <= 65535 && rows < (int64_t(1) << 31), op, ": batch of ", M,
              " rows is too large for one launch");
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(std::max<int64_t>(chunks, 1)));
}

at::Tensor sparse_masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                     const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                     const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_masked_linear";
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_packed_shapes(op, weight, row_ptr, col_idx, out_f + 1, "row_ptr", "col_idx");
  check_packed_shapes(op, weight, col_ptr, row_idx, in_f + 1, "col_ptr", "row_idx");
  check_sparse_forward_args(op, x, weight, bias);
  check_cuda_args(op, weight, x, in_f);
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::cuda::CUDAGuard guard(weight.device());
  // The CSC half is read only by grad_input, but must describe the mask the
  // forward uses: a stale or foreign half would give a wrong gradient.
  check_halves_agree_cuda(op, weight, row_ptr, col_idx, col_ptr, row_idx);
  const at::Tensor xt = batch_last(x, in_f);
  const int64_t M = xt.size(1);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor yt = at::empty({out_f, M}, x.options());
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();  // raw reads below
  if (out_f > 0 && M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_masked_linear_cuda", [&] {
      gather_axpy_rows<scalar_t><<<grid_for(out_f, M, op), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          yt.data_ptr<scalar_t>(), M, ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(), in_f,
          idx.numel(), xt.const_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
          w.const_data_ptr<scalar_t>(), in_f, 1);
      PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor y = from_batch_last(yt, x, out_f);
  nonfinite_like_dense_linear(y, x, weight, row_ptr, col_idx);  // one host sync (see masked_nonfinite.h)
  return y;
}

at::Tensor grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& col_ptr,
                           const at::Tensor& row_idx) {
  const char* op = "sparse_masked_linear_grad_input";
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_packed_shapes(op, weight, col_ptr, row_idx, in_f + 1, "col_ptr", "row_idx");
  check_cuda_args(op, weight, grad_y, out_f);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor gyt = batch_last(grad_y, out_f);
  const int64_t M = gyt.size(1);
  const at::Tensor w = weight.contiguous();
  at::Tensor gxt = at::empty({in_f, M}, weight.options());
  const at::Tensor ptr = col_ptr.contiguous(), idx = row_idx.contiguous();
  if (in_f > 0 && M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_masked_linear_cuda", [&] {
      gather_axpy_rows<scalar_t><<<grid_for(in_f, M, op), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          gxt.data_ptr<scalar_t>(), M, ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(), out_f,
          idx.numel(), gyt.const_data_ptr<scalar_t>(), nullptr, w.const_data_ptr<scalar_t>(), 1, in_f);
      PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor gx = from_batch_last(gxt, grad_y, in_f);
  nonfinite_like_dense_linear_grad_input(gx, grad_y, weight, col_ptr, row_idx);
  return gx;
}

at::Tensor grad_weight_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  const char* op = "sparse_masked_linear_grad_weight";
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_packed_shapes(op, weight, row_ptr, col_idx, out_f + 1, "row_ptr", "col_idx");
  check_cuda_args(op, weight, grad_y, out_f);
  check_cuda_args(op, weight, x, in_f);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor gyt = batch_last(grad_y, out_f);
  const at::Tensor xt = batch_last(x, in_f);
  TORCH_CHECK(gyt.size(1) == xt.size(1), op, ": grad_y and x must have the same number of rows");
  at::Tensor gw = at::zeros({out_f, in_f}, weight.options());  // pruned entries: exactly 0
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  if (out_f > 0 && idx.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_masked_linear_cuda", [&] {
      sampled_dots<scalar_t><<<static_cast<unsigned>(out_f), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          gw.data_ptr<scalar_t>(), xt.size(1), in_f, ptr.const_data_ptr<int64_t>(),
          idx.const_data_ptr<int64_t>(), idx.numel(), gyt.const_data_ptr<scalar_t>(),
          xt.const_data_ptr<scalar_t>());
      PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("sparse_masked_linear", &sparse_masked_linear_cuda);
  m.impl("sparse_masked_linear_grad_input", &grad_input_cuda);
  m.impl("sparse_masked_linear_grad_weight", &grad_weight_cuda);
}

}  // namespace pyprune
