// CPU kernels of sparse_masked_conv2d: a direct sparse convolution forward and,
// for stride 1, its backward (grad_x as the same direct convolution over
// grad_y, grad_w at the kept positions only). Only the kept weights are read
// and multiplied: O(nnz * N * OH * OW) work instead of
// O(out * in/groups * kh * kw * N * OH * OW).
//
// Each kept weight (o, c, kh, kw) adds weight * a shifted input row to every
// output row of channel o. With each image zero-padded into a per-thread
// buffer (so no border tests in the inner loop; for strided convolutions split
// into its stride phases, so that the inputs of an output row are contiguous
// there too), an output row is computed in segments of up to 32
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
#include <pyprune/masked_nonfinite.h>
#include <pyprune/packed_mask.h>

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
// vector are stored (the rest read past the row: see PhaseImage's slack).
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
// one of 1-4 vectors for the rest (its last vector partly stored; 4 when the
// rest is 25-31 floats, e.g. a 28-wide row).
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
    case 3: return segment<scalar_t, R, 3>(o, out_step, last, init, in, row_step, off, vals, count);
    default: return segment<scalar_t, R, 4>(o, out_step, last, init, in, row_step, off, vals, count);
  }
}

// All output rows [OH, OW] of one channel from one padded image whose rows
// for consecutive output rows are row_step apart (any stride: see PhaseImage).
template <typename scalar_t>
C10_ALWAYS_INLINE void conv_channel_body(scalar_t* out, int64_t OH, int64_t OW, int64_t row_step, scalar_t init,
                                         const scalar_t* image, const int64_t* off, const scalar_t* vals,
                                         int64_t count) {
  int64_t oy = 0;
  for (; oy + 2 <= OH; oy += 2) {
    conv_rows_unit_stride<scalar_t, 2>(out + oy * OW, OW, OW, init, image + oy * row_step, row_step, off, vals,
                                       count);
  }
  if (oy < OH) {
    conv_rows_unit_stride<scalar_t, 1>(out + oy * OW, OW, OW, init, image + oy * row_step, row_step, off, vals,
                                       count);
  }
}

#define PYPRUNE_CONV_LOOPS(T)                                                                          \
  PYPRUNE_CPU_CLONES void conv_channel(T* out, int64_t OH, int64_t OW, int64_t row_step, T init,       \
                                       const T* image, const int64_t* off, const T* vals, int64_t count) { \
    conv_channel_body(out, OH, OW, row_step, init, image, off, vals, count);                           \
  }
PYPRUNE_CONV_LOOPS(float)
PYPRUNE_CONV_LOOPS(double)
#undef PYPRUNE_CONV_LOOPS

// One image zero-padded into a per-thread buffer (instead of padding the
// whole batch at once: a fresh batch-size buffer cost more page faults than the
// convolution at low density, and this one stays in L2 while the task's
// channels read it), with 32 values of slack at the end for the vector tails
// that read past a row.
//
// With stride (sh, sw) the padded image is stored split into its sh x sw
// phases: padded[c, y, x] at phase (y % sh, x % sw), row y / sh, column x / sw,
// each phase [Hq, Wq] = the padded size divided by the stride, rounded up. A
// strided convolution then reads each kept weight's inputs as contiguous
// rows (the same vector loop as stride 1) instead of every sw-th value. For
// stride 1 this is the plain padded image.
struct PhaseLayout {
  int64_t sh, sw, Hq, Wq;
  // used[py * sw + px]: whether some tap reads phase (py, px) (a 1x1 stride-2
  // convolution reads one of its four: the others are never filled)
  std::vector<char> used;

  // For an image [H, W] padded by (ph, pw), read by the taps (ty * dh, tx * dw)
  // of a kh x kw kernel with strides (sh, sw).
  PhaseLayout(int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t sh_, int64_t sw_, int64_t kh, int64_t kw,
              int64_t dh, int64_t dw)
      : sh(sh_), sw(sw_), Hq((H + 2 * ph + sh_ - 1) / sh_), Wq((W + 2 * pw + sw_ - 1) / sw_), used(sh_ * sw_, 0) {
    for (int64_t ty = 0; ty < kh; ++ty) {
      for (int64_t tx = 0; tx < kw; ++tx) used[(ty * dh % sh) * sw + tx * dw % sw] = 1;
    }
  }

  // Where padded[c, y, x] is stored.
  int64_t at(int64_t c, int64_t y, int64_t x) const {
    return ((c * sh + y % sh) * sw + x % sw) * Hq * Wq + (y / sh) * Wq + x / sw;
  }
  int64_t size(int64_t C) const { return C * sh * sw * Hq * Wq; }
};

template <typename scalar_t>
struct PhaseImage {
  std::vector<scalar_t> data;
  int64_t image = -1;

  const scalar_t* fill(const scalar_t* x, int64_t n, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw,
                       const PhaseLayout& l) {
    if (image == n) return data.data();
    data.assign(l.size(C) + 32, scalar_t(0));
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t y = h + ph;
        const scalar_t* src = x + ((n * C + c) * H + h) * W;
        if (l.sw == 1) {
          if (l.used[y % l.sh]) std::memcpy(data.data() + l.at(c, y, pw), src, W * sizeof(scalar_t));
          continue;
        }
        for (int64_t px = 0; px < l.sw; ++px) {  // padded columns x = px, px + sw, ...: one phase row
          if (!l.used[(y % l.sh) * l.sw + px]) continue;
          scalar_t* dst = data.data() + l.at(c, y, px);
          const int64_t first = pw + ((px - pw) % l.sw + l.sw) % l.sw;  // first input column in this phase
          for (int64_t x_pad = first, j = first / l.sw; x_pad < pw + W; x_pad += l.sw, ++j) dst[j] = src[x_pad - pw];
        }
      }
    }
    image = n;
    return data.data();
  }
};

// acc[e][k] += g[0:lanes) * x_planes[e][x_offset + 0:lanes), only in the lanes
// where *keep is nonzero if given. The other products are selected away, not
// multiplied by 0: an inf in a lane already summed would give 0 * inf = NaN.
template <typename scalar_t, int E>
C10_ALWAYS_INLINE void dot_vector(typename Vec32<scalar_t>::type (&acc)[E][2], int k, const scalar_t* g,
                                  const scalar_t* const* x_planes, int64_t x_offset,
                                  const typename Vec32<scalar_t>::type* keep) {
  using vec = typename Vec32<scalar_t>::type;
  vec gv;
  std::memcpy(&gv, g, sizeof(vec));
  for (int e = 0; e < E; ++e) {
    vec xv;
    std::memcpy(&xv, x_planes[e] + x_offset, sizeof(vec));
    const vec product = gv * xv;
    acc[e][k] += keep ? (*keep != 0 ? product : vec{}) : product;
  }
}

// The gradients of E kept weights with the same tap from one image, stride 1:
// sums[e] += the sum over the output positions whose input is inside the image
// (no padding copy) of gy_plane[oy, ox] * x_planes[e][oy + ry, ox + rx], where
// (ry, rx) = the tap offset minus the padding. Each grad_y vector is loaded
// once for the E weights (a dot product per weight needs two loads per
// multiply-add). Each weight's sum runs in the same order whatever E: two
// vector accumulators (even / odd vectors of a row). A row's last partial
// vector (55 of 56 columns for every tap off the centre column of a padded
// 3x3) is one more vector ending at the row's end, with grad_y zeroed in the
// lanes already summed (a scalar tail there measured ~1.1x slower overall).
template <typename scalar_t, int E>
C10_ALWAYS_INLINE void tap_dots_body(scalar_t* sums, const scalar_t* gy_plane, const scalar_t* const* x_planes,
                                     int64_t OH, int64_t OW, int64_t H, int64_t W, int64_t ry, int64_t rx) {
  using vec = typename Vec32<scalar_t>::type;
  constexpr int64_t lanes = 32 / sizeof(scalar_t);
  const int64_t oy0 = std::max<int64_t>(0, -ry), oy1 = std::min<int64_t>(OH, H - ry);
  const int64_t ox0 = std::max<int64_t>(0, -rx), ox1 = std::min<int64_t>(OW, W - rx);
  const int64_t len = ox1 - ox0;
  const int64_t full = len / lanes * lanes, rem = len - full;
  // 1 in the lanes of the last vector [len - lanes, len) not yet summed
  vec fresh;
  for (int64_t k = 0; k < lanes; ++k) fresh[k] = k >= lanes - rem ? scalar_t(1) : scalar_t(0);
  const bool overlap_tail = rem > 0 && full > 0;
  vec acc[E][2] = {};
  scalar_t tail[E] = {};
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const scalar_t* g = gy_plane + oy * OW + ox0;
    const int64_t x_offset = (oy + ry) * W + ox0 + rx;
    // vector pairs (the accumulator of each vector fixed at compile time, so
    // all stay in registers: a parity computed per vector spilled them)
    int64_t i = 0;
    for (; i + 2 * lanes <= full; i += 2 * lanes) {
      vec g0, g1;
      std::memcpy(&g0, g + i, sizeof(vec));
      std::memcpy(&g1, g + i + lanes, sizeof(vec));
      for (int e = 0; e < E; ++e) {
        vec x0, x1;
        std::memcpy(&x0, x_planes[e] + x_offset + i, sizeof(vec));
        std::memcpy(&x1, x_planes[e] + x_offset + i + lanes, sizeof(vec));
        acc[e][0] += g0 * x0;
        acc[e][1] += g1 * x1;
      }
    }
    if (i < full) dot_vector<scalar_t, E>(acc, 0, g + i, x_planes, x_offset + i, nullptr);
    if (overlap_tail) {
      dot_vector<scalar_t, E>(acc, 1, g + len - lanes, x_planes, x_offset + len - lanes, &fresh);
    } else {  // rows narrower than one vector
      for (int64_t i = full; i < len; ++i) {
        for (int e = 0; e < E; ++e) tail[e] += g[i] * x_planes[e][x_offset + i];
      }
    }
  }
  for (int e = 0; e < E; ++e) {
    const vec both = acc[e][0] + acc[e][1];
    scalar_t total = tail[e];
    for (int64_t k = 0; k < lanes; ++k) total += both[k];
    sums[e] += total;
  }
}

#define PYPRUNE_CONV_DOTS(T)                                                                           \
  PYPRUNE_CPU_CLONES void tap_dots(T* sums, int E, const T* gy_plane, const T* const* x_planes,          \
                                   int64_t OH, int64_t OW, int64_t H, int64_t W, int64_t ry, int64_t rx) { \
    if (E == 4) return tap_dots_body<T, 4>(sums, gy_plane, x_planes, OH, OW, H, W, ry, rx);            \
    if (E == 3) return tap_dots_body<T, 3>(sums, gy_plane, x_planes, OH, OW, H, W, ry, rx);            \
    if (E == 2) return tap_dots_body<T, 2>(sums, gy_plane, x_planes, OH, OW, H, W, ry, rx);            \
    tap_dots_body<T, 1>(sums, gy_plane, x_planes, OH, OW, H, W, ry, rx);                               \
  }
PYPRUNE_CONV_DOTS(float)
PYPRUNE_CONV_DOTS(double)
#undef PYPRUNE_CONV_DOTS

// The layer: x [N, C, H, W] -> y [N, O, OH, OW], weight [O, C/groups, kh, kw]
// packed as CSR over [O, K = C/groups * kh * kw].
struct ConvGeometry {
  int64_t N, C, H, W, O, K, kh, kw, groups;
  int64_t ph, pw, sh, sw, dh, dw;
  int64_t OH, OW;

  ConvGeometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups_)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), O(weight.size(0)),
        K(weight.numel() / std::max<int64_t>(weight.size(0), 1)), kh(weight.size(2)), kw(weight.size(3)),
        groups(groups_), ph(padding[0]), pw(padding[1]), sh(stride[0]), sw(stride[1]), dh(dilation[0]),
        dw(dilation[1]) {
    OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
    OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
    // A stride that leaves one output row (column) plays no part: stride 1
    // reads the same inputs without a phase split per stride step (a huge
    // stride would otherwise size the phase layout by stride^2).
    if (OH == 1) sh = 1;
    if (OW == 1) sw = 1;
  }
};

// Calls visit(o, p, c, ty, tx) for every kept weight (CSR entry p of output
// channel o: input channel c, tap (ty, tx)), channels in order. Returns false
// at the first channel that fails packed_line_ok (ptr entries out of order,
// indices outside [0, K) or not increasing).
template <typename Visit>
bool for_each_kept(const ConvGeometry& g, const int64_t* ptr, const int64_t* idx, int64_t nnz, const Visit& visit) {
  const int64_t per_group = g.O / g.groups, c_per_group = g.C / g.groups;
  for (int64_t o = 0; o < g.O; ++o) {
    if (!packed_line_ok(ptr, idx, o, nnz, g.K)) return false;
    const int64_t c_base = (o / per_group) * c_per_group;
    for (int64_t p = ptr[o]; p < ptr[o + 1]; ++p) {
      const int64_t k = idx[p];
      visit(o, p, c_base + k / (g.kh * g.kw), (k / g.kw) % g.kh, k % g.kw);
    }
  }
  return true;
}

// The kept weights of a direct convolution by output channel: channel j's are
// entries [ptr[j], ptr[j + 1]), each a value and the offset of its input
// element for output (0, 0) in the padded input image.
template <typename scalar_t>
struct Entries {
  std::vector<int64_t> ptr, off;
  std::vector<scalar_t> vals;
};

// A direct convolution: in [N, Cin, H, W], zero-padded by (ph, pw) on the fly
// (PhaseImage), -> out [N, Cout, OH, OW] with strides (sh, sw).
struct DirectConv {
  int64_t N, Cin, H, W, ph, pw, Cout, OH, OW, sh, sw, kh, kw, dh, dw;

  PhaseLayout layout() const { return PhaseLayout(H, W, ph, pw, sh, sw, kh, kw, dh, dw); }
};

// Tasks are (image, output channel) pairs in that order, so a thread works
// through the output channels of one image while its padded input stays in
// L2. Every output value is summed by one task in entry order: the same bits
// whatever the thread count.
template <typename scalar_t>
void direct_conv(scalar_t* out, const scalar_t* in, const DirectConv& d, const Entries<scalar_t>& e,
                 const scalar_t* bias) {
  const PhaseLayout layout = d.layout();
  // One (image, channel) task is OH * OW * nnz / Cout multiply-adds: group a few.
  const int64_t per_channel = static_cast<int64_t>(e.vals.size()) / std::max<int64_t>(d.Cout, 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d.OH * d.OW * per_channel));
  at::parallel_for(0, d.N * d.Cout, grain, [&](int64_t begin, int64_t end) {
    PhaseImage<scalar_t> padded;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / d.Cout, j = task % d.Cout;
      const scalar_t* image = padded.fill(in, n, d.Cin, d.H, d.W, d.ph, d.pw, layout);
      conv_channel(out + task * d.OH * d.OW, d.OH, d.OW, layout.Wq, bias ? bias[j] : scalar_t(0), image,
                   e.off.data() + e.ptr[j], e.vals.data() + e.ptr[j], e.ptr[j + 1] - e.ptr[j]);
    }
  });
}

void check_cpu_sparse_conv_dtype(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": the CPU sparse path supports float32 and float64, got ", weight.scalar_type());
}

at::Tensor sparse_masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                                    const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  const char* op = "sparse_masked_conv2d";
  check_sparse_conv2d_args(op, x, weight, row_ptr, col_idx, bias, stride, padding, dilation, groups);
  check_cpu_sparse_conv_dtype(op, weight);
  check_packed_ends(op, filters_2d(weight), row_ptr, col_idx, /*rows_first=*/true);
  const ConvGeometry g(x, weight, stride, padding, dilation, groups);
  at::Tensor y = at::empty({g.N, g.O, g.OH, g.OW}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_conv2d_cpu", [&] {
    const DirectConv conv{g.N, g.C, g.H, g.W, g.ph, g.pw, g.O, g.OH, g.OW, g.sh, g.sw, g.kh, g.kw, g.dh, g.dw};
    const PhaseLayout layout = conv.layout();
    const scalar_t* wd = w.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    Entries<scalar_t> e;
    e.ptr.assign(ptr.const_data_ptr<int64_t>(), ptr.const_data_ptr<int64_t>() + g.O + 1);
    e.off.resize(idx.numel());
    e.vals.resize(idx.numel());
    ok = for_each_kept(g, e.ptr.data(), ix, idx.numel(), [&](int64_t o, int64_t p, int64_t c, int64_t ty, int64_t tx) {
      e.off[p] = layout.at(c, ty * g.dh, tx * g.dw);  // the input of output (0, 0)
      e.vals[p] = wd[o * g.K + ix[p]];
    });
    if (!ok) return;
    direct_conv(y.data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), conv, e,
                b.defined() ? b.const_data_ptr<scalar_t>() : nullptr);
  });
  check_packed_lines_ok(op, ok, row_ptr, col_idx, g.K, /*rows_first=*/true);
  nonfinite_like_dense_conv2d(y, x, weight, row_ptr, col_idx, stride, padding, dilation, groups);
  return y;
}

// The sparse backward needs stride 1 and padding <= dilation * (kernel - 1)
// (then grad_x is a stride-1 convolution of grad_y padded by the difference).
void check_sparse_backward_geometry(const char* op, const ConvGeometry& g) {
  TORCH_CHECK(g.sh == 1 && g.sw == 1 && g.ph <= g.dh * (g.kh - 1) && g.pw <= g.dw * (g.kw - 1), op,
              ": needs stride 1 and padding <= dilation * (kernel - 1) (the autograd formula uses the dense "
              "backward otherwise)");
}

// The arguments of both gradient ops, checked; the layer's geometry.
ConvGeometry checked_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride) {
  check_sparse_conv2d_args(op, x, weight, row_ptr, col_idx, std::nullopt, stride, padding, dilation, groups);
  check_cpu_sparse_conv_dtype(op, weight);
  check_packed_ends(op, filters_2d(weight), row_ptr, col_idx, /*rows_first=*/true);
  TORCH_CHECK(stride[0] == 1 && stride[1] == 1, op,
              ": needs stride 1 and padding <= dilation * (kernel - 1) on the CPU (the autograd formula uses the "
              "dense backward otherwise)");
  const ConvGeometry g(x, weight, {1, 1}, padding, dilation, groups);
  check_sparse_backward_geometry(op, g);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({g.N, g.O, g.OH, g.OW}) && grad_y.scalar_type() == x.scalar_type(),
              op, ": grad_y must be [", g.N, ", ", g.O, ", ", g.OH, ", ", g.OW, "] of x's dtype, got ", grad_y.sizes());
  return g;
}

// grad_x = the transposed convolution: a direct convolution of grad_y padded by
// dilation * (kernel - 1) - padding, whose output channels are the layer's
// input channels, each with the kept weights that read it, taps mirrored.
at::Tensor sparse_conv2d_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        at::IntArrayRef stride) {
  const char* op = "sparse_masked_conv2d_grad_input";
  const ConvGeometry g =
      checked_backward(op, grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups, stride);
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (gx.numel() == 0) return gx;
  const at::Tensor gy = grad_y.contiguous(), w = weight.contiguous();
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_conv2d_grad_input_cpu", [&] {
    const int64_t qh = g.dh * (g.kh - 1) - g.ph, qw = g.dw * (g.kw - 1) - g.pw;  // grad_y's padding
    const DirectConv conv{g.N, g.O, g.OH, g.OW, qh, qw, g.C, g.H, g.W, 1, 1, g.kh, g.kw, g.dh, g.dw};
    const PhaseLayout layout = conv.layout();
    const scalar_t* wd = w.const_data_ptr<scalar_t>();
    const int64_t* p = ptr.const_data_ptr<int64_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    // Counting sort of the kept weights by input channel (output channels in
    // ascending order within each): a fixed order, hence fixed sums.
    Entries<scalar_t> e;
    e.ptr.assign(g.C + 1, 0);
    ok = for_each_kept(g, p, ix, idx.numel(), [&](int64_t, int64_t, int64_t c, int64_t, int64_t) { ++e.ptr[c + 1]; });
    if (!ok) return;
    for (int64_t c = 0; c < g.C; ++c) e.ptr[c + 1] += e.ptr[c];
    e.off.resize(idx.numel());
    e.vals.resize(idx.numel());
    std::vector<int64_t> cursor(e.ptr.begin(), e.ptr.end() - 1);
    for_each_kept(g, p, ix, idx.numel(), [&](int64_t o, int64_t q, int64_t c, int64_t ty, int64_t tx) {
      const int64_t at = cursor[c]++;
      e.off[at] = layout.at(o, g.dh * (g.kh - 1 - ty), g.dw * (g.kw - 1 - tx));
      e.vals[at] = wd[o * g.K + ix[q]];
    });
    direct_conv(gx.data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), conv, e, static_cast<const scalar_t*>(nullptr));
  });
  check_packed_lines_ok(op, ok, row_ptr, col_idx, g.K, /*rows_first=*/true);
  nonfinite_like_dense_conv2d_grad_input(gx, grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups,
                                         {1, 1});
  return gx;
}

// Up to 4 kept weights of one output channel with the same tap, as CSR entry
// numbers; they share tap_dots' grad_y loads.
struct TapGroup {
  int64_t count, ry, rx;
  int64_t entry[4];
};

// grad_w at the kept positions (exactly 0 elsewhere): for each kept weight,
// the sum over images of its tap_dots term (stride 1). The kept weights of an
// output channel are grouped by tap, up to 4 at a time. Each thread takes a
// block of output channels and walks the images in order, so an image's input
// and its gradient planes are read while in cache; every weight's sum runs
// over the images in order whatever the blocks and groups.
at::Tensor sparse_conv2d_grad_weight_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                         at::IntArrayRef stride) {
  const char* op = "sparse_masked_conv2d_grad_weight";
  const ConvGeometry g =
      checked_backward(op, grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups, stride);
  at::Tensor gw = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  const at::Tensor gy = grad_y.contiguous(), xc = x.contiguous();
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  // Per entry: its input channel and tap; then per output channel, its entries
  // grouped by tap (taps in order, entries in order within a tap).
  std::vector<int64_t> plane(idx.numel()), tap(idx.numel());
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  const bool ok = for_each_kept(g, p, ix, idx.numel(), [&](int64_t, int64_t q, int64_t c, int64_t ty, int64_t tx) {
    plane[q] = c;
    tap[q] = ty * g.kw + tx;
  });
  check_packed_lines_ok(op, ok, row_ptr, col_idx, g.K, /*rows_first=*/true);
  std::vector<TapGroup> tap_groups;
  std::vector<int64_t> group_ptr(g.O + 1, 0);
  std::vector<std::vector<int64_t>> by_tap(g.kh * g.kw);
  for (int64_t o = 0; o < g.O; ++o) {
    for (auto& bucket : by_tap) bucket.clear();
    for (int64_t q = p[o]; q < p[o + 1]; ++q) by_tap[tap[q]].push_back(q);
    for (int64_t t = 0; t < g.kh * g.kw; ++t) {
      for (size_t i = 0; i < by_tap[t].size(); i += 4) {
        TapGroup group{std::min<int64_t>(4, by_tap[t].size() - i), (t / g.kw) * g.dh - g.ph, (t % g.kw) * g.dw - g.pw, {}};
        for (int64_t e = 0; e < group.count; ++e) group.entry[e] = by_tap[t][i + e];
        tap_groups.push_back(group);
      }
    }
    group_ptr[o + 1] = tap_groups.size();
  }
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_conv2d_grad_weight_cpu", [&] {
    const scalar_t* gyd = gy.const_data_ptr<scalar_t>();
    const scalar_t* xd = xc.const_data_ptr<scalar_t>();
    scalar_t* gwd = gw.data_ptr<scalar_t>();
    at::parallel_for(0, g.O, 1, [&](int64_t o0, int64_t o1) {
      std::vector<scalar_t> sums(4 * (group_ptr[o1] - group_ptr[o0]), scalar_t(0));
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t o = o0; o < o1; ++o) {
          const scalar_t* gy_plane = gyd + (n * g.O + o) * g.OH * g.OW;
          for (int64_t k = group_ptr[o]; k < group_ptr[o + 1]; ++k) {
            const TapGroup& group = tap_groups[k];
            const scalar_t* x_planes[4];
            for (int64_t e = 0; e < group.count; ++e) x_planes[e] = xd + (n * g.C + plane[group.entry[e]]) * g.H * g.W;
            tap_dots(sums.data() + 4 * (k - group_ptr[o0]), group.count, gy_plane, x_planes, g.OH, g.OW, g.H, g.W,
                     group.ry, group.rx);
          }
        }
      }
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t k = group_ptr[o]; k < group_ptr[o + 1]; ++k) {
          for (int64_t e = 0; e < tap_groups[k].count; ++e) {
            gwd[o * g.K + ix[tap_groups[k].entry[e]]] = sums[4 * (k - group_ptr[o0]) + e];
          }
        }
      }
    });
  });
  nonfinite_like_dense_conv2d_grad_weight(gw, grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups,
                                          {1, 1});
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("sparse_masked_conv2d", &sparse_masked_conv2d_cpu);
  m.impl("sparse_masked_conv2d_grad_input", &sparse_conv2d_grad_input_cpu);
  m.impl("sparse_masked_conv2d_grad_weight", &sparse_conv2d_grad_weight_cpu);
}

}  // namespace pyprune
