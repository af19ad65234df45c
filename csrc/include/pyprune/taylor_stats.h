// Taylor-score statistics: shared declarations for the CPU and CUDA backends.
//
// For an activation a and its gradient g, with s[n,c] = sum over the reduced
// dims of a*g, the ops compute
//   first[c]  = sum_n s[n,c]      (the gate gradient dL/dz_c)
//   second[c] = sum_n s[n,c]^2    (per-example / empirical-Fisher statistic)
// The weight variant treats every weight of an output filter as its own
// "example": second[c] = sum of (w*g)^2 over the filter.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace pyprune {

// Every input is brought to a 3-d view [batch, channels, inner] described by
// sizes and element strides; the inner dims are all reduction dims merged
// into one (their order does not matter for a sum).
struct ChannelView {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t inner = 0;
  int64_t stride_batch = 0;
  int64_t stride_channel = 0;
  int64_t stride_inner = 0;
};

// How the kernels walk the memory.
//  Planar:      inner stride 1 (NCHW, NCL): each (n, c) is one contiguous run.
//  Interleaved: channel stride 1 (NHWC, (N, L, C), (N, C)): each inner row
//               holds all channels side by side.
enum class WalkOrder { Planar, Interleaved };

struct TaylorStatsPlan {
  at::Tensor a;  // possibly a re-laid-out copy of the caller's tensor
  at::Tensor g;  // same strides as a
  ChannelView view;
  WalkOrder order = WalkOrder::Planar;
  // false: second += (run sum)^2 per (n, c); true: second += sum of squared
  // products (weight statistics). Only used with WalkOrder::Planar.
  bool square_elements = false;
};

// Backend kernel: adds this call's statistics into first/second (or, with
// overwrite, stores them there: saves zero-filling fresh outputs). first and
// second are contiguous 1-d tensors of the accumulation dtype with
// view.channels entries; the plan is never empty.
using AccumulateFn = void (*)(const TaylorStatsPlan& plan, at::Tensor& first,
                              at::Tensor& second, bool overwrite);

// float32 for float32/float16/bfloat16 inputs, float64 for float64.
at::ScalarType stats_dtype(at::ScalarType input);

TaylorStatsPlan plan_channel_stats(const at::Tensor& a, const at::Tensor& g,
                                   int64_t channel_dim, const char* op);
TaylorStatsPlan plan_weight_stats(const at::Tensor& w, const at::Tensor& g_w);

// The op bodies, parameterised by the backend kernel.
std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& a,
                                                 const at::Tensor& g,
                                                 int64_t channel_dim,
                                                 AccumulateFn accumulate);
void channel_stats_(const at::Tensor& a, const at::Tensor& g,
                    at::Tensor& first, at::Tensor& second,
                    int64_t channel_dim, AccumulateFn accumulate);
std::tuple<at::Tensor, at::Tensor> weight_stats(const at::Tensor& w,
                                                const at::Tensor& g_w,
                                                AccumulateFn accumulate);

// ---------------------------------------------------------------------------
// Per-element math shared by the CPU and CUDA kernels.

template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t gate_product(scalar_t a, scalar_t g) {
  return static_cast<acc_t>(a) * static_cast<acc_t>(g);
}

// Folds one example's (or one element's) gate-gradient contribution s into
// the two running statistics.
template <typename acc_t>
C10_HOST_DEVICE inline void add_example(acc_t s, acc_t& first, acc_t& second) {
  first += s;
  second += s * s;
}

}  // namespace pyprune
