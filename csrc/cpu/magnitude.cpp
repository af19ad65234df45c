// CPU kernels of the global magnitude selection: the histogram pass of the
// radix select and the mask write (the driver is in magnitude_common.cpp).
//
// Work is cut into chunks of at most kChunk elements of one tensor; the cut
// depends only on the tensor sizes, never on the thread count. Histograms are
// integer counts, so any summation order gives the same result; they are still
// merged in group order. Tie ranks come from per-chunk counts and their prefix
// sum, so the mask is the same on any number of threads.
#include <pyprune/magnitude.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace pyprune {
namespace {

constexpr int64_t kChunk = 1 << 16;
// Fewer weights than this per thread run on fewer threads: a pass over 512K
// weights takes a few tenths of a millisecond, and waking threads for less
// work costs more than it saves (much more on a loaded machine, where a
// parallel region waits for a descheduled thread).
constexpr int64_t kParallelElements = 1 << 19;
constexpr int64_t kParallelChunks = kParallelElements / kChunk;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Chunks in (tensor, offset) order: the order of the tie rule.
std::vector<Chunk> make_chunks(const MagnitudeInputs& in) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < in.weights.size(); ++t) {
    const int64_t n = in.weights[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({int64_t(t), b, std::min(b + kChunk, n)});
  }
  return chunks;
}

template <typename Keys>
const typename Keys::bits_t* weight_bits(const MagnitudeInputs& in, int64_t t) {
  // Raw bits of the floats: the keys are made from them (see magnitude.h).
  return reinterpret_cast<const typename Keys::bits_t*>(in.weights[t].const_data_ptr());
}

// Masks are read and written as bytes: gcc does not vectorise loops over bool
// arrays, and does over uint8_t. Read as `byte != 0`, like a bool.
const uint8_t* mask_bytes(const MagnitudeInputs& in, int64_t t) {
  return reinterpret_cast<const uint8_t*>(in.masks[t].const_data_ptr<bool>());
}

// ---------------------------------------------------------------------------
// Histogram.

// Four interleaved sub-histograms: consecutive weights of similar magnitude hit
// the same bin, and four copies break that read-modify-write dependency chain.
// uint32 counters (half the cache footprint of int64) are flushed to the
// group's int64 histogram before they can overflow.
constexpr int kWays = 4;
using SubHistograms = std::array<uint32_t, kWays * kRadixBins>;

// The first pass counts every kept weight, branch-free (a random mask would
// mispredict a branch on `kept`).
template <typename Keys>
void count_all(const typename Keys::bits_t* __restrict w, const uint8_t* __restrict m, int64_t n,
               const RadixPass& p, uint32_t* __restrict sub) {
  int64_t i = 0;
  for (; i + kWays <= n; i += kWays) {
    for (int u = 0; u < kWays; ++u) {
      sub[u * kRadixBins + radix_digit(magnitude_key<Keys>(w[i + u]), p)] += m[i + u] != 0;
    }
  }
  for (; i < n; ++i) sub[radix_digit(magnitude_key<Keys>(w[i]), p)] += m[i] != 0;
}

// Later passes count only the weights in one bucket, a few percent or less:
// a vectorised loop flags a block's members, and only blocks with a member
// are revisited (a per-element branch measured 2.5x slower: mispredictions).
constexpr int kFlagBlock = 256;

template <typename Keys>
void count_bucket(const typename Keys::bits_t* __restrict w, const uint8_t* __restrict m, int64_t n,
                  const RadixPass& p, uint32_t* __restrict sub) {
  alignas(64) uint8_t member[kFlagBlock];
  for (int64_t b = 0; b < n; b += kFlagBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kFlagBlock, n - b));
    uint8_t any = 0;
    for (int u = 0; u < len; ++u) {
      member[u] = (m[b + u] != 0) & in_bucket(magnitude_key<Keys>(w[b + u]), p);
      any |= member[u];
    }
    if (!any) continue;
    for (int u = 0; u < len; ++u) {
      if (member[u]) ++sub[radix_digit(magnitude_key<Keys>(w[b + u]), p)];
    }
  }
}

template <typename Keys>
void count_run(const typename Keys::bits_t* w, const uint8_t* m, int64_t n, const RadixPass& p,
               uint32_t* sub) {
  if (p.shift + p.bits == Keys::kKeyBits) {  // the first pass: every key is in the bucket
    count_all<Keys>(w, m, n, p, sub);
  } else {
    count_bucket<Keys>(w, m, n, p, sub);
  }
}

void flush(SubHistograms& sub, int64_t* counts, int bins) {
  for (int u = 0; u < kWays; ++u) {
    for (int d = 0; d < bins; ++d) counts[d] += sub[u * kRadixBins + d];
  }
  sub.fill(0);
}

template <typename Keys>
void histogram_typed(const MagnitudeInputs& in, const RadixPass& pass, std::vector<int64_t>& counts) {
  const std::vector<Chunk> chunks = make_chunks(in);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int bins = 1 << pass.bits;
  // One group of consecutive chunks per thread, each with its own histogram.
  const int64_t groups = std::clamp<int64_t>(
      std::min<int64_t>(at::get_num_threads(), num_chunks / kParallelChunks), 1, num_chunks);
  std::vector<int64_t> partial(groups * bins, 0);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    SubHistograms sub{};
    for (int64_t g = g0; g < g1; ++g) {
      int64_t* mine = partial.data() + g * bins;
      int64_t pending = 0;  // elements counted into sub since its last flush
      for (int64_t c = g * num_chunks / groups; c < (g + 1) * num_chunks / groups; ++c) {
        const Chunk& ch = chunks[c];
        if (pending + (ch.end - ch.begin) > std::numeric_limits<uint32_t>::max()) {
          flush(sub, mine, bins);
          pending = 0;
        }
        count_run<Keys>(weight_bits<Keys>(in, ch.tensor) + ch.begin,
                        mask_bytes(in, ch.tensor) + ch.begin, ch.end - ch.begin, pass,
                        sub.data());
        pending += ch.end - ch.begin;
      }
      flush(sub, mine, bins);
    }
  });
  for (int64_t g = 0; g < groups; ++g) {
    for (int d = 0; d < bins; ++d) counts[d] += partial[g * bins + d];
  }
}

// ---------------------------------------------------------------------------
// Mask write.

template <typename Keys>
void write_run_all_ties(uint8_t* __restrict out, const typename Keys::bits_t* __restrict w,
                        const uint8_t* __restrict m, int64_t n, typename Keys::bits_t threshold) {
  for (int64_t i = 0; i < n; ++i) out[i] = stays_kept_all_ties(m[i] != 0, magnitude_key<Keys>(w[i]), threshold);
}

template <typename Keys>
int64_t count_at_threshold(const typename Keys::bits_t* __restrict w, const uint8_t* __restrict m, int64_t n,
                           typename Keys::bits_t threshold) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += is_tie(m[i] != 0, magnitude_key<Keys>(w[i]), threshold);
  return count;
}

// After write_run_all_ties, which pruned every weight at the threshold: keeps
// again those of tie rank >= ties. rank: the tie rank of the run's first
// weight. Only runs holding such weights get here, so the serial rank count
// (not vectorisable) touches few runs when ties are rare.
template <typename Keys>
void restore_late_ties(uint8_t* __restrict out, const typename Keys::bits_t* __restrict w,
                       const uint8_t* __restrict m, int64_t n, typename Keys::bits_t threshold, int64_t rank,
                       int64_t ties) {
  for (int64_t i = 0; i < n; ++i) {
    const auto key = magnitude_key<Keys>(w[i]);
    if (is_tie(m[i] != 0, key, threshold)) {
      out[i] = stays_kept(true, key, threshold, rank, ties);
      ++rank;
    }
  }
}

template <typename Keys>
void write_typed(const MagnitudeInputs& in, const MagnitudeSelection& sel, std::vector<at::Tensor>& out) {
  using bits_t = typename Keys::bits_t;
  const bits_t threshold = static_cast<bits_t>(sel.threshold);
  const std::vector<Chunk> chunks = make_chunks(in);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  auto run = [&](const Chunk& ch, auto&& body) {
    body(reinterpret_cast<uint8_t*>(out[ch.tensor].data_ptr<bool>()) + ch.begin,
         weight_bits<Keys>(in, ch.tensor) + ch.begin, mask_bytes(in, ch.tensor) + ch.begin, ch.end - ch.begin);
  };
  // Some weights at the threshold stay when ties < equal: their tie ranks in
  // (tensor, index) order come from per-chunk counts and a prefix sum.
  const bool ranked = sel.ties < sel.equal;
  std::vector<int64_t> first_rank, at_threshold;
  if (ranked) {
    at_threshold.resize(num_chunks);
    at::parallel_for(0, num_chunks, kParallelChunks, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        run(chunks[c], [&](uint8_t*, const bits_t* w, const uint8_t* m, int64_t n) {
          at_threshold[c] = count_at_threshold<Keys>(w, m, n, threshold);
        });
      }
    });
    first_rank.resize(num_chunks);
    std::exclusive_scan(at_threshold.begin(), at_threshold.end(), first_rank.begin(), int64_t(0));
  }
  at::parallel_for(0, num_chunks, kParallelChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      run(chunks[c], [&](uint8_t* o, const bits_t* w, const uint8_t* m, int64_t n) {
        write_run_all_ties<Keys>(o, w, m, n, threshold);
        if (ranked && at_threshold[c] > 0 && first_rank[c] + at_threshold[c] > sel.ties) {
          restore_late_ties<Keys>(o, w, m, n, threshold, first_rank[c], sel.ties);
        }
      });
    }
  });
}

void histogram_cpu(const MagnitudeInputs& in, const RadixPass& pass, std::vector<int64_t>& counts) {
  visit_magnitude_keys(in.dtype, [&](auto keys) { histogram_typed<decltype(keys)>(in, pass, counts); });
}

void write_cpu(const MagnitudeInputs& in, const MagnitudeSelection& sel, std::vector<at::Tensor>& out) {
  visit_magnitude_keys(in.dtype, [&](auto keys) { write_typed<decltype(keys)>(in, sel, out); });
}

constexpr MagnitudeKernels kCpuKernels{&histogram_cpu, &write_cpu};

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cpu(at::TensorList weights, at::TensorList masks,
                                                           int64_t k) {
  return magnitude_threshold_impl(weights, masks, k, kCpuKernels);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> magnitude_prune_cpu(at::TensorList weights,
                                                                                at::TensorList masks,
                                                                                int64_t k) {
  return magnitude_prune_impl(weights, masks, k, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("magnitude_threshold", &magnitude_threshold_cpu);
  m.impl("magnitude_prune", &magnitude_prune_cpu);
}

}  // namespace pyprune
