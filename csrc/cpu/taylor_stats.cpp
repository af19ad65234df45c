// CPU kernels for the Taylor-statistics ops.
//
// Work is cut into tiles of (a chunk of examples) x (a block of channels) whose
// sizes depend only on the input shape, never on the thread count. Each tile
// writes its partial sums to its own slot; the slots are then added in tile
// order. So results are bit-identical run to run and on any number of threads,
// and a and g are each read exactly once.
#include <pyprune/taylor_stats.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace pyprune {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Loads Vectorized<acc_t>::size() consecutive inputs, widened to acc_t.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline at::vec::Vectorized<acc_t> load_widened(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return at::vec::Vectorized<acc_t>::loadu(p);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
}

// Number of elements a tile should cover: big enough to hide the per-tile
// bookkeeping, small enough to give both cores (or many) work.
constexpr int64_t kTileElements = 1 << 15;

struct Tiling {
  int64_t examples_per_chunk;
  int64_t num_chunks;
  int64_t channels_per_block;
  int64_t num_blocks;
};

Tiling make_tiling(const ChannelView& v, int64_t channels_per_block) {
  Tiling t;
  t.channels_per_block = std::min(v.channels, channels_per_block);
  t.num_blocks = (v.channels + t.channels_per_block - 1) / t.channels_per_block;
  const int64_t per_example = std::max<int64_t>(1, v.inner * t.channels_per_block);
  t.examples_per_chunk = std::clamp<int64_t>(kTileElements / per_example, 1, v.batch);
  t.num_chunks = (v.batch + t.examples_per_chunk - 1) / t.examples_per_chunk;
  return t;
}

// Sum of a*g (and of (a*g)^2 when kSquares) over one contiguous run.
template <typename scalar_t, bool kSquares, typename acc_t = acc_type_t<scalar_t>>
inline void run_sums(const scalar_t* a, const scalar_t* g, int64_t len,
                     acc_t& sum, acc_t& sum_sq) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec s0(0), s1(0), q0(0), q1(0);
  int64_t i = 0;
  for (; i + 2 * V <= len; i += 2 * V) {  // two chains for latency hiding
    const Vec p0 = load_widened(a + i) * load_widened(g + i);
    const Vec p1 = load_widened(a + i + V) * load_widened(g + i + V);
    s0 = s0 + p0;
    s1 = s1 + p1;
    if constexpr (kSquares) {
      q0 = at::vec::fmadd(p0, p0, q0);
      q1 = at::vec::fmadd(p1, p1, q1);
    }
  }
  acc_t s = at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), s0 + s1);
  acc_t q = kSquares ? at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), q0 + q1) : acc_t(0);
  for (; i < len; ++i) {
    const acc_t p = gate_product<acc_t>(a[i], g[i]);
    s += p;
    if constexpr (kSquares) q += p * p;
  }
  sum = s;
  sum_sq = q;
}

// Planar walk: each (n, c) is a contiguous run of view.inner elements.
template <typename scalar_t, bool kSquares, typename acc_t = acc_type_t<scalar_t>>
void planar_tile(const TaylorStatsPlan& plan, int64_t n0, int64_t n1,
                 int64_t c0, int64_t c1, acc_t* first, acc_t* second) {
  const ChannelView& v = plan.view;
  const scalar_t* a = plan.a.const_data_ptr<scalar_t>();
  const scalar_t* g = plan.g.const_data_ptr<scalar_t>();
  for (int64_t c = c0; c < c1; ++c) {
    acc_t f = 0, q = 0;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t off = n * v.stride_batch + c * v.stride_channel;
      acc_t s, s_sq;
      run_sums<scalar_t, kSquares>(a + off, g + off, v.inner, s, s_sq);
      if constexpr (kSquares) {
        f += s;
        q += s_sq;
      } else {
        add_example(s, f, q);
      }
    }
    first[c - c0] = f;
    second[c - c0] = q;
  }
}

// Interleaved walk: rows of channels side by side (channel stride 1). A block
// spans many channels so that each row is read as one long contiguous stretch
// (narrow blocks made the prefetcher fetch lines belonging to other tiles).
constexpr int64_t kInterleavedBlock = 4096;

// s[i] += a[i] * g[i] for one row of `width` channels. Element-wise across
// channels, so the loop vectorises under -O3 for any instruction set.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline void add_row(acc_t* __restrict s, const scalar_t* __restrict a,
                    const scalar_t* __restrict g, int64_t width) {
  for (int64_t i = 0; i < width; ++i) s[i] += gate_product<acc_t>(a[i], g[i]);
}

// (N, C)-like input: every element is its own example, no row sums needed.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline void add_examples_row(acc_t* __restrict first, acc_t* __restrict second,
                             const scalar_t* __restrict a, const scalar_t* __restrict g,
                             int64_t width) {
  for (int64_t i = 0; i < width; ++i) add_example(gate_product<acc_t>(a[i], g[i]), first[i], second[i]);
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
void interleaved_tile(const TaylorStatsPlan& plan, int64_t n0, int64_t n1,
                      int64_t c0, int64_t c1, acc_t* first, acc_t* second) {
  const ChannelView& v = plan.view;
  const scalar_t* a = plan.a.const_data_ptr<scalar_t>() + c0;
  const scalar_t* g = plan.g.const_data_ptr<scalar_t>() + c0;
  const int64_t width = c1 - c0;
  std::fill(first, first + width, acc_t(0));
  std::fill(second, second + width, acc_t(0));
  if (v.inner == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      add_examples_row(first, second, a + n * v.stride_batch, g + n * v.stride_batch, width);
    }
    return;
  }
  // s[n, c0 + i] while example n is walked. On the heap: the same buffer on the
  // stack measured 2-3x slower here (likely 4K aliasing with the input streams).
  std::vector<acc_t> s(width);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(s.begin(), s.begin() + width, acc_t(0));
    const scalar_t* an = a + n * v.stride_batch;
    const scalar_t* gn = g + n * v.stride_batch;
    for (int64_t r = 0; r < v.inner; ++r) {
      add_row(s.data(), an + r * v.stride_inner, gn + r * v.stride_inner, width);
    }
    for (int64_t i = 0; i < width; ++i) add_example(s[i], first[i], second[i]);
  }
}

template <typename scalar_t>
void accumulate_typed(const TaylorStatsPlan& plan, at::Tensor& first,
                      at::Tensor& second, bool overwrite) {
  using acc_t = acc_type_t<scalar_t>;
  const ChannelView& v = plan.view;
  const bool interleaved = plan.order == WalkOrder::Interleaved;
  const Tiling t = make_tiling(v, interleaved ? kInterleavedBlock : 16);
  // partial[k] holds chunk k's sums for every channel: C values of first,
  // then C values of second.
  std::vector<acc_t> partial(t.num_chunks * 2 * v.channels);
  at::parallel_for(0, t.num_chunks * t.num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t k = tile / t.num_blocks;
      const int64_t c0 = (tile % t.num_blocks) * t.channels_per_block;
      const int64_t c1 = std::min(c0 + t.channels_per_block, v.channels);
      const int64_t n0 = k * t.examples_per_chunk;
      const int64_t n1 = std::min(n0 + t.examples_per_chunk, v.batch);
      acc_t* f = partial.data() + k * 2 * v.channels + c0;
      acc_t* q = f + v.channels;
      if (interleaved) {
        interleaved_tile<scalar_t>(plan, n0, n1, c0, c1, f, q);
      } else if (plan.square_elements) {
        planar_tile<scalar_t, true>(plan, n0, n1, c0, c1, f, q);
      } else {
        planar_tile<scalar_t, false>(plan, n0, n1, c0, c1, f, q);
      }
    }
  });
  // Ordered combination of the chunks: deterministic.
  acc_t* out_first = first.data_ptr<acc_t>();
  acc_t* out_second = second.data_ptr<acc_t>();
  for (int64_t c = 0; c < v.channels; ++c) {
    acc_t f = 0, q = 0;
    for (int64_t k = 0; k < t.num_chunks; ++k) {
      f += partial[k * 2 * v.channels + c];
      q += partial[k * 2 * v.channels + v.channels + c];
    }
    out_first[c] = overwrite ? f : out_first[c] + f;
    out_second[c] = overwrite ? q : out_second[c] + q;
  }
}

void accumulate_cpu(const TaylorStatsPlan& plan, at::Tensor& first,
                    at::Tensor& second, bool overwrite) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.a.scalar_type(),
                                  "taylor_stats_cpu", [&] {
                                    accumulate_typed<scalar_t>(plan, first, second, overwrite);
                                  });
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& a,
                                                     const at::Tensor& g,
                                                     int64_t channel_dim) {
  return channel_stats(a, g, channel_dim, &accumulate_cpu);
}

void channel_stats_cpu_(const at::Tensor& a, const at::Tensor& g,
                        at::Tensor first, at::Tensor second,
                        int64_t channel_dim) {
  channel_stats_(a, g, first, second, channel_dim, &accumulate_cpu);
}

std::tuple<at::Tensor, at::Tensor> weight_stats_cpu(const at::Tensor& w,
                                                    const at::Tensor& g_w) {
  return weight_stats(w, g_w, &accumulate_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("taylor_channel_stats", &channel_stats_cpu);
  m.impl("taylor_channel_stats_", &channel_stats_cpu_);
  m.impl("taylor_weight_stats", &weight_stats_cpu);
}

}  // namespace pyprune
