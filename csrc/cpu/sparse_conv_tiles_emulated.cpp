// The CUDA sparse convolution kernels' tiled scheme (pyprune/sparse_conv_tiles.h)
// emulated on the CPU, block by block, warp by warp and lane by lane, with the
// same index functions, so that the CPU tests check the decomposition the GPU
// runs: tiles, chunks of staged sources, the 32-entry walks, grad_input's
// phases and transposed entries, grad_weight's splits. Tests only (ops
// pyprune::_sparse_conv2d_*_tiles_emulated); slow by design.
#include <pyprune/masked.h>
#include <pyprune/packed_mask.h>
#include <pyprune/sparse_conv_tiles.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace pyprune {
namespace {

namespace sct = sparse_conv_tiles;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One block of direct_conv_kernel (csrc/cuda/sparse_masked_conv2d.cu).
template <typename scalar_t, bool kByEntry>
void emulate_block(scalar_t* dst, const scalar_t* src, const scalar_t* values, const int64_t* begins,
                   const int64_t* ends, const int64_t* keys, int64_t nnz, const scalar_t* bias, const sct::DirectConvShape& s,
                   const sct::DirectConvPlan& p, int64_t bx, int64_t by, int64_t n, std::vector<acc_type_t<scalar_t>>& stage) {
  using acc_t = acc_type_t<scalar_t>;
  int64_t oy0, ox0, group, first_line;
  sct::block_place(p, bx, by, oy0, ox0, group, first_line);
  const int64_t lpg = s.lines_per_group(), spg = s.sources_per_group(), taps = s.taps(), keys_per_line = s.keys();
  std::vector<int64_t> base(32 * sct::kSlots);
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < sct::kSlots; ++j) {
      int64_t r, c;
      base[lane * sct::kSlots + j] = sct::slot_pixel(s, p, oy0, ox0, lane, j, r, c) ? sct::slot_base(s, p, r, c) : 0;
    }
  }
  for (int warp = 0; warp < sct::kWarps; ++warp) {
    for (int i = 0; i < sct::kLinesPerWarp; ++i) {
      const int64_t l = first_line + warp * sct::kLinesPerWarp + i;
      if (l >= lpg) continue;
      const int64_t line = group * lpg + l;
      const int64_t begin = begins[line], end = ends[line];
      TORCH_CHECK(begin >= 0 && begin <= end && end <= nnz, "emulated: bad line bounds");
      std::vector<acc_t> acc(32 * sct::kSlots, acc_t(0));
      int64_t next = begin;
      // the chunks in order (the GPU stages each once for all its warps;
      // restaging per line here gives the same values)
      for (int64_t s0 = 0; s0 < spg; s0 += p.chunk) {
        const int64_t count = p.chunk * p.window();
        for (int64_t e = 0; e < count; ++e) {
          int64_t source, iy, ix;
          sct::stage_element(s, p, e, s0, oy0, ox0, source, iy, ix);
          const bool inside = source < spg && iy >= 0 && iy < s.IH && ix >= 0 && ix < s.IW;
          stage[e] = inside ? static_cast<acc_t>(src[((n * s.S + group * spg + source) * s.IH + iy) * s.IW + ix])
                            : acc_t(0);
        }
        const int64_t key_end = (s0 + p.chunk) * taps;
        while (next < end) {
          int64_t offset[32] = {};
          acc_t v[32] = {};
          bool in[32] = {};
          int count_in = 0;
          for (int lane = 0; lane < 32; ++lane) {
            const int64_t q = next + lane;
            if (q >= end) continue;
            const int64_t key = keys[q];
            TORCH_CHECK(key >= 0 && key < keys_per_line && (q == begin || keys[q - 1] < key),
                        "emulated: entry ", q, " is out of range or out of order");
            in[lane] = key < key_end;
            if (!in[lane]) continue;
            TORCH_CHECK(key >= s0 * taps, "emulated: entry ", q, " was skipped");
            offset[lane] = sct::entry_offset(s, p, key, s0);
            v[lane] = static_cast<acc_t>(kByEntry ? values[q] : values[line * keys_per_line + key]);
          }
          for (int lane = 0; lane < 32; ++lane) {
            TORCH_CHECK(!in[lane] || lane == count_in, "emulated: the chunk's entries are not a prefix");
            count_in += in[lane];
          }
          for (int t = 0; t < count_in; ++t) {
            for (int lane = 0; lane < 32; ++lane) {
              for (int j = 0; j < sct::kSlots; ++j) {
                const int64_t at = base[lane * sct::kSlots + j] + offset[t];
                TORCH_CHECK(at >= 0 && at < count, "emulated: a stage read out of bounds");
                acc[lane * sct::kSlots + j] += v[t] * stage[at];
              }
            }
          }
          next += count_in;
          if (count_in < sct::kEntryBatch) break;
        }
      }
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[line]) : acc_t(0);
      for (int lane = 0; lane < 32; ++lane) {
        for (int j = 0; j < sct::kSlots; ++j) {
          int64_t r, c;
          if (!sct::slot_pixel(s, p, oy0, ox0, lane, j, r, c)) continue;
          dst[((n * s.L + line) * s.OH + oy0 + r) * s.OW + ox0 + c] =
              static_cast<scalar_t>(acc[lane * sct::kSlots + j] + b);
        }
      }
    }
  }
}

template <typename scalar_t, bool kByEntry>
void emulate_direct_conv(at::Tensor& dst, const at::Tensor& src, const at::Tensor& values, const at::Tensor& begins,
                         const at::Tensor& ends, const at::Tensor& keys, const scalar_t* bias,
                         const sct::DirectConvShape& s, int64_t stage_bytes) {
  using acc_t = acc_type_t<scalar_t>;
  const sct::DirectConvPlan p = sct::plan_direct_conv(s, stage_bytes / static_cast<int64_t>(sizeof(acc_t)));
  TORCH_CHECK(p.chunk >= 1, "emulated: one tile's input window (", p.window(), " values) does not fit in ",
              stage_bytes, " bytes (the CUDA op takes the dense-masked convolution then)");
  std::vector<acc_t> stage(p.chunk * p.window());
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t by = 0; by < s.groups * p.line_tiles; ++by) {
      for (int64_t bx = 0; bx < p.tiles_h * p.tiles_w; ++bx) {
        emulate_block<scalar_t, kByEntry>(dst.data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(),
                                          values.const_data_ptr<scalar_t>(), begins.const_data_ptr<int64_t>(),
                                          ends.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(), keys.numel(),
                                          bias, s, p, bx, by, n, stage);
      }
    }
  }
}

sct::DirectConvShape forward_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t OH = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t OW = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  return {x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), OH, OW, groups, kh, kw,
          stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
}

at::Tensor conv2d_emulated(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t stage_bytes) {
  check_sparse_conv2d_args("_sparse_conv2d_tiles_emulated", x, weight, row_ptr, col_idx, bias, stride, padding,
                           dilation, groups);
  const sct::DirectConvShape s = forward_shape(x, weight, stride, padding, dilation, groups);
  at::Tensor y = at::zeros({s.N, s.L, s.OH, s.OW}, x.options());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "_sparse_conv2d_tiles_emulated", [&] {
    const at::Tensor ptr = row_ptr.contiguous();
    emulate_direct_conv<scalar_t, false>(y, x.contiguous(), weight.contiguous(), ptr, ptr.slice(0, 1),
                                         col_idx.contiguous(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                         s, stage_bytes);
  });
  return y;
}

// sparse_conv2d_grad_input_cuda: one direct convolution per phase of grad_x.
at::Tensor conv2d_grad_input_emulated(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride,
                                      int64_t stage_bytes) {
  check_sparse_conv2d_args("_sparse_conv2d_grad_input_tiles_emulated", x, weight, row_ptr, col_idx, std::nullopt,
                           stride, padding, dilation, groups);
  const sct::DirectConvShape f = forward_shape(x, weight, stride, padding, dilation, groups);
  at::Tensor gx = at::zeros_like(x, at::MemoryFormat::Contiguous);
  const ConvInputPhases phases = grad_input_phases(weight.contiguous(), row_ptr.contiguous(), col_idx.contiguous(),
                                                   stride, padding, dilation, groups, f.IH, f.IW);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "_sparse_conv2d_grad_input_tiles_emulated", [&] {
    for (const ConvInputPhase& ph : phases.phases) {
      const sct::DirectConvShape s{f.N, f.L, f.OH, f.OW, f.S, ph.rows, ph.cols, groups, ph.kh, ph.kw, 1, 1,
                                   ph.ph, ph.pw, ph.dh, ph.dw};
      at::Tensor out = at::zeros({s.N, s.L, s.OH, s.OW}, gx.options());
      emulate_direct_conv<scalar_t, true>(out, grad_y.contiguous(), phases.values, ph.begin, ph.end, phases.key,
                                          nullptr, s, stage_bytes);
      gx.slice(2, ph.a, f.IH, f.sh).slice(3, ph.b, f.IW, f.sw).copy_(out);
    }
  });
  return gx;
}

// tap_dots_kernel and scatter_split_sums: lane partial sums, the shuffle-down
// tree, the splits added in order.
at::Tensor conv2d_grad_weight_emulated(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride, int64_t sms) {
  check_sparse_conv2d_args("_sparse_conv2d_grad_weight_tiles_emulated", x, weight, row_ptr, col_idx, std::nullopt,
                           stride, padding, dilation, groups);
  const sct::DirectConvShape s = forward_shape(x, weight, stride, padding, dilation, groups);
  const int64_t nnz = col_idx.numel();
  at::Tensor gw = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  if (nnz == 0) return gw;
  const sct::WeightSplits plan = sct::plan_weight_splits(nnz, s.N, sms);
  const at::Tensor gy = grad_y.contiguous(), xc = x.contiguous();
  const at::Tensor ptr_t = row_ptr.contiguous(), idx_t = col_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "_sparse_conv2d_grad_weight_tiles_emulated", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* gyd = gy.const_data_ptr<scalar_t>();
    const scalar_t* xd = xc.const_data_ptr<scalar_t>();
    const int64_t* ptr = ptr_t.const_data_ptr<int64_t>();
    const int64_t* keys = idx_t.const_data_ptr<int64_t>();
    std::vector<acc_t> ws(plan.splits * nnz);
    for (int64_t z = 0; z < plan.splits; ++z) {
      for (int64_t q = 0; q < nnz; ++q) {
        const int64_t o = sct::line_of_entry(ptr, s.L, q);
        const int64_t key = keys[q];
        TORCH_CHECK(ptr[o] <= q && q < ptr[o + 1] && key >= 0 && key < s.keys() &&
                        (q == ptr[o] || keys[q - 1] < key),
                    "emulated: entry ", q, " is out of range or out of order");
        const sct::TapWindow t = sct::tap_window(s, key);
        const int64_t c = (o / s.lines_per_group()) * s.sources_per_group() + t.source;
        acc_t lanes[32] = {};
        for (int64_t n = z * plan.per; n < std::min<int64_t>(s.N, (z + 1) * plan.per); ++n) {
          const scalar_t* g = gyd + (n * s.L + o) * s.OH * s.OW;
          const scalar_t* in = xd + (n * s.S + c) * s.IH * s.IW;
          for (int64_t oy = t.oy_lo; oy < t.oy_hi; ++oy) {
            for (int lane = 0; lane < 32; ++lane) {
              for (int64_t ox = t.ox_lo + lane; ox < t.ox_hi; ox += 32) {
                lanes[lane] += static_cast<acc_t>(g[oy * s.OW + ox]) *
                               static_cast<acc_t>(in[(oy * s.sh + t.ry) * s.IW + ox * s.sw + t.rx]);
              }
            }
          }
        }
        for (int step = 16; step > 0; step /= 2) {
          for (int lane = 0; lane + step < 32; ++lane) lanes[lane] += lanes[lane + step];
        }
        ws[z * nnz + q] = lanes[0];
      }
    }
    scalar_t* gwd = gw.data_ptr<scalar_t>();
    for (int64_t q = 0; q < nnz; ++q) {
      acc_t sum = 0;
      for (int64_t z = 0; z < plan.splits; ++z) sum += ws[z * nnz + q];
      gwd[sct::line_of_entry(ptr, s.L, q) * s.keys() + keys[q]] = static_cast<scalar_t>(sum);
    }
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("_sparse_conv2d_tiles_emulated", &conv2d_emulated);
  m.impl("_sparse_conv2d_grad_input_tiles_emulated", &conv2d_grad_input_emulated);
  m.impl("_sparse_conv2d_grad_weight_tiles_emulated", &conv2d_grad_weight_emulated);
}

}  // namespace pyprune
