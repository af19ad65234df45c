// Global magnitude selection (lottery-ticket pruning): shared declarations and
// the per-element math of the CPU and CUDA kernels.
//
// Problem: over many weight tensors and their bool masks, find the k smallest
// |w| among the kept weights, without concatenating or sorting them.
//
// Method: radix select on a key made from the weight's bits. For |w| >= 0 the
// IEEE-754 bit pattern, read as an unsigned integer, orders like the value, so
// the k-th smallest |w| is the k-th smallest key. A few histogram passes over
// successive digits of the key (most significant first) narrow the candidates
// down to one exact key T:
//   pass 1: histogram of the top digit of every kept key -> digit d1 holding
//           the k-th key, and its rank within that bucket;
//   pass 2: histogram of the next digit over the kept keys whose top digit is
//           d1 -> d2; ... until every bit of T is fixed.
// Then one pass writes the new masks: a kept weight is pruned when its key is
// below T, or equal to T and among the first `ties` such weights in the order
// (tensor index in the list, flat row-major index in the tensor).
// Extra memory: one histogram and per-chunk counters.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace pyprune {

// Digit width of one histogram pass: 2048 bins, small enough for fast memory
// (the CPU's four uint32 sub-histograms: 32 KiB, L1-sized; CUDA's shared-memory
// histogram: 8 KiB). float32 keys (31 bits) take 3 passes, float16/bfloat16
// (15 bits) 2, float64 (63 bits) 6.
constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;

// ---------------------------------------------------------------------------
// Keys. The kernels read a weight as its raw bits (no float arithmetic), so
// the CPU and the GPU compute identical keys.
//
// key = bits of |w| (sign bit cleared): -0.0 and +0.0 both give key 0 and tie.
// NaN: every NaN (any sign, any payload) gets one canonical key above +inf's,
// so NaN counts as the largest magnitude and all NaNs tie with each other.

struct Float16Keys {
  using bits_t = uint16_t;
  static constexpr bits_t kAbsMask = 0x7FFF;
  static constexpr bits_t kInf = 0x7C00;
  static constexpr bits_t kNaN = 0x7E00;
  static constexpr int kKeyBits = 15;
};

struct BFloat16Keys {
  using bits_t = uint16_t;
  static constexpr bits_t kAbsMask = 0x7FFF;
  static constexpr bits_t kInf = 0x7F80;
  static constexpr bits_t kNaN = 0x7FC0;
  static constexpr int kKeyBits = 15;
};

struct Float32Keys {
  using bits_t = uint32_t;
  static constexpr bits_t kAbsMask = 0x7FFFFFFFu;
  static constexpr bits_t kInf = 0x7F800000u;
  static constexpr bits_t kNaN = 0x7FC00000u;
  static constexpr int kKeyBits = 31;
};

struct Float64Keys {
  using bits_t = uint64_t;
  static constexpr bits_t kAbsMask = 0x7FFFFFFFFFFFFFFFull;
  static constexpr bits_t kInf = 0x7FF0000000000000ull;
  static constexpr bits_t kNaN = 0x7FF8000000000000ull;
  static constexpr int kKeyBits = 63;
};

template <typename Keys>
C10_HOST_DEVICE inline typename Keys::bits_t magnitude_key(typename Keys::bits_t bits) {
  const typename Keys::bits_t a = bits & Keys::kAbsMask;
  return a > Keys::kInf ? Keys::kNaN : a;  // a select, not a branch
}

// One histogram pass: bins are the key bits [shift, shift + bits); only keys
// whose bits above shift + bits equal `high` (the digits chosen by earlier
// passes) are counted. shift + bits <= kKeyBits < the key type's width, so the
// shifts below are always defined.
struct RadixPass {
  int shift = 0;
  int bits = 0;
  uint64_t high = 0;  // key >> (shift + bits) of the wanted bucket
};

// Compared in the key's own width (high fits in it): a 64-bit compare would
// keep the CPU loops over 32-bit keys from vectorising.
template <typename bits_t>
C10_HOST_DEVICE inline bool in_bucket(bits_t key, const RadixPass& p) {
  return static_cast<bits_t>(key >> (p.shift + p.bits)) == static_cast<bits_t>(p.high);
}

template <typename bits_t>
C10_HOST_DEVICE inline int radix_digit(bits_t key, const RadixPass& p) {
  return static_cast<int>((key >> p.shift) & ((bits_t(1) << p.bits) - 1));
}

// The outcome of the selection, in keys.
struct MagnitudeSelection {
  uint64_t threshold = 0;  // key of the k-th smallest kept |w| (0 when k == 0)
  int64_t ties = 0;        // kept weights with key == threshold to prune
  int64_t equal = 0;       // kept weights with key == threshold in all
};

// Whether a weight stays kept: it was kept, and it is above the threshold, or
// at it but past the first `ties` such weights (tie_rank counts the kept
// weights with key == threshold before this one in (tensor, index) order).
template <typename bits_t>
C10_HOST_DEVICE inline bool stays_kept(bool kept, bits_t key, bits_t threshold, int64_t tie_rank,
                                       int64_t ties) {
  // & and |, not && and ||: branch-free, so the CPU loops vectorise.
  return kept & ((key > threshold) | ((key == threshold) & (tie_rank >= ties)));
}

// stays_kept when every kept weight at the threshold is pruned (ties ==
// equal, the usual case for real-valued weights): no tie ranks needed.
template <typename bits_t>
C10_HOST_DEVICE inline bool stays_kept_all_ties(bool kept, bits_t key, bits_t threshold) {
  return kept & (key > threshold);
}

// Whether a weight is a tie: kept and at the threshold (it adds to the rank).
template <typename bits_t>
C10_HOST_DEVICE inline bool is_tie(bool kept, bits_t key, bits_t threshold) {
  return kept & (key == threshold);
}

// ---------------------------------------------------------------------------
// Host side, shared by the backends (magnitude_common.cpp).

// The validated inputs: contiguous weights and masks (a non-contiguous input
// is copied once), empty tensors left out. `index` maps each entry
// back to its position in the caller's lists.
struct MagnitudeInputs {
  std::vector<at::Tensor> weights;
  std::vector<at::Tensor> masks;
  std::vector<int64_t> index;
  at::ScalarType dtype = at::kFloat;
  c10::Device device = c10::kCPU;
};

// Backend kernels (never called with an empty inputs.weights).
//  histogram: adds to counts[d] (a zeroed host vector of 1 << pass.bits
//             entries) the number of kept weights in pass's bucket whose
//             digit is d.
//  write:     fills out[i], a contiguous bool tensor of inputs.weights[i]'s
//             shape, with the new mask of weight i under the selection.
struct MagnitudeKernels {
  void (*histogram)(const MagnitudeInputs& in, const RadixPass& pass, std::vector<int64_t>& counts);
  void (*write)(const MagnitudeInputs& in, const MagnitudeSelection& sel, std::vector<at::Tensor>& out);
};

// Calls f(Keys{}) with the key traits of dtype (one of the four supported).
template <typename F>
void visit_magnitude_keys(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf:
      f(Float16Keys{});
      break;
    case at::kBFloat16:
      f(BFloat16Keys{});
      break;
    case at::kFloat:
      f(Float32Keys{});
      break;
    case at::kDouble:
      f(Float64Keys{});
      break;
    default:
      TORCH_CHECK(false, "magnitude selection: unsupported dtype ", dtype);
  }
}

// Number of key bits of a supported dtype (15, 31 or 63).
int magnitude_key_bits(at::ScalarType dtype);

// The op bodies, parameterised by the backend kernels.
std::tuple<at::Tensor, at::Tensor> magnitude_threshold_impl(at::TensorList weights, at::TensorList masks,
                                                            int64_t k, const MagnitudeKernels& kernels);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> magnitude_prune_impl(
    at::TensorList weights, at::TensorList masks, int64_t k, const MagnitudeKernels& kernels);

}  // namespace pyprune
