// CUDA kernels of the global magnitude selection: the histogram pass of the
// radix select and the mask write (the driver is in magnitude_common.cpp; the
// per-element math is shared with the CPU in pyprune/magnitude.h).
//
// All tensors of the list are covered by one launch: a device-side table of
// slots (pointers, sizes, first tile) and fixed tiles of kTile elements, each
// tile inside one tensor; a block finds its tensor by binary search. Counts
// are integer atomics (into shared memory, then one global add per non-empty
// bin and block): exact, so deterministic. Tie ranks: per-tile counts,
// cub::DeviceScan over tiles, cub::BlockScan within a tile.
#include <pyprune/cuda_launch.h>
#include <pyprune/magnitude.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

namespace pyprune {
namespace {

constexpr int kThreads = 256;
// Consecutive elements per thread in the ranked write (a blocked arrangement,
// so that a thread's ranks follow the flat index).
constexpr int kItems = 8;
constexpr int64_t kSubTile = int64_t(kThreads) * kItems;
// Elements per block: enough work per block to amortise zeroing and flushing
// the shared histogram; a multiple of kSubTile.
constexpr int64_t kTile = 8 * kSubTile;

struct Slot {
  const void* w;       // the weights' raw bits
  const uint8_t* m;    // the bool mask's bytes, read as `byte != 0`
  bool* out;           // null in the histogram passes
  int64_t numel;
  int64_t first_tile;  // number of tiles of the slots before this one
};

// The slot table on the device, and where the tiles of each slot start.
struct DeviceSlots {
  at::Tensor storage;  // keeps the device copy alive until the kernels are queued
  const Slot* slots = nullptr;
  int count = 0;
  int64_t tiles = 0;
};

DeviceSlots upload_slots(const MagnitudeInputs& in, const std::vector<at::Tensor>* out) {
  std::vector<Slot> host;
  int64_t tiles = 0;
  for (size_t i = 0; i < in.weights.size(); ++i) {
    const int64_t n = in.weights[i].numel();  // > 0: empty tensors were left out
    host.push_back({in.weights[i].const_data_ptr(),
                    reinterpret_cast<const uint8_t*>(in.masks[i].const_data_ptr<bool>()),
                    out ? (*out)[i].data_ptr<bool>() : nullptr, n, tiles});
    tiles += (n + kTile - 1) / kTile;
  }
  TORCH_CHECK(tiles <= INT_MAX, "magnitude selection: too many weights for one CUDA launch (", tiles,
              " tiles of ", kTile, ")");
  const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(Slot));
  at::Tensor staging = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(staging.data_ptr(), host.data(), bytes);
  DeviceSlots d;
  d.storage = staging.to(in.device);
  d.slots = reinterpret_cast<const Slot*>(d.storage.const_data_ptr());
  d.count = static_cast<int>(host.size());
  d.tiles = tiles;
  return d;
}

// The last slot whose first tile is <= tile.
__device__ inline int find_slot(const Slot* slots, int count, int64_t tile) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (slots[mid].first_tile <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// This block's tile: its slot and the element range [begin, end) in it.
struct TileRange {
  Slot slot;
  int64_t begin;
  int64_t end;
};

__device__ inline TileRange my_tile(const Slot* slots, int count) {
  const int64_t tile = blockIdx.x;
  TileRange r;
  r.slot = slots[find_slot(slots, count, tile)];
  r.begin = (tile - r.slot.first_tile) * kTile;
  r.end = min(r.begin + kTile, r.slot.numel);
  return r;
}

// ---------------------------------------------------------------------------
// Kernels.

template <typename Keys>
__global__ void __launch_bounds__(kThreads)
histogram_kernel(const Slot* __restrict__ slots, int count, RadixPass pass,
                 unsigned long long* __restrict__ counts) {
  using bits_t = typename Keys::bits_t;
  __shared__ unsigned int hist[kRadixBins];
  for (int d = threadIdx.x; d < kRadixBins; d += kThreads) hist[d] = 0;
  __syncthreads();
  const TileRange t = my_tile(slots, count);
  const bits_t* w = static_cast<const bits_t*>(t.slot.w);
#pragma unroll 4
  for (int64_t i = t.begin + threadIdx.x; i < t.end; i += kThreads) {
    const bits_t key = magnitude_key<Keys>(w[i]);
    if ((t.slot.m[i] != 0) & in_bucket(key, pass)) atomicAdd(&hist[radix_digit(key, pass)], 1u);
  }
  __syncthreads();
  const int bins = 1 << pass.bits;
  for (int d = threadIdx.x; d < bins; d += kThreads) {
    if (hist[d] != 0) atomicAdd(&counts[d], static_cast<unsigned long long>(hist[d]));
  }
}

// Every kept weight at the threshold goes: out = kept && key > threshold.
template <typename Keys>
__global__ void __launch_bounds__(kThreads)
write_all_ties_kernel(const Slot* __restrict__ slots, int count, typename Keys::bits_t threshold) {
  using bits_t = typename Keys::bits_t;
  const TileRange t = my_tile(slots, count);
  const bits_t* w = static_cast<const bits_t*>(t.slot.w);
#pragma unroll 4
  for (int64_t i = t.begin + threadIdx.x; i < t.end; i += kThreads) {
    t.slot.out[i] = stays_kept_all_ties(t.slot.m[i] != 0, magnitude_key<Keys>(w[i]), threshold);
  }
}

// Number of kept weights at the threshold in each tile.
template <typename Keys>
__global__ void __launch_bounds__(kThreads)
count_ties_kernel(const Slot* __restrict__ slots, int count, typename Keys::bits_t threshold,
                  int64_t* __restrict__ tile_counts) {
  using bits_t = typename Keys::bits_t;
  using BlockReduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const TileRange t = my_tile(slots, count);
  const bits_t* w = static_cast<const bits_t*>(t.slot.w);
  int mine = 0;  // at most kTile / kThreads
  for (int64_t i = t.begin + threadIdx.x; i < t.end; i += kThreads) {
    mine += is_tie(t.slot.m[i] != 0, magnitude_key<Keys>(w[i]), threshold);
  }
  const int total = BlockReduce(storage).Sum(mine);
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = total;
}

// tile_ranks[tile]: tie rank of the tile's first element (exclusive scan of
// the tile counts). Sub-tiles of kThreads x kItems consecutive elements; a
// block scan gives each thread the rank of its first item.
template <typename Keys>
__global__ void __launch_bounds__(kThreads)
write_ranked_kernel(const Slot* __restrict__ slots, int count, typename Keys::bits_t threshold,
                    const int64_t* __restrict__ tile_ranks, int64_t ties) {
  using bits_t = typename Keys::bits_t;
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage storage;
  const TileRange t = my_tile(slots, count);
  const bits_t* w = static_cast<const bits_t*>(t.slot.w);
  int64_t base = tile_ranks[blockIdx.x];
  for (int64_t sub = t.begin; sub < t.end; sub += kSubTile) {  // same trip count in every thread
    const int64_t first = sub + int64_t(threadIdx.x) * kItems;
    bits_t keys[kItems];
    bool kept[kItems];
    int mine = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const bool inside = first + j < t.end;
      keys[j] = inside ? magnitude_key<Keys>(w[first + j]) : bits_t(0);
      kept[j] = inside && t.slot.m[first + j] != 0;
      mine += is_tie(kept[j], keys[j], threshold);
    }
    int before = 0, in_sub_tile = 0;
    BlockScan(storage).ExclusiveSum(mine, before, in_sub_tile);
    __syncthreads();  // storage is reused by the next sub-tile's scan
    int64_t rank = base + before;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (first + j < t.end) t.slot.out[first + j] = stays_kept(kept[j], keys[j], threshold, rank, ties);
      rank += is_tie(kept[j], keys[j], threshold);
    }
    base += in_sub_tile;
  }
}

// ---------------------------------------------------------------------------
// Host side.

template <typename Keys>
void histogram_typed(const MagnitudeInputs& in, const RadixPass& pass, std::vector<int64_t>& counts) {
  const DeviceSlots d = upload_slots(in, nullptr);
  at::Tensor device_counts =
      at::zeros({int64_t(1) << pass.bits}, at::TensorOptions().dtype(at::kLong).device(in.device));
  auto stream = at::cuda::getCurrentCUDAStream();
  histogram_kernel<Keys><<<static_cast<unsigned>(d.tiles), kThreads, 0, stream>>>(
      d.slots, d.count, pass, reinterpret_cast<unsigned long long*>(device_counts.data_ptr<int64_t>()));
  PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = device_counts.cpu();  // waits for the kernel
  const int64_t* h = host.const_data_ptr<int64_t>();
  for (size_t i = 0; i < counts.size(); ++i) counts[i] += h[i];
}

template <typename Keys>
void write_typed(const MagnitudeInputs& in, const MagnitudeSelection& sel, std::vector<at::Tensor>& out) {
  using bits_t = typename Keys::bits_t;
  const bits_t threshold = static_cast<bits_t>(sel.threshold);
  const DeviceSlots d = upload_slots(in, &out);
  const unsigned grid = static_cast<unsigned>(d.tiles);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (sel.ties == sel.equal) {
    write_all_ties_kernel<Keys><<<grid, kThreads, 0, stream>>>(d.slots, d.count, threshold);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Some weights at the threshold stay: rank them in (tensor, index) order.
  const auto long_options = at::TensorOptions().dtype(at::kLong).device(in.device);
  at::Tensor tile_counts = at::empty({d.tiles}, long_options);
  at::Tensor tile_ranks = at::empty({d.tiles}, long_options);
  count_ties_kernel<Keys><<<grid, kThreads, 0, stream>>>(d.slots, d.count, threshold,
                                                          tile_counts.data_ptr<int64_t>());
  PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, tile_counts.const_data_ptr<int64_t>(),
                                               tile_ranks.data_ptr<int64_t>(), static_cast<int>(d.tiles),
                                               stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))},
                              at::TensorOptions().dtype(at::kByte).device(in.device));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), temp_bytes, tile_counts.const_data_ptr<int64_t>(),
                                               tile_ranks.data_ptr<int64_t>(), static_cast<int>(d.tiles),
                                               stream));
  write_ranked_kernel<Keys><<<grid, kThreads, 0, stream>>>(d.slots, d.count, threshold,
                                                            tile_ranks.const_data_ptr<int64_t>(), sel.ties);
  PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
}

void histogram_cuda(const MagnitudeInputs& in, const RadixPass& pass, std::vector<int64_t>& counts) {
  const c10::cuda::CUDAGuard guard(in.device);
  visit_magnitude_keys(in.dtype, [&](auto keys) { histogram_typed<decltype(keys)>(in, pass, counts); });
}

void write_cuda(const MagnitudeInputs& in, const MagnitudeSelection& sel, std::vector<at::Tensor>& out) {
  const c10::cuda::CUDAGuard guard(in.device);
  visit_magnitude_keys(in.dtype, [&](auto keys) { write_typed<decltype(keys)>(in, sel, out); });
}

constexpr MagnitudeKernels kCudaKernels{&histogram_cuda, &write_cuda};

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cuda(at::TensorList weights, at::TensorList masks,
                                                            int64_t k) {
  return magnitude_threshold_impl(weights, masks, k, kCudaKernels);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> magnitude_prune_cuda(at::TensorList weights,
                                                                                 at::TensorList masks,
                                                                                 int64_t k) {
  return magnitude_prune_impl(weights, masks, k, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("magnitude_threshold", &magnitude_threshold_cuda);
  m.impl("magnitude_prune", &magnitude_prune_cuda);
}

}  // namespace pyprune
