// CUDA kernels of sparse_masked_conv2d: the tiled direct convolution of
// pyprune/sparse_conv_tiles.h (the forward; grad_input as the same kernel over
// grad_y, once per stride phase of grad_x, with the entries transposed) and
// grad_weight at the kept positions, at every stride, padding, dilation and
// groups, whose index math the CPU emulation (csrc/cpu/sparse_conv_tiles_emulated.cpp) shares.
//
// Index bounds and order are checked on the device (CUDA_KERNEL_ASSERT), as
// PyTorch's own CUDA indexing ops do. A geometry whose input window of one
// tile does not fit in shared memory (a huge kernel or dilation) takes the
// dense-masked convolution. Non-finite inputs get the dense path's NaN from the
// shared helpers of masked_nonfinite.cpp (one host read of "all finite?").
#include <pyprune/cuda_launch.h>
#include <pyprune/masked.h>
#include <pyprune/masked_nonfinite.h>
#include <pyprune/packed_mask.h>
#include <pyprune/sparse_conv_tiles.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace pyprune {
namespace {

namespace sct = sparse_conv_tiles;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int64_t kMaxGridYZ = 65535;

// The chunk's input window [chunk][stage_rows][stage_cols] of image n, group
// `group` (zero outside the image and past the group's sources).
template <typename scalar_t, typename acc_t>
__device__ void stage_window(acc_t* stage, const scalar_t* __restrict__ src, const sct::DirectConvShape& s,
                             const sct::DirectConvPlan& p, int64_t n, int64_t group, int64_t s0, int64_t oy0,
                             int64_t ox0) {
  const int64_t spg = s.sources_per_group();
  const int64_t count = p.chunk * p.window();
  for (int64_t e = threadIdx.x; e < count; e += sct::kThreads) {
    int64_t source, iy, ix;
    sct::stage_element(s, p, e, s0, oy0, ox0, source, iy, ix);
    acc_t v = 0;
    if (source < spg && iy >= 0 && iy < s.IH && ix >= 0 && ix < s.IW) {
      v = static_cast<acc_t>(src[((n * s.S + group * spg + source) * s.IH + iy) * s.IW + ix]);
    }
    stage[e] = v;
  }
}

// dst[n, l, ...] (+ bias[l]) = the sum over line l's kept entries of value *
// the shifted window of src (see sparse_conv_tiles.h). Values: kByEntry ?
// values[q] : values[l * keys + key] (the dense weight of the forward).
// Two resident blocks per SM (<= 128 registers; a few cursor values live in L1).
template <typename scalar_t, bool kByEntry>
__global__ void __launch_bounds__(sct::kThreads, 2)
    direct_conv_kernel(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src,
                       const scalar_t* __restrict__ values, const int64_t* __restrict__ begins,
                       const int64_t* __restrict__ ends, const int64_t* __restrict__ keys, int64_t nnz,
                       const scalar_t* __restrict__ bias,
                       sct::DirectConvShape s, sct::DirectConvPlan p) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char stage_bytes[];
  acc_t* stage = reinterpret_cast<acc_t*>(stage_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = blockIdx.z;
  int64_t oy0, ox0, group, first_line;
  sct::block_place(p, blockIdx.x, blockIdx.y, oy0, ox0, group, first_line);
  const int64_t lpg = s.lines_per_group(), spg = s.sources_per_group(), taps = s.taps(), keys_per_line = s.keys();

  int base[sct::kSlots];
#pragma unroll
  for (int j = 0; j < sct::kSlots; ++j) {
    int64_t r, c;
    const bool in = sct::slot_pixel(s, p, oy0, ox0, lane, j, r, c);
    base[j] = in ? static_cast<int>(sct::slot_base(s, p, r, c)) : 0;  // an unused slot reads the stage's start
  }
  int64_t line[sct::kLinesPerWarp], begin[sct::kLinesPerWarp], next[sct::kLinesPerWarp], end[sct::kLinesPerWarp];
#pragma unroll
  for (int i = 0; i < sct::kLinesPerWarp; ++i) {
    const int64_t l = first_line + warp * sct::kLinesPerWarp + i;
    line[i] = l < lpg ? group * lpg + l : -1;
    begin[i] = next[i] = end[i] = 0;
    if (line[i] < 0) continue;
    begin[i] = next[i] = begins[line[i]];
    end[i] = ends[line[i]];
    CUDA_KERNEL_ASSERT(begin[i] >= 0 && begin[i] <= end[i] && end[i] <= nnz);
  }
  acc_t acc[sct::kLinesPerWarp][sct::kSlots];
#pragma unroll
  for (int i = 0; i < sct::kLinesPerWarp; ++i)
#pragma unroll
    for (int j = 0; j < sct::kSlots; ++j) acc[i][j] = 0;

  for (int64_t s0 = 0; s0 < spg; s0 += p.chunk) {
    __syncthreads();  // the previous chunk's reads are done
    stage_window(stage, src, s, p, n, group, s0, oy0, ox0);
    __syncthreads();
    const int64_t key_end = (s0 + p.chunk) * taps;
    // One line's entries of this chunk, 32 at a time: each lane loads one, then
    // the warp walks them in order through shuffles. (A lambda called per line
    // with its own cursor: a loop over the lines kept the cursors on the stack.)
    auto walk = [&](int64_t& next, int64_t begin, int64_t end, int64_t line_abs, acc_t(&sums)[sct::kSlots]) {
      while (next < end) {
        const int64_t q = next + lane;
        int offset = 0;
        acc_t v = 0;
        bool in = false;
        if (q < end) {
          const int64_t key = keys[q];
          CUDA_KERNEL_ASSERT(key >= 0 && key < keys_per_line && (q == begin || keys[q - 1] < key));
          in = key < key_end;
          if (in) {
            CUDA_KERNEL_ASSERT(key >= s0 * taps);
            offset = static_cast<int>(sct::entry_offset(s, p, key, s0));
            v = static_cast<acc_t>(kByEntry ? values[q] : values[line_abs * keys_per_line + key]);
          }
        }
        const unsigned ball = __ballot_sync(kFullWarp, in);
        CUDA_KERNEL_ASSERT((ball & (ball + 1)) == 0);  // sorted: the chunk's entries come first
        const int count = __popc(ball);
        for (int t = 0; t < count; ++t) {
          const int ot = __shfl_sync(kFullWarp, offset, t);
          const acc_t vt = __shfl_sync(kFullWarp, v, t);
#pragma unroll
          for (int j = 0; j < sct::kSlots; ++j) sums[j] += vt * stage[base[j] + ot];
        }
        next += count;
        if (count < sct::kEntryBatch) break;
      }
    };
    static_assert(sct::kLinesPerWarp == 2, "one walk per line below");
    walk(next[0], begin[0], end[0], line[0], acc[0]);
    walk(next[1], begin[1], end[1], line[1], acc[1]);
  }
#pragma unroll
  for (int i = 0; i < sct::kLinesPerWarp; ++i) {
    if (line[i] < 0) continue;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[line[i]]) : acc_t(0);
    scalar_t* out = dst + (n * s.L + line[i]) * s.OH * s.OW;
#pragma unroll
    for (int j = 0; j < sct::kSlots; ++j) {
      int64_t r, c;
      if (sct::slot_pixel(s, p, oy0, ox0, lane, j, r, c)) {
        out[(oy0 + r) * s.OW + ox0 + c] = static_cast<scalar_t>(acc[i][j] + b);
      }
    }
  }
}

template <typename scalar_t>
sct::DirectConvPlan conv_plan(const sct::DirectConvShape& s) {
  return sct::plan_direct_conv(s, sct::kStageBytes / static_cast<int64_t>(sizeof(acc_type_t<scalar_t>)));
}

// Runs the direct convolution dst = f(src) (both contiguous), whose plan must
// have a chunk (conv_plan(s).chunk >= 1).
template <typename scalar_t, bool kByEntry>
void launch_direct_conv(at::Tensor& dst, const at::Tensor& src, const at::Tensor& values, const at::Tensor& begins,
                        const at::Tensor& ends, const at::Tensor& keys, const scalar_t* bias,
                        const sct::DirectConvShape& s, const char* op) {
  using acc_t = acc_type_t<scalar_t>;
  const sct::DirectConvPlan p = conv_plan<scalar_t>(s);
  TORCH_INTERNAL_ASSERT(p.chunk >= 1);
  const int64_t line_blocks = s.groups * p.line_tiles;
  TORCH_CHECK(line_blocks <= kMaxGridYZ && p.tiles_h * p.tiles_w < (int64_t(1) << 31), op,
              ": too many channels or output pixels for one launch");
  const size_t smem = static_cast<size_t>(p.chunk * p.window()) * sizeof(acc_t);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t src_image = s.S * s.IH * s.IW, dst_image = s.L * s.OH * s.OW;
  // images in launches of at most 65535 (the grid's z limit)
  for (int64_t n0 = 0; n0 < s.N; n0 += kMaxGridYZ) {
    sct::DirectConvShape part = s;
    part.N = std::min<int64_t>(kMaxGridYZ, s.N - n0);
    const dim3 grid(static_cast<unsigned>(p.tiles_h * p.tiles_w), static_cast<unsigned>(line_blocks),
                    static_cast<unsigned>(part.N));
    direct_conv_kernel<scalar_t, kByEntry><<<grid, sct::kThreads, smem, stream>>>(
        dst.data_ptr<scalar_t>() + n0 * dst_image, src.const_data_ptr<scalar_t>() + n0 * src_image,
        values.const_data_ptr<scalar_t>(), begins.const_data_ptr<int64_t>(), ends.const_data_ptr<int64_t>(),
        keys.const_data_ptr<int64_t>(), keys.numel(), bias, part, p);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ws[z, q] = the dot product of kept weight q's grad_y plane with its shifted
// (strided) input plane over the images of split z: one warp per (q, z).
template <typename scalar_t>
__global__ void __launch_bounds__(sct::kThreads)
    tap_dots_kernel(acc_type_t<scalar_t>* __restrict__ ws, const scalar_t* __restrict__ gy,
                    const scalar_t* __restrict__ x, const int64_t* __restrict__ ptr, const int64_t* __restrict__ keys,
                    int64_t nnz, sct::DirectConvShape s, int64_t per) {
  using acc_t = acc_type_t<scalar_t>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * sct::kWarps + warp;
  if (q >= nnz) return;  // the whole warp
  const int64_t z = blockIdx.y;
  // s describes the forward: lines = output channels, sources = input channels
  const int64_t o = sct::line_of_entry(ptr, s.L, q);
  const int64_t key = keys[q];
  CUDA_KERNEL_ASSERT(ptr[o] <= q && q < ptr[o + 1] && key >= 0 && key < s.keys() &&
                     (q == ptr[o] || keys[q - 1] < key));
  const sct::TapWindow t = sct::tap_window(s, key);
  const int64_t c = (o / s.lines_per_group()) * s.sources_per_group() + t.source;
  acc_t sum = 0;
  const int64_t n_end = (z + 1) * per < s.N ? (z + 1) * per : s.N;
  for (int64_t n = z * per; n < n_end; ++n) {
    const scalar_t* g = gy + (n * s.L + o) * s.OH * s.OW;
    const scalar_t* in = x + (n * s.S + c) * s.IH * s.IW;
    for (int64_t oy = t.oy_lo; oy < t.oy_hi; ++oy) {
      const scalar_t* g_row = g + oy * s.OW;
      const scalar_t* in_row = in + (oy * s.sh + t.ry) * s.IW;
      for (int64_t ox = t.ox_lo + lane; ox < t.ox_hi; ox += 32) {  // inputs in the image
        sum += static_cast<acc_t>(g_row[ox]) * static_cast<acc_t>(in_row[ox * s.sw + t.rx]);
      }
    }
  }
#pragma unroll
  for (int step = 16; step > 0; step /= 2) sum += __shfl_down_sync(kFullWarp, sum, step);
  if (lane == 0) ws[z * nnz + q] = sum;
}

// grad_w[o, key] = the sum of ws[:, q] in split order, at every kept q.
template <typename scalar_t>
__global__ void scatter_split_sums(scalar_t* __restrict__ grad_w, const acc_type_t<scalar_t>* __restrict__ ws,
                                   const int64_t* __restrict__ ptr, const int64_t* __restrict__ keys, int64_t nnz,
                                   int64_t lines, int64_t keys_per_line, int64_t splits) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= nnz) return;
  acc_type_t<scalar_t> sum = 0;
  for (int64_t z = 0; z < splits; ++z) sum += ws[z * nnz + q];
  grad_w[sct::line_of_entry(ptr, lines, q) * keys_per_line + keys[q]] = static_cast<scalar_t>(sum);
}

sct::DirectConvShape forward_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t OH = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t OW = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  return {x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), OH, OW, groups, kh, kw,
          stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
}

void check_cuda_packed(const char* op, const at::Tensor& weight, const at::Tensor& row_ptr,
                       const at::Tensor& col_idx) {
  TORCH_CHECK(row_ptr.device() == weight.device() && col_idx.device() == weight.device(), op,
              ": the packed mask must be on the weight's device (", weight.device(), ")");
}

at::Tensor dense_masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const at::Tensor masked = call_apply_mask(weight, mask_from_pack(row_ptr, col_idx, weight));
  return at::conv2d(x, masked, bias, stride, padding, dilation, groups);
}

at::Tensor sparse_masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_ptr,
                                     const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups) {
  const char* op = "sparse_masked_conv2d";
  check_sparse_conv2d_args(op, x, weight, row_ptr, col_idx, bias, stride, padding, dilation, groups);
  check_cuda_packed(op, weight, row_ptr, col_idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const sct::DirectConvShape s = forward_shape(x, weight, stride, padding, dilation, groups);
  at::Tensor y = at::empty({s.N, s.L, s.OH, s.OW}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  bool fits = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_masked_conv2d_cuda", [&] {
    fits = conv_plan<scalar_t>(s).chunk >= 1;
    if (!fits) return;
    launch_direct_conv<scalar_t, false>(y, xc, w, ptr, ptr.slice(0, 1), idx,
                                        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, s, op);
  });
  if (!fits) return dense_masked_conv2d(x, weight, row_ptr, col_idx, bias, stride, padding, dilation, groups);
  nonfinite_like_dense_conv2d(y, x, weight, row_ptr, col_idx, stride, padding, dilation, groups);
  return y;
}

// The gradient ops' shared checks; the forward's shape.
sct::DirectConvShape checked_backward_cuda(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                           const at::Tensor& weight, const at::Tensor& row_ptr,
                                           const at::Tensor& col_idx, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, int64_t groups, at::IntArrayRef stride) {
  check_sparse_conv2d_args(op, x, weight, row_ptr, col_idx, std::nullopt, stride, padding, dilation, groups);
  check_cuda_packed(op, weight, row_ptr, col_idx);
  const sct::DirectConvShape s = forward_shape(x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({s.N, s.L, s.OH, s.OW}) && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              op, ": grad_y must be [", s.N, ", ", s.L, ", ", s.OH, ", ", s.OW, "] of x's dtype and device, got ",
              grad_y.sizes());
  return s;
}

// The direct convolution of one grad_input phase: sources = grad_y's channels,
// lines = the input channels, output = the phase of grad_x.
sct::DirectConvShape phase_shape(const sct::DirectConvShape& f, const ConvInputPhase& ph) {
  return {f.N, f.L, f.OH, f.OW, f.S, ph.rows, ph.cols, f.groups, ph.kh, ph.kw, 1, 1, ph.ph, ph.pw, ph.dh, ph.dw};
}

at::Tensor sparse_conv2d_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                         at::IntArrayRef stride) {
  const char* op = "sparse_masked_conv2d_grad_input";
  const sct::DirectConvShape f = checked_backward_cuda(op, grad_y, x, weight, row_ptr, col_idx, padding, dilation,
                                                       groups, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gx = at::zeros_like(x, at::MemoryFormat::Contiguous);  // phases no tap reaches stay 0
  if (gx.numel() == 0 || grad_y.numel() == 0) return gx;
  const ConvInputPhases phases = grad_input_phases(weight.contiguous(), row_ptr.contiguous(), col_idx.contiguous(),
                                                   stride, padding, dilation, groups, f.IH, f.IW);
  const at::Tensor gy = grad_y.contiguous();
  const bool one_phase = f.sh == 1 && f.sw == 1;
  bool fits = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv2d_grad_input_cuda", [&] {
    for (const ConvInputPhase& ph : phases.phases) fits = fits && conv_plan<scalar_t>(phase_shape(f, ph)).chunk >= 1;
    if (!fits) return;
    for (const ConvInputPhase& ph : phases.phases) {
      const sct::DirectConvShape s = phase_shape(f, ph);
      at::Tensor out = one_phase ? gx : at::empty({s.N, s.L, s.OH, s.OW}, gx.options());
      launch_direct_conv<scalar_t, true>(out, gy, phases.values, ph.begin, ph.end, phases.key, nullptr, s, op);
      if (!one_phase) gx.slice(2, ph.a, f.IH, f.sh).slice(3, ph.b, f.IW, f.sw).copy_(out);
    }
  });
  if (!fits) {
    const at::Tensor masked = call_apply_mask(weight, mask_from_pack(row_ptr, col_idx, weight));
    return std::get<0>(at::convolution_backward(grad_y, x, masked, std::nullopt, stride, padding, dilation,
                                                /*transposed=*/false, {0, 0}, groups, {true, false, false}));
  }
  nonfinite_like_dense_conv2d_grad_input(gx, grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups, stride);
  return gx;
}

at::Tensor sparse_conv2d_grad_weight_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                          at::IntArrayRef stride) {
  const char* op = "sparse_masked_conv2d_grad_weight";
  const sct::DirectConvShape s = checked_backward_cuda(op, grad_y, x, weight, row_ptr, col_idx, padding, dilation,
                                                       groups, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gw = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  const int64_t nnz = col_idx.numel();
  if (nnz == 0 || s.N == 0) return gw;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const sct::WeightSplits plan = sct::plan_weight_splits(nnz, s.N, sms);
  const int64_t blocks = (nnz + sct::kWarps - 1) / sct::kWarps;
  TORCH_CHECK(blocks < (int64_t(1) << 31) && plan.splits <= kMaxGridYZ, op, ": too many kept weights for one launch");
  const at::Tensor gy = grad_y.contiguous(), xc = x.contiguous();
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv2d_grad_weight_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const at::Tensor ws = at::empty({plan.splits, nnz}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    tap_dots_kernel<scalar_t><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(plan.splits)),
                                sct::kThreads, 0, stream>>>(ws.data_ptr<acc_t>(), gy.const_data_ptr<scalar_t>(),
                                                            xc.const_data_ptr<scalar_t>(),
                                                            ptr.const_data_ptr<int64_t>(),
                                                            idx.const_data_ptr<int64_t>(), nnz, s, plan.per);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
    scatter_split_sums<scalar_t><<<static_cast<unsigned>((nnz + 255) / 256), 256, 0, stream>>>(
        gw.data_ptr<scalar_t>(), ws.const_data_ptr<acc_t>(), ptr.const_data_ptr<int64_t>(),
        idx.const_data_ptr<int64_t>(), nnz, s.L, s.keys(), plan.splits);
    PYPRUNE_CUDA_KERNEL_LAUNCH_CHECK();
  });
  nonfinite_like_dense_conv2d_grad_weight(gw, grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups, stride);
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("sparse_masked_conv2d", &sparse_masked_conv2d_cuda);
  m.impl("sparse_masked_conv2d_grad_input", &sparse_conv2d_grad_input_cuda);
  m.impl("sparse_masked_conv2d_grad_weight", &sparse_conv2d_grad_weight_cuda);
}

}  // namespace pyprune
