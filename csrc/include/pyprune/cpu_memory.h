// Large CPU outputs backed by transparent huge pages.
//
// Why: a fresh tensor above glibc's mmap threshold (32 MB at most) is a new
// mapping on every call, and filling it costs one page fault per 4 KiB (a
// 4096x4096 float32 weight gradient: 16384 faults, ~18 ms on the 2-core CPU,
// more than the sparse product that fills it). Asking for huge pages before the
// first touch makes that 32 faults. On kernels with THP set to "never", or off
// Linux, this is a plain at::empty.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyprune {

inline at::Tensor empty_cpu_huge_paged(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1), last = end & ~(huge - 1);
  // Only worth it (and only safe to ask) for whole huge pages inside the buffer.
  if (out.nbytes() >= 4 * huge && last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advisory: errors ignored
  }
#endif
  return out;
}

}  // namespace pyprune
