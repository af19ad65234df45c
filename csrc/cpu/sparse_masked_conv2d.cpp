// CPU kernel of sparse_masked_conv2d's forward: a direct sparse convolution.
// Only the kept weights are read and multiplied: O(nnz * N * OH * OW) work
// instead of O(out * in/groups * kh * kw * N * OH * OW).
//
// Each kept weight (o, c, kh, kw) adds weight * a shifted input row to every
// output row of channel o. With the input zero-padded once (so no border
// tests in the inner loop), an output row is computed in segments of up to 32
// floats (16 doubles) whose sums stay in registers across all kept weights of
// the channel: one vector load and one FMA per kept weight and vector, no
// store until the segment is done. No im2col buffer: for a 3x3 convolution it
// would be 9x the input, at every density.
//
// Tasks are (image, output channel) pairs in that order, so a thread works
// through the output channels of one image while its padded input stays in
// L2. Every output value is summed by one task in CSR order: the same bits
// whatever the thread count.
#include <pyprune/cpu_clones.h>
#include <pyprune/cpu_vec.h>
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace pyprune {
namespace {

// R output rows (row_step apart in the input) of a segment of V vectors:
// out[r * out_step + 0:V*lanes) = init + sum over e < count of
// vals[e] * row[r * row_step + off[e] + 0:V*lanes) (stride 1: the shifted input
// is contiguous). R * V independent sums keep the FMA units busy; each kept
// value is broadcast once for all of them. Only `valid` values of the last
// vector are stored (the rest read past the row: see PaddedImage's slack).
template <typename scalar_t, int R, int V>
C10_ALWAYS_INLINE void segment(scalar_t* __restrict out, int64_t out_step, int64_t valid, scalar_t init,
                               const scalar_t* __restrict row, int64_t row_step, const int64_t* off,
                               const scalar_t* vals, int64_t count) {
  using vec = typename Vec32<scalar_t>::type;
  constexpr int64_t lanes = 32 / sizeof(scalar_t);
  vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vec{} + init;
  for (int64_t e = 0; e < count; ++e) {
    const scalar_t value = vals[e];
    for (int r = 0; r < R; ++r) {
      const scalar_t* src = row + r * row_step + off[e];
      for (int v = 0; v < V; ++v) {
        vec x;
        std::memcpy(&x, src + v * lanes, sizeof(vec));
        acc[r][v] += value * x;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v + 1 < V; ++v) std::memcpy(out + r * out_step + v * lanes, &acc[r][v], sizeof(vec));
    std::memcpy(out + r * out_step + (V - 1) * lanes, &acc[r][V - 1], valid * sizeof(scalar_t));
  }
}

// R output rows [width] of one channel, stride 1: segments of 4 vectors, then
// one of 1-3 vectors for the rest (its last vector partly stored).
template <typename scalar_t, int R>
C10_ALWAYS_INLINE void conv_rows_unit_stride(scalar_t* out, int64_t out_step, int64_t width, scalar_t init,
                                             const scalar_t* row, int64_t row_step, const int64_t* off,
                                             const scalar_t* vals, int64_t count) {
  constexpr int64_t lanes = 32 / sizeof(scalar_t);
  int64_t ox = 0;
  for (; ox + 4 * lanes <= width; ox += 4 * lanes) {
    segment<scalar_t, R, 4>(out + ox, out_step, lanes, init, row + ox, row_step, off, vals, count);
  }
  const int64_t rest = width - ox;
  if (rest == 0) return;
  const int64_t last = rest - (rest - 1) / lanes * lanes;  // values stored of the last vector, 1..lanes
  scalar_t* o = out + ox;
  const scalar_t* in = row + ox;
  switch ((rest + lanes - 1) / lanes) {
    case 1: return segment<scalar_t, R, 1>(o, out_step, last, init, in, row_step, off, vals, count);
    case 2: return segment<scalar_t, R, 2>(o, out_step, last, init, in, row_step, off, vals, count);
    default: return segment<scalar_t, R, 3>(o, out_step, last, init, in, row_step, off, vals, count);
  }
}

// One output row of one channel, any stride (the input is not contiguous):
// out[ox] = init + sum over e of vals[e] * row[off[e] + ox * stride].
template <typename scalar_t>
C10_ALWAYS_INLINE void conv_row_strided(scalar_t* out, int64_t width, int64_t stride, scalar_t init,
                                        const scalar_t* row, const int64_t* off, const scalar_t* vals,
                                        int64_t count) {
  for (int64_t ox = 0; ox < width; ++ox) out[ox] = init;
  for (int64_t e = 0; e < count; ++e) {
    const scalar_t* src = row + off[e];
    for (int64_t ox = 0; ox < width; ++ox) out[ox] += vals[e] * src[ox * stride];
  }
}

// All output rows [OH, OW] of one channel from one padded image.
template <typename scalar_t>
C10_ALWAYS_INLINE void conv_channel_body(scalar_t* out, int64_t OH, int64_t OW, int64_t sh, int64_t sw,
                                         int64_t Wp, scalar_t init, const scalar_t* image, const int64_t* off,
                                         const scalar_t* vals, int64_t count) {
  if (sw != 1) {
    for (int64_t oy = 0; oy < OH; ++oy) {
      conv_row_strided(out + oy * OW, OW, sw, init, image + oy * sh * Wp, off, vals, count);
    }
    return;
  }
  int64_t oy = 0;
  for (; oy + 2 <= OH; oy += 2) {
    conv_rows_unit_stride<scalar_t, 2>(out + oy * OW, OW, OW, init, image + oy * sh * Wp, sh * Wp, off, vals, count);
  }
  if (oy < OH) {
    conv_rows_unit_stride<scalar_t, 1>(out + oy * OW, OW, OW, init, image + oy * sh * Wp, sh * Wp, off, vals, count);
  }
}

#define PYPRUNE_CONV_LOOPS(T)                                                                          \
  PYPRUNE_CPU_CLONES void conv_channel(T* out, int64_t OH, int64_t OW, int64_t sh, int64_t sw,         \
                                       int64_t Wp, T init, const T* image, const int64_t* off,         \
                                       const T* vals, int64_t count) {                                 \
    conv_channel_body(out, OH, OW, sh, sw, Wp, init, image, off, vals, count);                         \
  }
PYPRUNE_CONV_LOOPS(float)
PYPRUNE_CONV_LOOPS(double)
#undef PYPRUNE_CONV_LOOPS

struct ConvGeometry {
  int64_t N, C, O, K, kh, kw, groups;
  int64_t Hp, Wp, OH, OW;  // padded input, output
  int64_t sh, sw, dh, dw;
};

// Per kept weight (CSR entry p of output channel o): its value and the offset
// of its input element for output (0, 0) in the padded image. Returns false at
// the first channel whose ptr entries are out of order or whose indices are
// outside [0, K).
// One image zero-padded into a per-thread buffer (instead of padding the
// whole batch at once: a fresh batch-size buffer cost more page faults than the
// convolution at low density, and this one stays in L2 while the task's
// channels read it), with 32 values of slack at the end for the vector tails
// that read past a row.
template <typename scalar_t>
struct PaddedImage {
  std::vector<scalar_t> data;
  int64_t image = -1;

  const scalar_t* fill(const scalar_t* x, int64_t n, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw) {
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
    if (image != n) {
      data.assign(C * Hp * Wp + 32, scalar_t(0));
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t h = 0; h < H; ++h) {
          std::memcpy(data.data() + (c * Hp + h + ph) * Wp + pw, x + ((n * C + c) * H + h) * W, W * sizeof(scalar_t));
        }
      }
      image = n;
    }
    return data.data();
  }
};

template <typename scalar_t>
bool entry_offsets(std::vector<int64_t>& off, std::vector<scalar_t>& vals, const ConvGeometry& g,
                   const int64_t* ptr, const int64_t* idx, int64_t nnz, const scalar_t* w) {
  off.resize(nnz);
  vals.resize(nnz);
  const int64_t per_group = g.O / g.groups, c_per_group = g.C / g.groups;
  for (int64_t o = 0; o < g.O; ++o) {
    const int64_t p0 = ptr[o], p1 = ptr[o + 1];
    if (p0 < 0 || p1 < p0 || p1 > nnz) return false;
    const int64_t c_base = (o / per_group) * c_per_group;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k = idx[p];
      if (k < 0 || k >= g.K) return false;
      const int64_t c = c_base + k / (g.kh * g.kw), y = (k / g.kw) % g.kh, x = k % g.kw;
      off[p] = (c * g.Hp + y * g.dh) * g.Wp + x * g.dw;
      vals[p] = w[o * g.K + k];
    }
  }
  return true;
}

at::Tensor sparse_masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                                    const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  const char* op = "sparse_masked_conv2d";
  check_sparse_conv2d_args(op, x, weight, row_ptr, col_idx, bias, stride, padding, dilation, groups);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": the CPU sparse path supports float32 and float64, got ", weight.scalar_type());
  const at::Tensor w2d = weight.reshape({weight.size(0), -1});
  check_packed_ends(op, w2d, row_ptr, col_idx, /*rows_first=*/true);

  ConvGeometry g{};
  g.N = x.size(0), g.C = x.size(1), g.O = weight.size(0), g.K = w2d.size(1);
  g.kh = weight.size(2), g.kw = weight.size(3), g.groups = groups;
  g.sh = stride[0], g.sw = stride[1], g.dh = dilation[0], g.dw = dilation[1];
  g.Hp = x.size(2) + 2 * padding[0], g.Wp = x.size(3) + 2 * padding[1];
  g.OH = (g.Hp - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.Wp - g.dw * (g.kw - 1) - 1) / g.sw + 1;

  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({g.N, g.O, g.OH, g.OW}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  bool in_range = true;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_conv2d_cpu", [&] {
    std::vector<int64_t> off;
    std::vector<scalar_t> vals;
    in_range = entry_offsets(off, vals, g, ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(),
                             idx.numel(), w2d.contiguous().const_data_ptr<scalar_t>());
    if (!in_range) return;
    const int64_t* p = ptr.const_data_ptr<int64_t>();
    const scalar_t* bias_data = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* x_data = xc.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    // One (image, channel) task is OH * OW * nnz / O multiply-adds: group a few.
    const int64_t work_per_task = std::max<int64_t>(1, g.OH * g.OW * (idx.numel() / std::max<int64_t>(g.O, 1)));
    const int64_t grain = std::max<int64_t>(1, 16384 / work_per_task);
    at::parallel_for(0, g.N * g.O, grain, [&](int64_t begin, int64_t end) {
      PaddedImage<scalar_t> padded;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / g.O, o = task % g.O;
        const scalar_t* image = padded.fill(x_data, n, g.C, x.size(2), x.size(3), padding[0], padding[1]);
        conv_channel(y_data + task * g.OH * g.OW, g.OH, g.OW, g.sh, g.sw, g.Wp,
                     bias_data ? bias_data[o] : scalar_t(0), image, off.data() + p[o], vals.data() + p[o],
                     p[o + 1] - p[o]);
      }
    });
  });
  TORCH_CHECK(in_range, op, ": the packed mask has entries outside their range: row_ptr must be non-decreasing "
              "and every col_idx entry in [0, ", g.K, ") (was it built by mask_pack(mask.view(out, -1)) for "
              "this layer?)");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("sparse_masked_conv2d", &sparse_masked_conv2d_cpu);
}

}  // namespace pyprune
