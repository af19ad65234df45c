// In-place semantics shared by the mutable ops (see pyprune/inplace.h).
#include <pyprune/inplace.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <vector>

namespace pyprune {
namespace {

// True when no two elements of t can share an address: with the dims sorted by
// stride, each stride exceeds the span of all smaller dims. Exact for the
// layouts views produce (slices, transposes, permutes); an exotic as_strided
// that interleaves without overlapping is refused too, which costs a clone.
bool elements_disjoint(const at::Tensor& t) {
  if (t.numel() <= 1 || t.is_non_overlapping_and_dense()) return true;
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1) dims.push_back(d);
  }
  std::sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return t.stride(a) < t.stride(b); });
  int64_t span = 0;  // largest offset reachable with the dims seen so far
  for (int64_t d : dims) {
    if (t.stride(d) <= span) return false;
    span += (t.size(d) - 1) * t.stride(d);
  }
  return true;
}

}  // namespace

void refuse_grad_inplace(const char* op, const at::Tensor& t, const char* name) {
  if (!t.defined() || !c10::GradMode::is_enabled() || !t.requires_grad()) return;
  TORCH_CHECK(!t.is_leaf(), op, ": ", name,
              " is a leaf tensor that requires grad; writing into it in place would bypass autograd "
              "(torch refuses this for its own in-place ops). Call ", op, " under torch.no_grad().");
  TORCH_CHECK(false, op, ": ", name, " requires grad, and ", op,
              " has no derivative (it is meant for parameters and buffers). Call it under "
              "torch.no_grad(), or use the out-of-place op inside the graph.");
}

void check_writable(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(elements_disjoint(t), op, ": ", name, " (shape ", t.sizes(), ", strides ", t.strides(),
              ") has elements that share memory (an expand()ed or as_strided view); writing into it "
              "would write every alias. clone() it first.");
}

void check_not_aliased(const char* op, const at::Tensor& t, const char* t_name, const at::Tensor& other,
                       const char* other_name) {
  if (!t.defined() || !other.defined()) return;
  // TooHard (both strided in ways the check does not analyse) is let through,
  // as torch's own assert_no_overlap does.
  const auto status = at::get_overlap_status(t, other);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", t_name,
              " is written in place and must not share memory with ", other_name);
}

void bump_version(const at::Tensor& t) {
  // What torch::autograd::increment_version does; it raises for an inference
  // tensor outside InferenceMode, as torch's in-place ops do.
  if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace pyprune
