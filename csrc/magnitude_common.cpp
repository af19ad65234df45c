// Global magnitude selection: argument checks, the radix-select driver (which
// histogram passes to run, how a digit is chosen), the assembly of the outputs,
// and the registrations that are not backend kernels (autograd, empty lists).
// Device independent: the CPU and CUDA kernels only count and write.
#include <pyprune/magnitude.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>

namespace pyprune {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_inputs(const char* op, at::TensorList weights, at::TensorList masks, int64_t k) {
  TORCH_CHECK(weights.size() == masks.size(), op,
              ": weights and masks must be lists of the same length, got ", weights.size(),
              " weights and ", masks.size(), " masks");
  TORCH_CHECK(k >= 0, op, ": k (the number of weights to prune) must be >= 0, got ", k);
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& m = masks[i];
    TORCH_CHECK(w.layout() == at::kStrided && m.layout() == at::kStrided, op, ": weights[", i,
                "] and masks[", i, "] must be dense (strided) tensors, got layouts ", w.layout(),
                " and ", m.layout());
    TORCH_CHECK(supported_dtype(w.scalar_type()), op, ": weights[", i,
                "] must be float32, float64, float16 or bfloat16, got ", w.scalar_type());
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type(), op,
                ": all weights must have the same dtype, got ", weights[0].scalar_type(),
                " for weights[0] and ", w.scalar_type(), " for weights[", i, "]");
    TORCH_CHECK(w.device() == weights[0].device(), op,
                ": all tensors must be on one device, got weights[0] on ", weights[0].device(),
                " and weights[", i, "] on ", w.device());
    TORCH_CHECK(m.device() == w.device(), op, ": all tensors must be on one device, got weights[",
                i, "] on ", w.device(), " and masks[", i, "] on ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": masks[", i, "] must be a bool tensor, got ",
                m.scalar_type());
    TORCH_CHECK(m.sizes() == w.sizes(), op, ": masks[", i, "] must have the shape of weights[", i,
                "] ", w.sizes(), ", got ", m.sizes());
  }
}

// Empty tensors take no part; the others are brought to row-major order, in
// which the flat index of the tie rule is the memory offset.
MagnitudeInputs prepare(const char* op, at::TensorList weights, at::TensorList masks, int64_t k) {
  check_inputs(op, weights, masks, k);
  MagnitudeInputs in;
  if (!weights.empty()) {
    in.dtype = weights[0].scalar_type();
    in.device = weights[0].device();
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    if (weights[i].numel() == 0) continue;
    in.weights.push_back(weights[i].contiguous());
    in.masks.push_back(masks[i].contiguous());
    in.index.push_back(static_cast<int64_t>(i));
  }
  return in;
}

// The bin holding the element of 0-based `rank` in the histogram's order;
// rank becomes that element's rank within the bin.
int select_digit(const std::vector<int64_t>& counts, int64_t& rank) {
  for (size_t d = 0; d < counts.size(); ++d) {
    if (rank < counts[d]) return static_cast<int>(d);
    rank -= counts[d];
  }
  TORCH_CHECK(false, "magnitude selection: internal error, rank beyond the histogram");
}

// Radix select of the k-th smallest kept key (k >= 1), most significant digit
// first. The first pass counts every kept weight, which also checks k; the
// check needs that count, so it happens after one pass, not before.
MagnitudeSelection select_kth(const char* op, const MagnitudeInputs& in, int64_t k,
                              const MagnitudeKernels& kernels) {
  MagnitudeSelection sel;
  int64_t rank = k - 1;
  uint64_t high = 0;  // the digits chosen so far, as one number
  const int key_bits = magnitude_key_bits(in.dtype);
  for (int remaining = key_bits; remaining > 0;) {
    RadixPass pass;
    pass.bits = std::min(kRadixBits, remaining);
    pass.shift = remaining - pass.bits;
    pass.high = high;
    std::vector<int64_t> counts(size_t(1) << pass.bits, 0);
    if (!in.weights.empty()) kernels.histogram(in, pass, counts);
    if (remaining == key_bits) {  // the first pass counts every kept weight
      const int64_t kept = std::accumulate(counts.begin(), counts.end(), int64_t(0));
      TORCH_CHECK(k <= kept, op, ": k=", k, " is more than the number of kept weights (", kept,
                  "): cannot prune more weights than the masks keep");
    }
    const int digit = select_digit(counts, rank);
    sel.equal = counts[digit];
    high = (high << pass.bits) | static_cast<uint64_t>(digit);
    remaining = pass.shift;
  }
  sel.threshold = high;
  sel.ties = rank + 1;
  return sel;
}

// A 0-d tensor of `dtype` holding the float whose bits are `key`.
at::Tensor key_to_tensor(uint64_t key, at::ScalarType dtype, c10::Device device) {
  at::Tensor t = at::empty({}, at::TensorOptions().dtype(dtype));
  const size_t size = t.element_size();
  // The key as an unsigned value of the float's width, in host byte order.
  if (size == 2) {
    const uint16_t v = static_cast<uint16_t>(key);
    std::memcpy(t.data_ptr(), &v, 2);
  } else if (size == 4) {
    const uint32_t v = static_cast<uint32_t>(key);
    std::memcpy(t.data_ptr(), &v, 4);
  } else {
    std::memcpy(t.data_ptr(), &key, 8);
  }
  return t.to(device);
}

std::tuple<at::Tensor, at::Tensor> selection_tensors(const MagnitudeInputs& in,
                                                     const MagnitudeSelection& sel) {
  return {key_to_tensor(sel.threshold, in.dtype, in.device),
          at::scalar_tensor(sel.ties, at::TensorOptions().dtype(at::kLong)).to(in.device)};
}

MagnitudeSelection select(const char* op, const MagnitudeInputs& in, int64_t k,
                          const MagnitudeKernels& kernels) {
  return k == 0 ? MagnitudeSelection{} : select_kth(op, in, k, kernels);
}

}  // namespace

int magnitude_key_bits(at::ScalarType dtype) {
  int bits = 0;
  visit_magnitude_keys(dtype, [&](auto keys) { bits = decltype(keys)::kKeyBits; });
  return bits;
}

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_impl(at::TensorList weights, at::TensorList masks,
                                                            int64_t k, const MagnitudeKernels& kernels) {
  const char* op = "magnitude_threshold";
  const MagnitudeInputs in = prepare(op, weights, masks, k);
  return selection_tensors(in, select(op, in, k, kernels));
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> magnitude_prune_impl(
    at::TensorList weights, at::TensorList masks, int64_t k, const MagnitudeKernels& kernels) {
  const char* op = "magnitude_prune";
  const MagnitudeInputs in = prepare(op, weights, masks, k);
  const MagnitudeSelection sel = select(op, in, k, kernels);
  std::vector<at::Tensor> out;
  out.reserve(masks.size());
  for (const at::Tensor& m : masks) {
    // k == 0 prunes nothing: copies of the masks.
    out.push_back(k == 0 ? m.clone(at::MemoryFormat::Contiguous)
                         : at::empty(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  if (k > 0 && !in.weights.empty()) {
    std::vector<at::Tensor> written;
    written.reserve(in.index.size());
    for (int64_t i : in.index) written.push_back(out[i]);
    kernels.write(in, sel, written);
  }
  auto [threshold, ties] = selection_tensors(in, sel);
  return {std::move(out), threshold, ties};
}

namespace {

// ---------------------------------------------------------------------------
// Registrations that are not backend kernels.

// Reached when no backend kernel applies: lists without any tensor (the
// dispatcher then has no device to go by), or a device without a kernel.
void check_no_backend_needed(const char* op, at::TensorList weights, at::TensorList masks, int64_t k) {
  check_inputs(op, weights, masks, k);
  TORCH_CHECK(weights.empty(), op, ": no kernel for tensors on ", weights[0].device(),
              " (pyprune_ext has CPU kernels, and CUDA kernels when built with CUDA)");
}

std::tuple<at::Tensor, at::Tensor> threshold_no_backend(at::TensorList weights, at::TensorList masks,
                                                        int64_t k) {
  check_no_backend_needed("magnitude_threshold", weights, masks, k);
  const MagnitudeKernels none{nullptr, nullptr};
  return magnitude_threshold_impl(weights, masks, k, none);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> prune_no_backend(at::TensorList weights,
                                                                             at::TensorList masks,
                                                                             int64_t k) {
  check_no_backend_needed("magnitude_prune", weights, masks, k);
  const MagnitudeKernels none{nullptr, nullptr};
  return magnitude_prune_impl(weights, masks, k, none);
}

// Masks and thresholds are not differentiable (a selection, like argmax): the
// autograd kernels run the op below autograd, so the outputs never require
// grad even when the weights do.
std::tuple<at::Tensor, at::Tensor> threshold_autograd(at::TensorList weights, at::TensorList masks,
                                                      int64_t k) {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyprune::magnitude_threshold", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return handle.call(weights, masks, k);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> prune_autograd(at::TensorList weights,
                                                                           at::TensorList masks,
                                                                           int64_t k) {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyprune::magnitude_prune", "")
          .typed<std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(at::TensorList, at::TensorList,
                                                                             int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return handle.call(weights, masks, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CompositeExplicitAutograd, m) {
  m.impl("magnitude_threshold", &threshold_no_backend);
  m.impl("magnitude_prune", &prune_no_backend);
}

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("magnitude_threshold", &threshold_autograd);
  m.impl("magnitude_prune", &prune_autograd);
}

}  // namespace pyprune
