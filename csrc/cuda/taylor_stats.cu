// CUDA kernels for the Taylor-statistics ops.
//
// Two stages, both in a fixed order, so results are bit-identical run to run
// (no float atomics):
//   1. a pass over a and g (16-byte loads where alignment allows) that writes
//      one partial sum per (example, channel, segment) to a small buffer;
//   2. one block per channel that adds the segments of each example, folds
//      the example into first/second (add_example, shared with the CPU) and
//      reduces over examples with cub::BlockReduce.
#include <pyprune/cuda_launch.h>
#include <pyprune/taylor_stats.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace pyprune {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// VEC consecutive elements, loaded as one 16-byte (or smaller) transaction.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t>
constexpr int kWideVec = 16 / sizeof(scalar_t);

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kUnroll = 4;
// Enough blocks to fill a large GPU several times over (132 SMs on an H100).
constexpr int64_t kMinBlocks = 2048;

// Partial sums of stage 1, indexed by (example n, channel c, segment k).
struct PartialIndex {
  int64_t stride_n, stride_c, stride_k;
  __host__ __device__ int64_t operator()(int64_t n, int64_t c, int64_t k) const {
    return n * stride_n + c * stride_c + k * stride_k;
  }
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------
// Stage 1, planar: each (n, c) is a contiguous run of `inner` elements, cut into
// `num_segments` pieces of `segment` elements; one warp per piece.
template <typename scalar_t, int VEC, bool kSquares>
__global__ void __launch_bounds__(kThreads)
planar_partials(const scalar_t* __restrict__ a, const scalar_t* __restrict__ g,
                ChannelView v, int64_t segment, int64_t num_segments,
                acc_type_t<scalar_t>* __restrict__ partial,
                acc_type_t<scalar_t>* __restrict__ partial_sq) {
  using acc_t = acc_type_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  using WarpReduce = cub::WarpReduce<acc_t>;
  __shared__ typename WarpReduce::TempStorage reduce_storage[kWarpsPerBlock];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t items = v.batch * v.channels * num_segments;
  const int64_t warps_total = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + warp; item < items;
       item += warps_total) {
    const int64_t row = item / num_segments;
    const int64_t k = item % num_segments;
    const int64_t n = row / v.channels;
    const int64_t c = row % v.channels;
    const int64_t off = n * v.stride_batch + c * v.stride_channel;
    const scalar_t* ar = a + off;
    const scalar_t* gr = g + off;
    const int64_t begin = k * segment;
    const int64_t end = min(begin + segment, v.inner);

    acc_t s = 0, q = 0;
    for (int64_t base = begin + lane * VEC; base < end; base += 32 * VEC * kUnroll) {
      P pa[kUnroll], pg[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first: more bytes in flight
        const int64_t i = base + int64_t(u) * 32 * VEC;
        if (i < end) {
          pa[u] = *reinterpret_cast<const P*>(ar + i);
          pg[u] = *reinterpret_cast<const P*>(gr + i);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) pa[u].v[e] = pg[u].v[e] = scalar_t(0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t p = gate_product<acc_t>(pa[u].v[e], pg[u].v[e]);
          s += p;
          if constexpr (kSquares) q += p * p;
        }
      }
    }
    s = WarpReduce(reduce_storage[warp]).Sum(s);
    if constexpr (kSquares) {
      __syncwarp();
      q = WarpReduce(reduce_storage[warp]).Sum(q);
    }
    if (lane == 0) {
      partial[item] = s;  // item == (n * C + c) * num_segments + k
      if constexpr (kSquares) partial_sq[item] = q;
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------
// Stage 1, interleaved: channels are contiguous. A block covers a tile of
// (channel vectors across threadIdx.x) x (rows across threadIdx.y) for one
// example and one segment of rows; rows are then summed across threadIdx.y in
// order through shared memory.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
interleaved_partials(const scalar_t* __restrict__ a, const scalar_t* __restrict__ g,
                     ChannelView v, int64_t rows_per_segment, int64_t num_segments,
                     int64_t channel_tiles, acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t tile_sums[kThreads * VEC];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int bx = blockDim.x, by = blockDim.y;
  const int64_t block = blockIdx.x;
  const int64_t tile = block % channel_tiles;
  const int64_t k = (block / channel_tiles) % num_segments;
  const int64_t n = block / (channel_tiles * num_segments);
  const int64_t c0 = (tile * bx + tx) * VEC;
  const bool active = c0 < v.channels;

  acc_t acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0;
  if (active) {
    const int64_t r_end = min((k + 1) * rows_per_segment, v.inner);
    const scalar_t* an = a + n * v.stride_batch + c0;
    const scalar_t* gn = g + n * v.stride_batch + c0;
    for (int64_t r = k * rows_per_segment + ty; r < r_end; r += by) {
      const P pa = *reinterpret_cast<const P*>(an + r * v.stride_inner);
      const P pg = *reinterpret_cast<const P*>(gn + r * v.stride_inner);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += gate_product<acc_t>(pa.v[e], pg.v[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) tile_sums[(ty * bx + tx) * VEC + e] = acc[e];
  __syncthreads();
  if (ty == 0 && active) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc_t s = 0;
      for (int y = 0; y < by; ++y) s += tile_sums[(y * bx + tx) * VEC + e];
      partial[(n * num_segments + k) * v.channels + c0 + e] = s;
    }
  }
}

// ---------------------------------------------------------------------------
// Stage 2: one block per channel; deterministic block reduction over examples.
template <typename acc_t, bool kSquares>
__global__ void __launch_bounds__(kThreads)
finish_channels(const acc_t* __restrict__ partial, const acc_t* __restrict__ partial_sq,
                PartialIndex index, int64_t batch, int64_t num_segments, bool overwrite,
                acc_t* __restrict__ first, acc_t* __restrict__ second) {
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const int64_t c = blockIdx.x;
  acc_t f = 0, q = 0;
  for (int64_t n = threadIdx.x; n < batch; n += kThreads) {
    acc_t s = 0, s_sq = 0;
    for (int64_t k = 0; k < num_segments; ++k) {
      s += partial[index(n, c, k)];
      if constexpr (kSquares) s_sq += partial_sq[index(n, c, k)];
    }
    if constexpr (kSquares) {
      f += s;
      q += s_sq;
    } else {
      add_example(s, f, q);
    }
  }
  f = BlockReduce(storage).Sum(f);
  __syncthreads();
  q = BlockReduce(storage).Sum(q);
  if (threadIdx.x == 0) {
    first[c] = overwrite ? f : first[c] + f;
    second[c] = overwrite ? q : second[c] + q;
  }
}

// ---------------------------------------------------------------------------
// Host side.

int blocks_for(int64_t warps_needed) {
  const int64_t blocks = (warps_needed + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::min<int64_t>(blocks, 1 << 20));  // grid-stride beyond
}

template <typename scalar_t, int VEC>
void launch_planar(const TaylorStatsPlan& plan, at::Tensor& first, at::Tensor& second,
                      bool overwrite) {
  using acc_t = acc_type_t<scalar_t>;
  const ChannelView& v = plan.view;
  // About 4K elements per warp: enough loads in flight per warp, and enough
  // warps even when there are few (n, c) runs.
  const int64_t quantum = 32 * VEC;
  const int64_t target = 32 * VEC * kUnroll * 4;
  const int64_t num_segments = std::max<int64_t>(1, (v.inner + target - 1) / target);
  int64_t segment = (v.inner + num_segments - 1) / num_segments;
  segment = (segment + quantum - 1) / quantum * quantum;
  const int64_t items = v.batch * v.channels * num_segments;

  auto options = first.options();
  at::Tensor partial = at::empty({items}, options);
  at::Tensor partial_sq = plan.square_elements ? at::empty({items}, options) : partial;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* a = plan.a.const_data_ptr<scalar_t>();
  const auto* g = plan.g.const_data_ptr<scalar_t>();
  if (plan.square_elements) {
    planar_partials<scalar_t, VEC, true><<<blocks_for(items), kThreads, 0, stream>>>(
        a, g, v, segment, num_segments, partial.data_ptr<acc_t>(), partial_sq.data_ptr<acc_t>());
  } else {
    planar_partials<scalar_t, VEC, false><<<blocks_for(items), kThreads, 0, stream>>>(
        a, g, v, segment, num_segments, partial.data_ptr<acc_t>(), nullptr);
  }
  PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();

  const PartialIndex index{v.channels * num_segments, num_segments, 1};
  if (plan.square_elements) {
    finish_channels<acc_t, true><<<v.channels, kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), partial_sq.data_ptr<acc_t>(), index, v.batch,
        num_segments, overwrite, first.data_ptr<acc_t>(), second.data_ptr<acc_t>());
  } else {
    finish_channels<acc_t, false><<<v.channels, kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), nullptr, index, v.batch, num_segments, overwrite,
        first.data_ptr<acc_t>(), second.data_ptr<acc_t>());
  }
  PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_interleaved(const TaylorStatsPlan& plan, at::Tensor& first, at::Tensor& second,
                      bool overwrite) {
  using acc_t = acc_type_t<scalar_t>;
  const ChannelView& v = plan.view;
  const int64_t channel_vectors = (v.channels + VEC - 1) / VEC;
  int bx = 1;
  while (bx < 32 && bx < channel_vectors) bx *= 2;
  const int by = kThreads / bx;
  const int64_t channel_tiles = (channel_vectors + bx - 1) / bx;
  // Up to 16 rows per thread, fewer when that would leave the GPU with too few
  // blocks (kMinBlocks depends on nothing but the shape: same grid, same sums).
  const int64_t max_segments = (v.inner + by - 1) / by;  // one row per thread
  const int64_t wanted = (kMinBlocks + v.batch * channel_tiles - 1) / (v.batch * channel_tiles);
  const int64_t num_segments = std::clamp<int64_t>(
      std::max<int64_t>(wanted, (v.inner + int64_t(by) * 16 - 1) / (int64_t(by) * 16)), 1,
      std::max<int64_t>(max_segments, 1));
  const int64_t rows_per_segment = (v.inner + num_segments - 1) / num_segments;
  const int64_t blocks = v.batch * num_segments * channel_tiles;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "taylor_channel_stats: input too large for one launch");

  at::Tensor partial = at::empty({v.batch * num_segments * v.channels}, first.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  interleaved_partials<scalar_t, VEC><<<static_cast<unsigned>(blocks), dim3(bx, by), 0, stream>>>(
      plan.a.const_data_ptr<scalar_t>(), plan.g.const_data_ptr<scalar_t>(), v,
      rows_per_segment, num_segments, channel_tiles, partial.data_ptr<acc_t>());
  PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();

  const PartialIndex index{num_segments * v.channels, 1, v.channels};
  finish_channels<acc_t, false><<<v.channels, kThreads, 0, stream>>>(
      partial.data_ptr<acc_t>(), nullptr, index, v.batch, num_segments, overwrite,
      first.data_ptr<acc_t>(), second.data_ptr<acc_t>());
  PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte loads are used when every run (planar) or row (interleaved) starts
// on a 16-byte boundary; otherwise one element per load.
template <typename scalar_t>
bool can_vectorize(const TaylorStatsPlan& plan) {
  constexpr int VEC = kWideVec<scalar_t>;
  const ChannelView& v = plan.view;
  if (!aligned16(plan.a.const_data_ptr()) || !aligned16(plan.g.const_data_ptr())) return false;
  const bool batch_ok = v.batch == 1 || v.stride_batch % VEC == 0;
  if (plan.order == WalkOrder::Planar) {
    const bool channel_ok = v.channels == 1 || v.stride_channel % VEC == 0;
    return batch_ok && channel_ok && v.inner % VEC == 0;
  }
  const bool inner_ok = v.inner == 1 || v.stride_inner % VEC == 0;
  return batch_ok && inner_ok && v.channels % VEC == 0;
}

template <typename scalar_t>
void accumulate_typed(const TaylorStatsPlan& plan, at::Tensor& first, at::Tensor& second,
                      bool overwrite) {
  constexpr int VEC = kWideVec<scalar_t>;
  const bool wide = can_vectorize<scalar_t>(plan);
  if (plan.order == WalkOrder::Planar) {
    wide ? launch_planar<scalar_t, VEC>(plan, first, second, overwrite)
         : launch_planar<scalar_t, 1>(plan, first, second, overwrite);
  } else {
    wide ? launch_interleaved<scalar_t, VEC>(plan, first, second, overwrite)
         : launch_interleaved<scalar_t, 1>(plan, first, second, overwrite);
  }
}

void accumulate_cuda(const TaylorStatsPlan& plan, at::Tensor& first, at::Tensor& second,
                     bool overwrite) {
  const c10::cuda::CUDAGuard guard(plan.a.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.a.scalar_type(),
                                  "taylor_stats_cuda",
                                  [&] { accumulate_typed<scalar_t>(plan, first, second, overwrite); });
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& a, const at::Tensor& g,
                                                      int64_t channel_dim) {
  return channel_stats(a, g, channel_dim, &accumulate_cuda);
}

void channel_stats_cuda_(const at::Tensor& a, const at::Tensor& g, at::Tensor first,
                         at::Tensor second, int64_t channel_dim) {
  channel_stats_(a, g, first, second, channel_dim, &accumulate_cuda);
}

std::tuple<at::Tensor, at::Tensor> weight_stats_cuda(const at::Tensor& w, const at::Tensor& g_w) {
  return weight_stats(w, g_w, &accumulate_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("taylor_channel_stats", &channel_stats_cuda);
  m.impl("taylor_channel_stats_", &channel_stats_cuda_);
  m.impl("taylor_weight_stats", &weight_stats_cuda);
}

}  // namespace pyprune
