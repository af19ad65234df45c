// CUDA kernels of the sparse path of masked_linear: the tiled scheme of
// pyprune/sparse_tiles.h (batch tiles x line tiles x split-K, the source chunk
// staged in shared memory, register accumulators, deterministic split sums),
// whose index math the CPU emulation (op _sparse_tiles_emulated) shares.
//
// Index bounds and order are checked on the device (CUDA_KERNEL_ASSERT), as
// PyTorch's own CUDA indexing ops do, instead of reading the indices back to
// the host; so is the agreement of the two halves (checksums, _assert_async).
// Non-finite inputs get the dense path's NaN from a device-side pass too (no
// host sync on any path).
#include <pyprune/cuda_launch.h>
#include <pyprune/masked.h>
#include <pyprune/packed_mask.h>
#include <pyprune/sparse_tiles.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace pyprune {
namespace {

namespace st = sparse_tiles;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr unsigned kFullWarp = 0xffffffffu;

template <typename scalar_t>
struct IsFinite {
  __device__ bool operator()(scalar_t v) const { return ::isfinite(static_cast<acc_type_t<scalar_t>>(v)); }
};

// The stage [kTileK][kStageStride] of src[m0.., k0..] (src: [M, K], rows contiguous),
// zero outside the matrix.
template <typename scalar_t, typename acc_t>
__device__ void stage_source(acc_t* stage, const scalar_t* __restrict__ src, int64_t M, int64_t K, int64_t m0,
                             int64_t k0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll 4
  for (int step = 0; step < st::kStageSteps; ++step) {
    int k, m;
    st::stage_coords(warp, lane, step, k, m);
    const int64_t gm = m0 + m, gk = k0 + k;
    stage[k * st::kStageStride + m] = (gm < M && gk < K) ? static_cast<acc_t>(src[gm * K + gk]) : acc_t(0);
  }
}

// Per-slot line bounds of this thread's lines within the columns [first, last).
struct LineCursors {
  int64_t next[st::kLinesPerThread];  // first entry not yet used
  int64_t end[st::kLinesPerThread];   // first entry at or past `last`
};

__device__ void init_cursors(LineCursors& cur, int64_t line0, int64_t R, const int64_t* __restrict__ ptr,
                             const int64_t* __restrict__ idx, int64_t nnz, int64_t first, int64_t last) {
  const int group = threadIdx.x / st::kGroup;
#pragma unroll
  for (int j = 0; j < st::kLinesPerThread; ++j) {
    const int64_t r = st::tile_line(line0, group, j);
    cur.next[j] = cur.end[j] = 0;
    if (r >= R) continue;
    const int64_t b = ptr[r], e = ptr[r + 1];
    CUDA_KERNEL_ASSERT(b >= 0 && b <= e && e <= nnz);
    cur.next[j] = st::lower_bound_index(idx, b, e, first);
    cur.end[j] = st::lower_bound_index(idx, cur.next[j], e, last);
  }
}

// One line's entries within the staged chunk [k0, k1), 16 at a time: each
// thread of the line's group loads one (index, value), then the group walks
// them in order through shuffles, calling visit(t, stage_column, value) with
// every thread of the warp (the two groups of a warp loop together; t >= count
// marks a thread's turn without an entry of its own line). Returns the number
// of entries used.
template <typename acc_t, typename scalar_t, typename Visit>
__device__ int64_t walk_chunk(int64_t r, int64_t p, int64_t e, int64_t k0, int64_t k1, int64_t K,
                              const int64_t* __restrict__ idx, const scalar_t* __restrict__ w, int64_t w_line,
                              int64_t w_index, bool need_values, Visit visit) {
  const int sub = threadIdx.x % st::kGroup;
  const int half = (threadIdx.x % 32) / st::kGroup * st::kGroup;
  const int64_t start = p;
  while (true) {
    const int64_t q = p + sub;
    int column = 0;
    acc_t v = 0;
    bool in = false;
    if (q < e) {
      const int64_t c = idx[q];
      CUDA_KERNEL_ASSERT(c >= 0 && c < K && (q == start || idx[q - 1] < c));
      in = c < k1;
      if (in) {
        CUDA_KERNEL_ASSERT(c >= k0);
        column = static_cast<int>(c - k0);
        if (need_values) v = static_cast<acc_t>(w[r * w_line + c * w_index]);
      }
    }
    const unsigned ball = (__ballot_sync(kFullWarp, in) >> half) & 0xffffu;
    CUDA_KERNEL_ASSERT((ball & (ball + 1)) == 0);  // sorted: the chunk's entries come first
    const int count = __popc(ball);
    const int both = max(count, __shfl_xor_sync(kFullWarp, count, st::kGroup));
    for (int t = 0; t < both; ++t) {
      const int ct = __shfl_sync(kFullWarp, column, t, st::kGroup);
      const acc_t vt = __shfl_sync(kFullWarp, v, t, st::kGroup);
      visit(t, count, p, ct, vt);
    }
    p += count;
    if (!__any_sync(kFullWarp, count == st::kGroup)) break;
  }
  return p;
}

// out[m, r] (+ init[r]) = sum over kept (r, c) of A[r, c] * src[m, c], one
// tile of kTileM batch rows x kTileR lines and split blockIdx.z; with splits,
// fp32 partial sums into ws[z, m, r].
template <typename scalar_t>
__global__ void __launch_bounds__(st::kThreads)
tiled_product(scalar_t* __restrict__ out, acc_type_t<scalar_t>* __restrict__ ws, const scalar_t* __restrict__ init,
              const scalar_t* __restrict__ src, int64_t M, int64_t K, int64_t R, const int64_t* __restrict__ ptr,
              const int64_t* __restrict__ idx, int64_t nnz, const scalar_t* __restrict__ w, int64_t w_line,
              int64_t w_index, int64_t chunks_per_split) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ __align__(16) acc_t stage[st::kTileK * st::kStageStride];
  const int64_t line0 = int64_t(blockIdx.x) * st::kTileR, m0 = int64_t(blockIdx.y) * st::kTileM;
  const int64_t z = blockIdx.z;
  const int group = threadIdx.x / st::kGroup, sub = threadIdx.x % st::kGroup;
  int64_t first, last;
  st::split_columns(z, chunks_per_split, K, first, last);
  LineCursors cur;
  init_cursors(cur, line0, R, ptr, idx, nnz, first, last);
  acc_t acc[st::kLinesPerThread][4] = {};
  for (int64_t k0 = first; k0 < last; k0 += st::kTileK) {
    const int64_t k1 = k0 + st::kTileK < last ? k0 + st::kTileK : last;
    __syncthreads();  // the previous chunk's stage is no longer read
    stage_source(stage, src, M, K, m0, k0);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < st::kLinesPerThread; ++j) {
      const int64_t r = st::tile_line(line0, group, j);
      cur.next[j] = walk_chunk<acc_t>(r, cur.next[j], cur.end[j], k0, k1, K, idx, w, w_line, w_index, true,
                                      [&](int t, int count, int64_t, int column, acc_t v) {
                                        if (t >= count) return;
                                        const acc_t* row = stage + column * st::kStageStride + 4 * sub;
                                        acc[j][0] += v * row[0];
                                        acc[j][1] += v * row[1];
                                        acc[j][2] += v * row[2];
                                        acc[j][3] += v * row[3];
                                      });
    }
  }
  // Out through a [kTileM][kGroup] stage per slot: 16 consecutive lines per row.
  const bool direct = gridDim.z == 1;
#pragma unroll
  for (int j = 0; j < st::kLinesPerThread; ++j) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) stage[(4 * sub + i) * st::kGroupStageStride + group] = acc[j][i];
    __syncthreads();
#pragma unroll
    for (int step = 0; step < st::kGroupStageSteps; ++step) {
      int m, line;
      st::group_stage_coords(threadIdx.x, step, m, line);
      const int64_t gm = m0 + m, r = line0 + st::kGroup * j + line;
      if (gm >= M || r >= R) continue;
      const acc_t s = stage[m * st::kGroupStageStride + line];
      if (direct) {
        out[gm * R + r] = static_cast<scalar_t>(init ? s + static_cast<acc_t>(init[r]) : s);
      } else {
        ws[(z * M + gm) * R + r] = s;
      }
    }
  }
}

// out[m, r] = init[r] + the split sums in split order.
template <typename scalar_t>
__global__ void sum_splits(scalar_t* __restrict__ out, const acc_type_t<scalar_t>* __restrict__ ws,
                           const scalar_t* __restrict__ init, int64_t splits, int64_t M, int64_t R) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t n = M * R;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    for (int64_t z = 0; z < splits; ++z) s += ws[z * n + i];
    out[i] = static_cast<scalar_t>(init ? s + static_cast<acc_t>(init[i % R]) : s);
  }
}

// The dense path's NaN (see masked_nonfinite.cpp): one block per batch row; a
// row without non-finite values costs one read of it.
template <typename scalar_t>
__global__ void nonfinite_like_dense(scalar_t* __restrict__ out, const scalar_t* __restrict__ src, int64_t K,
                                     int64_t R, const int64_t* __restrict__ ptr, const int64_t* __restrict__ idx,
                                     int64_t nnz) {
  const scalar_t* row = src + int64_t(blockIdx.x) * K;
  const IsFinite<scalar_t> is_finite;
  bool any = false;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) any |= !is_finite(row[c]);
  if (!__syncthreads_or(any)) return;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    const int64_t b = ptr[r], e = ptr[r + 1];
    CUDA_KERNEL_ASSERT(b >= 0 && b <= e && e <= nnz);
    if (st::meets_nonfinite_through_pruned(row, K, idx, b, e, is_finite)) {
      out[int64_t(blockIdx.x) * R + r] = static_cast<scalar_t>(__int_as_float(0x7fc00000));  // NaN
    }
  }
}

// Sums of grad_w at the kept entries, into sums[nnz] (CSR positions).
template <typename scalar_t>
__global__ void __launch_bounds__(st::kThreads)
sampled_gradient(acc_type_t<scalar_t>* __restrict__ sums, const scalar_t* __restrict__ gy,
                 const scalar_t* __restrict__ x, int64_t M, int64_t K, int64_t R, const int64_t* __restrict__ ptr,
                 const int64_t* __restrict__ idx, int64_t nnz, int64_t chunks_per_split) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ __align__(16) acc_t stage[st::kTileK * st::kStageStride];
  __shared__ acc_t lines[st::kTileM * st::kGroupStageStride];
  const int64_t line0 = int64_t(blockIdx.x) * st::kTileR;
  const int group = threadIdx.x / st::kGroup, sub = threadIdx.x % st::kGroup;
  int64_t first, last;
  st::split_columns(blockIdx.y, chunks_per_split, K, first, last);
  LineCursors start;
  init_cursors(start, line0, R, ptr, idx, nnz, first, last);
  for (int64_t m0 = 0; m0 < M; m0 += st::kTileM) {
    // This thread's grad_y values of the batch chunk: g[j][i] = gy[m0 + 4 sub + i, line j].
    acc_t g[st::kLinesPerThread][4];
#pragma unroll
    for (int j = 0; j < st::kLinesPerThread; ++j) {
      __syncthreads();
#pragma unroll
      for (int step = 0; step < st::kGroupStageSteps; ++step) {
        int m, line;
        st::group_stage_coords(threadIdx.x, step, m, line);
        const int64_t gm = m0 + m, r = line0 + st::kGroup * j + line;
        lines[m * st::kGroupStageStride + line] = (gm < M && r < R) ? static_cast<acc_t>(gy[gm * R + r]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < 4; ++i) g[j][i] = lines[(4 * sub + i) * st::kGroupStageStride + group];
    }
    int64_t next[st::kLinesPerThread];
#pragma unroll
    for (int j = 0; j < st::kLinesPerThread; ++j) next[j] = start.next[j];
    for (int64_t k0 = first; k0 < last; k0 += st::kTileK) {
      const int64_t k1 = k0 + st::kTileK < last ? k0 + st::kTileK : last;
      __syncthreads();
      stage_source(stage, x, M, K, m0, k0);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < st::kLinesPerThread; ++j) {
        const int64_t r = st::tile_line(line0, group, j);
        next[j] = walk_chunk<acc_t, scalar_t>(
            r, next[j], start.end[j], k0, k1, K, idx, nullptr, 0, 0, false,
            [&](int t, int count, int64_t p, int column, acc_t) {
              if (t >= count) column = 0;  // every thread of the warp joins the reduction below
              const acc_t* row = stage + column * st::kStageStride + 4 * sub;
              acc_t s = g[j][0] * row[0] + g[j][1] * row[1] + g[j][2] * row[2] + g[j][3] * row[3];
#pragma unroll
              for (int offset = st::kGroup / 2; offset > 0; offset /= 2) {
                s += __shfl_xor_sync(kFullWarp, s, offset, st::kGroup);
              }
              if (sub == 0 && t < count) sums[p + t] = (m0 == 0 ? acc_t(0) : sums[p + t]) + s;
            });
      }
    }
  }
}

// grad_w[r, idx[p]] = sums[p], one warp per line.
template <typename scalar_t>
__global__ void scatter_sums(scalar_t* __restrict__ grad_w, const acc_type_t<scalar_t>* __restrict__ sums,
                             const int64_t* __restrict__ ptr, const int64_t* __restrict__ idx, int64_t R, int64_t K) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= R) return;
  for (int64_t p = ptr[r] + threadIdx.x % 32; p < ptr[r + 1]; p += 32) {
    grad_w[r * K + idx[p]] = static_cast<scalar_t>(sums[p]);
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

// A product through the tiled kernel (see tiled_product): out [M, R] from
// src [M, K] (rows contiguous) and one half of the packed mask.
struct ProductArgs {
  const at::Tensor& src;
  const at::Tensor& ptr;
  const at::Tensor& idx;
  const at::Tensor& weight;  // contiguous [out, in]
  int64_t w_line, w_index;
  const at::Tensor* init;  // bias or nullptr
};

at::Tensor tiled_product_cuda(const ProductArgs& a, int64_t R, const char* op) {
  const int64_t M = a.src.size(0), K = a.src.size(1), nnz = a.idx.numel();
  at::Tensor out = at::empty({M, R}, a.src.options());
  if (M == 0 || R == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const st::SplitPlan plan = st::plan_splits(R, M, K, sms);
  const int64_t line_tiles = (R + st::kTileR - 1) / st::kTileR, batch_tiles = (M + st::kTileM - 1) / st::kTileM;
  TORCH_CHECK(batch_tiles <= 65535 && plan.splits <= 65535 && line_tiles < (int64_t(1) << 31), op, ": a batch of ",
              M, " rows through ", R, " outputs is too large for one launch");
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(), op, ": a batch of ", M, " rows is too large");
  const dim3 grid(static_cast<unsigned>(line_tiles), static_cast<unsigned>(batch_tiles),
                  static_cast<unsigned>(plan.splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.src.scalar_type(), "sparse_masked_linear_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* init = a.init ? a.init->const_data_ptr<scalar_t>() : nullptr;
    at::Tensor ws;
    if (plan.splits > 1) ws = at::empty({plan.splits, M, R}, a.src.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    tiled_product<scalar_t><<<grid, st::kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), plan.splits > 1 ? ws.data_ptr<acc_t>() : nullptr, init,
        a.src.const_data_ptr<scalar_t>(), M, K, R, a.ptr.const_data_ptr<int64_t>(), a.idx.const_data_ptr<int64_t>(),
        nnz, a.weight.const_data_ptr<scalar_t>(), a.w_line, a.w_index, plan.chunks_per_split);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.splits > 1) {
      const int64_t blocks = std::min<int64_t>((M * R + 255) / 256, int64_t(sms) * 8);
      sum_splits<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(out.data_ptr<scalar_t>(),
                                                                            ws.const_data_ptr<acc_t>(), init,
                                                                            plan.splits, M, R);
      PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    }
    nonfinite_like_dense<scalar_t><<<static_cast<unsigned>(M), 256, 0, stream>>>(
        out.data_ptr<scalar_t>(), a.src.const_data_ptr<scalar_t>(), K, R, a.ptr.const_data_ptr<int64_t>(),
        a.idx.const_data_ptr<int64_t>(), nnz);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
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
  const at::Tensor rows = as_rows(x, in_f).contiguous();
  const at::Tensor w = weight.contiguous(), ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor y = tiled_product_cuda({rows, ptr, idx, w, in_f, 1, has_bias ? &b : nullptr}, out_f, op);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_f;
  return y.view(shape);
}

at::Tensor grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& col_ptr,
                           const at::Tensor& row_idx) {
  const char* op = "sparse_masked_linear_grad_input";
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_packed_shapes(op, weight, col_ptr, row_idx, in_f + 1, "col_ptr", "row_idx");
  check_cuda_args(op, weight, grad_y, out_f);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor rows = as_rows(grad_y, out_f).contiguous();
  const at::Tensor w = weight.contiguous(), ptr = col_ptr.contiguous(), idx = row_idx.contiguous();
  // grad_x = grad_y @ (W * mask): lines are W's columns (the CSC half), entry (c, r) is w[r, c].
  const at::Tensor gx = tiled_product_cuda({rows, ptr, idx, w, 1, in_f, nullptr}, in_f, op);
  std::vector<int64_t> shape(grad_y.sizes().begin(), grad_y.sizes().end());
  shape.back() = in_f;
  return gx.view(shape);
}

at::Tensor grad_weight_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  const char* op = "sparse_masked_linear_grad_weight";
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_packed_shapes(op, weight, row_ptr, col_idx, out_f + 1, "row_ptr", "col_idx");
  check_cuda_args(op, weight, grad_y, out_f);
  check_cuda_args(op, weight, x, in_f);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor gy = as_rows(grad_y, out_f).contiguous(), xr = as_rows(x, in_f).contiguous();
  TORCH_CHECK(gy.size(0) == xr.size(0), op, ": grad_y and x must have the same number of rows");
  const int64_t M = xr.size(0), nnz = col_idx.numel();
  at::Tensor gw = at::zeros({out_f, in_f}, weight.options());  // pruned entries: exactly 0
  if (out_f == 0 || nnz == 0 || M == 0) return gw;
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const st::SplitPlan plan = st::plan_splits(out_f, st::kTileM, in_f, sms);  // one batch tile: the batch is looped
  const int64_t line_tiles = (out_f + st::kTileR - 1) / st::kTileR;
  TORCH_CHECK(plan.splits <= 65535 && line_tiles < (int64_t(1) << 31), op, ": weight too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_masked_linear_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    at::Tensor sums = at::empty({nnz}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    sampled_gradient<scalar_t><<<dim3(static_cast<unsigned>(line_tiles), static_cast<unsigned>(plan.splits)),
                                 st::kThreads, 0, stream>>>(sums.data_ptr<acc_t>(), gy.const_data_ptr<scalar_t>(),
                                                            xr.const_data_ptr<scalar_t>(), M, in_f, out_f,
                                                            ptr.const_data_ptr<int64_t>(),
                                                            idx.const_data_ptr<int64_t>(), nnz,
                                                            plan.chunks_per_split);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    const int warps = 8;
    scatter_sums<scalar_t><<<static_cast<unsigned>((out_f + warps - 1) / warps), warps * 32, 0, stream>>>(
        gw.data_ptr<scalar_t>(), sums.const_data_ptr<acc_t>(), ptr.const_data_ptr<int64_t>(),
        idx.const_data_ptr<int64_t>(), out_f, in_f);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("sparse_masked_linear", &sparse_masked_linear_cuda);
  m.impl("sparse_masked_linear_grad_input", &grad_input_cuda);
  m.impl("sparse_masked_linear_grad_weight", &grad_weight_cuda);
}

}  // namespace pyprune
