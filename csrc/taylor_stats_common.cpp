// Argument checks and memory-layout planning for the Taylor-statistics ops.
// Device independent: the CPU and CUDA registrations both go through here, so
// both backends accept and reject exactly the same inputs.
#include <pyprune/inplace.h>
#include <pyprune/masked.h>
#include <pyprune/taylor_stats.h>

#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace pyprune {
namespace {


void check_floating_strided(const at::Tensor& t, const char* op,
                            const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name,
              " must be a dense (strided) tensor, got layout ", t.layout());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble ||
                  dtype == at::kHalf || dtype == at::kBFloat16,
              op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_pair(const at::Tensor& a, const at::Tensor& g, const char* op,
                const char* a_name, const char* g_name) {
  check_floating_strided(a, op, a_name);
  check_floating_strided(g, op, g_name);
  TORCH_CHECK(a.sizes() == g.sizes(), op, ": ", a_name, " and ", g_name,
              " must have the same shape, got ", a.sizes(), " and ",
              g.sizes());
  TORCH_CHECK(a.scalar_type() == g.scalar_type(), op, ": ", a_name, " and ",
              g_name, " must have the same dtype, got ", a.scalar_type(),
              " and ", g.scalar_type());
  TORCH_CHECK(a.device() == g.device(), op, ": ", a_name, " and ", g_name,
              " must be on the same device, got ", a.device(), " and ",
              g.device());
}

// Makes g share a's strides (one copy of g at most), so that a single index
// computation serves both. a itself is made contiguous only if it is not
// dense (an overlapping or gappy view).
void align_layouts(at::Tensor& a, at::Tensor& g) {
  if (!a.is_non_overlapping_and_dense()) {
    a = a.contiguous();
  }
  if (g.strides() != a.strides()) {
    at::Tensor copy = at::empty_strided(a.sizes(), a.strides(), g.options());
    copy.copy_(g);
    g = copy;
  }
}

// Merges the reduction dims of a into one [inner] dim with a single stride,
// if their strides allow it. Dims are sorted by stride first: a sum does not
// care about order, so a transposed H/W pair still merges without a copy.
bool merge_inner_dims(const at::Tensor& a, int64_t channel_dim,
                      int64_t& inner, int64_t& stride_inner) {
  std::vector<int64_t> dims;
  inner = 1;
  for (int64_t d = 1; d < a.dim(); ++d) {
    if (d == channel_dim) continue;
    inner *= a.size(d);
    if (a.size(d) != 1) dims.push_back(d);
  }
  std::sort(dims.begin(), dims.end(), [&](int64_t x, int64_t y) {
    return a.stride(x) > a.stride(y);
  });
  stride_inner = dims.empty() ? 1 : a.stride(dims.back());
  for (size_t i = 0; i + 1 < dims.size(); ++i) {
    if (a.stride(dims[i]) != a.stride(dims[i + 1]) * a.size(dims[i + 1])) {
      return false;
    }
  }
  return true;
}

ChannelView describe(const at::Tensor& a, int64_t channel_dim,
                     int64_t inner, int64_t stride_inner) {
  ChannelView v;
  v.batch = a.size(0);
  v.channels = a.size(channel_dim);
  v.inner = inner;
  v.stride_batch = a.stride(0);
  v.stride_channel = a.stride(channel_dim);
  v.stride_inner = inner == 1 ? 1 : stride_inner;
  return v;
}

}  // namespace

at::ScalarType stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

TaylorStatsPlan plan_channel_stats(const at::Tensor& a_in,
                                   const at::Tensor& g_in, int64_t channel_dim,
                                   const char* op) {
  check_pair(a_in, g_in, op, "a", "g");
  TORCH_CHECK(a_in.dim() >= 2, op,
              ": a must have a batch dim and a channel dim (at least 2 dims), "
              "got shape ",
              a_in.sizes());
  TORCH_CHECK(channel_dim >= -a_in.dim() && channel_dim < a_in.dim(), op,
              ": channel_dim=", channel_dim, " is out of range for a ",
              a_in.dim(), "-d input");
  const int64_t cd = at::maybe_wrap_dim(channel_dim, a_in.dim());
  TORCH_CHECK(cd != 0, op,
              ": channel_dim must not be 0, the batch dim (got channel_dim=",
              channel_dim, ")");

  TaylorStatsPlan plan;
  plan.a = a_in;
  plan.g = g_in;
  align_layouts(plan.a, plan.g);

  int64_t channel = cd, inner = 1, stride_inner = 1;
  bool merged = merge_inner_dims(plan.a, channel, inner, stride_inner);
  plan.view = describe(plan.a, channel, inner, stride_inner);
  const ChannelView& v = plan.view;
  if (merged && v.stride_inner == 1 && v.inner > 1) {
    plan.order = WalkOrder::Planar;
  } else if (merged && v.stride_channel == 1) {
    plan.order = WalkOrder::Interleaved;
  } else if (merged && v.inner == 1) {
    plan.order = WalkOrder::Planar;  // runs of one element
  } else {
    // Neither the channels nor the reduced dims are contiguous, or the reduced
    // dims cannot be merged (channel dim between them): one copy to
    // [N, C, rest] order, after which every (n, c) is one contiguous run.
    plan.a = plan.a.movedim(cd, 1).contiguous();
    plan.g = plan.g.movedim(cd, 1).contiguous();
    channel = 1;
    merge_inner_dims(plan.a, channel, inner, stride_inner);
    plan.view = describe(plan.a, channel, inner, stride_inner);
    plan.order = WalkOrder::Planar;
  }
  return plan;
}

TaylorStatsPlan plan_weight_stats(const at::Tensor& w, const at::Tensor& g_w) {
  const char* op = "taylor_weight_stats";
  check_pair(w, g_w, op, "w", "g_w");
  TORCH_CHECK(w.dim() >= 1, op,
              ": w must have an output-channel dim 0, got a 0-d tensor");
  TaylorStatsPlan plan;
  plan.a = w;
  plan.g = g_w;
  align_layouts(plan.a, plan.g);
  // One output filter must be a dense block of its numel elements, starting
  // at c * stride(0); true for contiguous and channels-last weights.
  const int64_t per_channel = w.numel() / std::max<int64_t>(w.size(0), 1);
  const bool filter_blocks =
      plan.a.is_contiguous() || plan.a.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      plan.a.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  if (!filter_blocks) {
    plan.a = plan.a.contiguous();
    plan.g = plan.g.contiguous();
  }
  // One "example" whose runs are the filters: second sums squared products.
  plan.view.batch = 1;
  plan.view.channels = w.size(0);
  plan.view.inner = per_channel;
  plan.view.stride_batch = 0;
  plan.view.stride_channel = w.size(0) > 1 ? plan.a.stride(0) : per_channel;
  plan.view.stride_inner = 1;
  plan.order = WalkOrder::Planar;
  plan.square_elements = true;
  return plan;
}

namespace {

std::tuple<at::Tensor, at::Tensor> new_stats(const TaylorStatsPlan& plan) {
  auto options = plan.a.options().dtype(stats_dtype(plan.a.scalar_type()));
  return {at::empty({plan.view.channels}, options),
          at::empty({plan.view.channels}, options)};
}

void run(const TaylorStatsPlan& plan, at::Tensor& first, at::Tensor& second,
         bool overwrite, AccumulateFn accumulate) {
  const ChannelView& v = plan.view;
  if (v.batch == 0 || v.channels == 0 || v.inner == 0) {
    // Nothing to add: the statistics of an empty batch are zero.
    if (overwrite) {
      first.zero_();
      second.zero_();
    }
    return;
  }
  accumulate(plan, first, second, overwrite);
}

void check_accumulator(const at::Tensor& buf, const char* name,
                       const TaylorStatsPlan& plan) {
  const char* op = "taylor_channel_stats_";
  const auto want = stats_dtype(plan.a.scalar_type());
  TORCH_CHECK(buf.layout() == at::kStrided, op, ": ", name,
              " must be a dense tensor, got layout ", buf.layout());
  TORCH_CHECK(buf.dim() == 1 && buf.size(0) == plan.view.channels, op, ": ",
              name, " must have shape [", plan.view.channels,
              "] (one entry per channel), got ", buf.sizes());
  TORCH_CHECK(buf.scalar_type() == want, op, ": ", name, " must be ", want,
              " for ", plan.a.scalar_type(), " inputs, got ",
              buf.scalar_type());
  TORCH_CHECK(buf.device() == plan.a.device(), op, ": ", name,
              " must be on the same device as a (", plan.a.device(),
              "), got ", buf.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& a,
                                                 const at::Tensor& g,
                                                 int64_t channel_dim,
                                                 AccumulateFn accumulate) {
  auto plan = plan_channel_stats(a, g, channel_dim, "taylor_channel_stats");
  auto [first, second] = new_stats(plan);
  run(plan, first, second, /*overwrite=*/true, accumulate);
  return {first, second};
}

void channel_stats_(const at::Tensor& a, const at::Tensor& g,
                    at::Tensor& first, at::Tensor& second,
                    int64_t channel_dim, AccumulateFn accumulate) {
  auto plan = plan_channel_stats(a, g, channel_dim, "taylor_channel_stats_");
  check_accumulator(first, "first", plan);
  check_accumulator(second, "second", plan);
  TORCH_CHECK(!first.is_same(second) && !first.is_alias_of(second),
              "taylor_channel_stats_: first and second must be different "
              "buffers");
  const char* op = "taylor_channel_stats_";
  for (const auto& [buf, name] : {std::pair<const at::Tensor&, const char*>{first, "first"},
                                  std::pair<const at::Tensor&, const char*>{second, "second"}}) {
    check_writable(op, buf, name);
    check_not_aliased(op, buf, name, a, "a");
    check_not_aliased(op, buf, name, g, "g");
  }
  if (first.is_contiguous() && second.is_contiguous()) {
    run(plan, first, second, /*overwrite=*/false, accumulate);
    return;
  }
  // Strided accumulators: add through contiguous temporaries.
  auto [f, s] = new_stats(plan);
  run(plan, f, s, /*overwrite=*/true, accumulate);
  first.add_(f);
  second.add_(s);
}

std::tuple<at::Tensor, at::Tensor> weight_stats(const at::Tensor& w,
                                                const at::Tensor& g_w,
                                                AccumulateFn accumulate) {
  auto plan = plan_weight_stats(w, g_w);
  auto [first, second] = new_stats(plan);
  run(plan, first, second, /*overwrite=*/true, accumulate);
  return {first, second};
}

namespace {

// taylor_channel_stats_'s in-place bookkeeping (pyprune/inplace.h): the
// accumulators are buffers; one that requires grad is refused under grad mode.
using ChannelStatsInplace = void(const at::Tensor&, const at::Tensor&, at::Tensor, at::Tensor, int64_t);

void channel_stats_inplace_autograd(const at::Tensor& a, const at::Tensor& g, at::Tensor first,
                                    at::Tensor second, int64_t channel_dim) {
  refuse_grad_inplace("taylor_channel_stats_", first, "first");
  refuse_grad_inplace("taylor_channel_stats_", second, "second");
  static const auto op = find_op<ChannelStatsInplace>("pyprune::taylor_channel_stats_");
  at::AutoDispatchBelowAutograd below_autograd;
  op.call(a, g, first, second, channel_dim);
}

void channel_stats_inplace_version(const at::Tensor& a, const at::Tensor& g, at::Tensor first,
                                   at::Tensor second, int64_t channel_dim) {
  static const auto op = find_op<ChannelStatsInplace>("pyprune::taylor_channel_stats_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(a, g, first, second, channel_dim);
  }
  bump_version(first);
  bump_version(second);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("taylor_channel_stats_", &channel_stats_inplace_autograd);
}

TORCH_LIBRARY_IMPL(pyprune, ADInplaceOrView, m) {
  m.impl("taylor_channel_stats_", &channel_stats_inplace_version);
}

}  // namespace pyprune
