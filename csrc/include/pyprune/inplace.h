// What torch's own in-place ops guarantee, for the pyprune ops that write into
// their arguments (apply_mask_, taylor_channel_stats_): the write is refused
// where autograd could not account for it, it is refused into memory that
// overlaps itself, and it bumps the version counter so that autograd detects a
// tensor modified after it was saved for backward.
//
// The pieces are registered at the dispatch keys torch uses for its own
// in-place ops, so torch.ops.pyprune.* calls get them too:
//   Autograd        refuse_grad_inplace, then redispatch
//   ADInplaceOrView redispatch, then bump_version (runs in InferenceMode too,
//                   where normal tensors still carry a version counter)
//   backends        check_writable, before the first write
#pragma once

#include <ATen/core/Tensor.h>

namespace pyprune {

// Refuses an in-place write into `t` (argument `name` of `op`) while grad mode
// is on and t requires grad: a leaf would be modified behind autograd's back
// (torch refuses the same), and these ops have no derivative to record for a
// non-leaf. The message says to call the op under torch.no_grad().
void refuse_grad_inplace(const char* op, const at::Tensor& t, const char* name);

// Refuses a write into a tensor whose elements share memory (an expand()ed or
// as_strided view): every alias would be written, in an unspecified order.
void check_writable(const char* op, const at::Tensor& t, const char* name);

// Refuses a write into `t` when it shares memory with the read-only `other`.
void check_not_aliased(const char* op, const at::Tensor& t, const char* t_name, const at::Tensor& other,
                       const char* other_name);

// Bumps t's version counter (no-op for an undefined tensor).
void bump_version(const at::Tensor& t);

}  // namespace pyprune
