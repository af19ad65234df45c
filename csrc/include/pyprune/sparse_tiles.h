// The tiled scheme of the CUDA sparse linear kernels (csrc/cuda/sparse_masked_linear.cu),
// with its index math as host/device functions: the CPU emulation of the
// scheme (the emulated namespace of csrc/cpu/sparse_masked_linear.cpp, ops
// pyprune::_sparse_tiles_product_emulated / _sparse_tiles_sampled_emulated)
// runs the same functions, so the CPU tests check the decomposition the GPU runs.
//
// A product out[M, R] = src[M, K] @ A^T with A [R, K] sparse (a CSR-like half of
// the packed mask: line r holds the sorted columns idx[ptr[r]..ptr[r+1]), the
// value of entry (r, c) is w[r * w_line + c * w_index]) covers both
//   forward:    out = y  [M, out], src = x  [M, in],  A = W   (CSR half; w_line = in, w_index = 1)
//   grad_input: out = gx [M, in],  src = gy [M, out], A = W^T (CSC half; w_line = 1,  w_index = in)
// One thread block owns a tile of kTileM batch rows x kTileR lines and one K
// range (split-K). It walks its range in chunks of kTileK columns: the chunk of
// src is staged in shared memory transposed ([k][m], fp32 for fp16/bf16), then
// each line's kept entries within the chunk scale one row of the stage into the
// line's register accumulators (4 batch rows per thread). The src chunk is read
// once per block for kTileR lines, not once per kept weight, and the entries
// once per block. Splits write fp32 partial sums to a workspace [splits, M, R]
// that a second kernel adds up in split order: deterministic.
//
// The sampled gradient grad_w[r, c] = sum_m gy[m, r] * x[m, c] at kept (r, c)
// uses the same tiles: a block owns kTileR lines and a K range, loops over
// batch chunks of kTileM (outer) and column chunks of kTileK (inner), holds its
// lines' grad_y values of the batch chunk in registers and stages x's chunk;
// each kept entry's partial dot product (reduced over the 16 threads of its
// line) is added to its sum in a workspace [nnz] (fp32, or fp64 for double) in
// batch-chunk order by the one thread that owns it: deterministic. A last pass
// scatters the sums into the dense gradient.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace pyprune {
namespace sparse_tiles {

constexpr int kThreads = 256;              // threads per block
constexpr int kGroup = 16;                 // threads sharing one line (half a warp)
constexpr int kTileM = 4 * kGroup;         // batch rows per block: 4 per thread, contiguous
constexpr int kLinesPerThread = 8;         // lines whose sums one thread holds
constexpr int kLineGroups = kThreads / kGroup;                  // 16
constexpr int kTileR = kLineGroups * kLinesPerThread;           // 128 lines per block
constexpr int kTileK = 64;                 // columns per staged chunk
constexpr int kStagePad = 4;               // row padding of the [k][m] stage (keeps float4 alignment)
constexpr int kStageStride = kTileM + kStagePad;
// Split-K aims at this many blocks per SM (two resident blocks of 256 threads)
// and leaves each split at least this many chunks.
constexpr int kBlocksPerSM = 2;
constexpr int kMinChunksPerSplit = 2;

// First position p in [begin, end) with idx[p] >= key (end if none); idx sorted.
C10_HOST_DEVICE inline int64_t lower_bound_index(const int64_t* idx, int64_t begin, int64_t end, int64_t key) {
  while (begin < end) {
    const int64_t mid = begin + (end - begin) / 2;
    if (idx[mid] < key) {
      begin = mid + 1;
    } else {
      end = mid;
    }
  }
  return begin;
}

// How the K dimension is split between blocks: `splits` ranges of `chunks_per_split`
// chunks each (the last may be shorter or, rarely, empty).
struct SplitPlan {
  int64_t splits;
  int64_t chunks_per_split;
};

inline SplitPlan plan_splits(int64_t lines, int64_t batch, int64_t K, int64_t sms) {
  const int64_t chunks = std::max<int64_t>((K + kTileK - 1) / kTileK, 1);
  const int64_t tiles = std::max<int64_t>((lines + kTileR - 1) / kTileR, 1) *
                        std::max<int64_t>((batch + kTileM - 1) / kTileM, 1);
  const int64_t wanted = (kBlocksPerSM * std::max<int64_t>(sms, 1) + tiles - 1) / tiles;
  const int64_t most = std::max<int64_t>(chunks / kMinChunksPerSplit, 1);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, most);
  const int64_t per = (chunks + splits - 1) / splits;
  return {(chunks + per - 1) / per, per};  // no split left without a chunk
}

// The columns [first, last) of split z.
C10_HOST_DEVICE inline void split_columns(int64_t z, int64_t chunks_per_split, int64_t K, int64_t& first,
                                          int64_t& last) {
  first = z * chunks_per_split * kTileK;
  last = first + chunks_per_split * kTileK;
  if (first > K) first = K;
  if (last > K) last = K;
}

// The element of a [kTileK x kTileM] stage that thread (warp, lane) loads at
// step `step` (0 .. kTileK * kTileM / kThreads - 1): a warp covers 8 columns x
// 4 batch rows per step, so its global reads are 32-byte runs along k and its
// shared-memory writes ([k][m], row stride kStageStride) hit 32 distinct banks.
C10_HOST_DEVICE inline void stage_coords(int warp, int lane, int step, int& k, int& m) {
  const int region = warp + (kThreads / 32) * step;  // 8 x 4 regions, 8 across k
  k = (region % (kTileK / 8)) * 8 + lane % 8;
  m = (region / (kTileK / 8)) * 4 + lane / 8;
}
constexpr int kStageSteps = kTileK * kTileM / kThreads;  // 16

// The element of a [kTileM x kGroup] stage ([m][line], row stride kGroup + 1)
// that thread t moves at step `step` (0 .. kGroupStageSteps - 1): 16 consecutive
// lines per batch row, so the global side (y or grad_y, [M, lines]) is read or
// written in 64-byte runs. The product's results leave through it, the sampled
// gradient's grad_y values come in through it.
C10_HOST_DEVICE inline void group_stage_coords(int t, int step, int& m, int& line) {
  const int flat = t + kThreads * step;
  line = flat % kGroup;
  m = flat / kGroup;
}
constexpr int kGroupStageSteps = kTileM * kGroup / kThreads;  // 4
constexpr int kGroupStageStride = kGroup + 1;

// The line of block-local line slot j (0 .. kLinesPerThread-1) of line group g.
C10_HOST_DEVICE inline int64_t tile_line(int64_t line0, int group, int j) {
  return line0 + group + static_cast<int64_t>(kLineGroups) * j;
}

// Whether a line of the dense-masked product meets a non-finite source value
// through a pruned weight (IEEE: 0 * inf = NaN there): a merge of the row's
// non-finite columns with the line's sorted kept columns. The sparse kernels
// never read pruned weights; this restores the dense path's NaN.
template <typename scalar_t, typename IsFinite>
C10_HOST_DEVICE bool meets_nonfinite_through_pruned(const scalar_t* src_row, int64_t K, const int64_t* idx,
                                                    int64_t begin, int64_t end, IsFinite is_finite) {
  int64_t p = begin;
  for (int64_t c = 0; c < K; ++c) {
    if (is_finite(src_row[c])) continue;
    while (p < end && idx[p] < c) ++p;
    if (p == end || idx[p] != c) return true;
  }
  return false;
}

}  // namespace sparse_tiles
}  // namespace pyprune
