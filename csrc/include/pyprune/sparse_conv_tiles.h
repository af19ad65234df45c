// The tiled scheme of the CUDA sparse convolution kernels (csrc/cuda/sparse_masked_conv2d.cu),
// with its index math as host/device functions: the CPU emulation
// (csrc/cpu/sparse_conv_tiles_emulated.cpp, ops pyprune::_sparse_conv2d_*_tiles_emulated)
// runs the same functions, so the CPU tests check the decomposition the GPU runs.
//
// A direct convolution dst [N, L, OH, OW] from src [N, S, IH, IW]: `lines` L
// and sources S in `groups` groups; line l adds, for each of its kept entries
// (source s of its group, tap (ty, tx)), value * src[n, s, oy*sh - ph + ty*dh,
// ox*sw - pw + tx*dw] to every output pixel. An entry is a key s_in_group *
// kh*kw + ty*kw + tx, sorted within its line. It covers
//   forward:    dst = y,  src = x,  lines = output channels, the CSR half of the mask
//               (the key is the column of weight.view(out, -1); value = that weight);
//   grad_input: per phase (a, b) of grad_x (rows a::sh, columns b::sw), dst = that
//               phase, src = gy, stride 1, lines = input channels, the entries
//               transposed (grad_input_phases in pyprune/masked.h): the taps
//               that reach the phase, mirrored, with the phase's dilation and
//               padding (stride 1: one phase, padding dilation*(kernel-1) - padding).
// One block of kThreads owns kTileLines lines of one group, one tile of output
// pixels (`rows` x `cols`) and one image. It walks the group's sources in chunks
// of `chunk` channels: the chunk's input window (every value the tile's pixels
// read, zero padding included) is staged in shared memory (fp32 for fp16/bf16),
// then each warp scales shifted windows of the stage by its lines' kept entries
// of the chunk into register accumulators (kSlots pixels per lane and line).
// The input is read once per block for 16 lines, not once per kept weight; at
// any density the work is the kept weights' multiply-adds, no im2col buffer.
// A line's entries are [begin[l], end[l]) of the key array (the CSR half: begin
// = row_ptr, end = row_ptr + 1).
//
// grad_weight: one warp per kept weight and image range (split): the dot
// product of grad_y's plane with the shifted (strided) input plane over the
// valid pixels, lanes along the row, reduced by a fixed shuffle tree; the splits'
// sums go to a workspace [splits, nnz] that a last pass adds up in split order
// (deterministic) and scatters into the dense gradient.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace pyprune {
namespace sparse_conv_tiles {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLinesPerWarp = 2;
constexpr int kTileLines = kWarps * kLinesPerWarp;  // 16 lines per block
constexpr int kSlots = 8;                           // output pixels per lane and line
constexpr int kTilePixels = 32 * kSlots;            // 256 output pixels per block
constexpr int kEntryBatch = 32;                     // entries a warp loads at once (one per lane)
constexpr int64_t kStageBytes = 48 * 1024;          // the static shared-memory limit
// grad_weight: aim at this many warps in flight per SM (64 resident).
constexpr int64_t kWeightWarpsPerSM = 64;

struct DirectConvShape {
  int64_t N, S, IH, IW, L, OH, OW, groups, kh, kw, sh, sw, ph, pw, dh, dw;

  C10_HOST_DEVICE int64_t lines_per_group() const { return L / groups; }
  C10_HOST_DEVICE int64_t sources_per_group() const { return S / groups; }
  C10_HOST_DEVICE int64_t taps() const { return kh * kw; }
  C10_HOST_DEVICE int64_t keys() const { return S / groups * kh * kw; }  // entry keys per line
};

struct DirectConvPlan {
  int64_t rows, cols;              // output pixels of a tile
  int64_t stage_rows, stage_cols;  // the input window of a tile, per source channel
  int64_t chunk;                   // source channels staged at once; 0: one window does not fit
  int64_t tiles_h, tiles_w;        // pixel tiles
  int64_t line_tiles;              // line tiles per group

  C10_HOST_DEVICE int64_t window() const { return stage_rows * stage_cols; }
};

// Whole rows of output pixels per tile where they fit (a row wider than the
// tile is split into column tiles); chunks as large as `stage_elems` allows.
inline DirectConvPlan plan_direct_conv(const DirectConvShape& s, int64_t stage_elems) {
  DirectConvPlan p{};
  p.cols = std::min<int64_t>(s.OW, kTilePixels);
  p.rows = std::clamp<int64_t>(kTilePixels / p.cols, 1, s.OH);
  p.stage_rows = (p.rows - 1) * s.sh + (s.kh - 1) * s.dh + 1;
  p.stage_cols = (p.cols - 1) * s.sw + (s.kw - 1) * s.dw + 1;
  p.chunk = std::min<int64_t>(s.sources_per_group(), stage_elems / p.window());
  p.tiles_h = (s.OH + p.rows - 1) / p.rows;
  p.tiles_w = (s.OW + p.cols - 1) / p.cols;
  p.line_tiles = (s.lines_per_group() + kTileLines - 1) / kTileLines;
  return p;
}

// The output pixel (r, c) of the tile held by lane `lane` in slot j, and whether
// it is in the tile and the image (tile origin (oy0, ox0)).
C10_HOST_DEVICE inline bool slot_pixel(const DirectConvShape& s, const DirectConvPlan& p, int64_t oy0, int64_t ox0,
                                       int lane, int j, int64_t& r, int64_t& c) {
  const int64_t f = lane + 32 * j;
  r = f / p.cols;
  c = f - r * p.cols;
  return f < p.rows * p.cols && oy0 + r < s.OH && ox0 + c < s.OW;
}

// Where the slot's pixel reads tap (0, 0) of the chunk's first channel in the stage.
C10_HOST_DEVICE inline int64_t slot_base(const DirectConvShape& s, const DirectConvPlan& p, int64_t r, int64_t c) {
  return r * s.sh * p.stage_cols + c * s.sw;
}

// The stage offset of an entry of the chunk starting at source s0 (in the group).
C10_HOST_DEVICE inline int64_t entry_offset(const DirectConvShape& s, const DirectConvPlan& p, int64_t key,
                                            int64_t s0) {
  const int64_t taps = s.taps();
  const int64_t source = key / taps, t = key - source * taps;
  const int64_t ty = t / s.kw, tx = t - ty * s.kw;
  return ((source - s0) * p.stage_rows + ty * s.dh) * p.stage_cols + tx * s.dw;
}

// The stage element e (0 .. chunk * window - 1) of the chunk at s0: its source
// channel in the group (cc >= sources_per_group: past the group, zero) and
// input position for the tile at (oy0, ox0) (outside the image: zero padding).
C10_HOST_DEVICE inline void stage_element(const DirectConvShape& s, const DirectConvPlan& p, int64_t e, int64_t s0,
                                          int64_t oy0, int64_t ox0, int64_t& source, int64_t& iy, int64_t& ix) {
  const int64_t window = p.window();
  const int64_t cc = e / window, rest = e - cc * window;
  const int64_t sr = rest / p.stage_cols, sc = rest - sr * p.stage_cols;
  source = s0 + cc;
  iy = oy0 * s.sh - s.ph + sr;
  ix = ox0 * s.sw - s.pw + sc;
}

// The block's place: blockIdx.x = pixel tile, .y = group * line_tiles + line
// tile, .z = image. Line slot (warp, i) is the group's line first_line + warp *
// kLinesPerWarp + i.
C10_HOST_DEVICE inline void block_place(const DirectConvPlan& p, int64_t bx, int64_t by, int64_t& oy0, int64_t& ox0,
                                        int64_t& group, int64_t& first_line) {
  oy0 = (bx / p.tiles_w) * p.rows;
  ox0 = (bx % p.tiles_w) * p.cols;
  group = by / p.line_tiles;
  first_line = (by % p.line_tiles) * kTileLines;
}

// The line (absolute) of entry p: the last l with ptr[l] <= p (ptr[L] = nnz > p).
C10_HOST_DEVICE inline int64_t line_of_entry(const int64_t* ptr, int64_t L, int64_t p) {
  int64_t lo = 0, hi = L;  // ptr[lo] <= p < ptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ptr[mid] <= p) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// grad_weight's image splits: enough (entry, split) warps to fill the GPU,
// `per` images each (the last may have fewer).
struct WeightSplits {
  int64_t splits, per;
};

inline WeightSplits plan_weight_splits(int64_t nnz, int64_t N, int64_t sms) {
  const int64_t wanted = (kWeightWarpsPerSM * std::max<int64_t>(sms, 1) + std::max<int64_t>(nnz, 1) - 1) /
                         std::max<int64_t>(nnz, 1);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(N, 1));
  const int64_t per = (std::max<int64_t>(N, 1) + splits - 1) / splits;
  return {(std::max<int64_t>(N, 1) + per - 1) / per, per};
}

// The outputs [lo, hi) of one axis whose input o * stride + r is in [0, size).
C10_HOST_DEVICE inline void axis_window(int64_t r, int64_t stride, int64_t size, int64_t out, int64_t& lo,
                                        int64_t& hi) {
  lo = r < 0 ? (-r + stride - 1) / stride : 0;
  hi = r < size ? (size - 1 - r) / stride + 1 : 0;
  if (hi > out) hi = out;
  if (hi < lo) hi = lo;
}

// The pixels of grad_weight's dot product for a kept weight of key `key` (s
// describes the forward): output rows [oy_lo, oy_hi) and columns [ox_lo,
// ox_hi) whose input (oy * sh + ry, ox * sw + rx) is inside the image;
// `source` its input channel in the group.
struct TapWindow {
  int64_t source, ry, rx, oy_lo, oy_hi, ox_lo, ox_hi;
};

C10_HOST_DEVICE inline TapWindow tap_window(const DirectConvShape& s, int64_t key) {
  TapWindow t{};
  const int64_t taps = s.taps();
  t.source = key / taps;
  const int64_t tap = key - t.source * taps;
  t.ry = (tap / s.kw) * s.dh - s.ph;
  t.rx = (tap % s.kw) * s.dw - s.pw;
  axis_window(t.ry, s.sh, s.IH, s.OH, t.oy_lo, t.oy_hi);
  axis_window(t.rx, s.sw, s.IW, s.OW, t.ox_lo, t.ox_hi);
  return t;
}

}  // namespace sparse_conv_tiles
}  // namespace pyprune
