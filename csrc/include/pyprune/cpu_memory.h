// CPU memory helpers: large outputs backed by transparent huge pages, and
// per-thread scratch buffers reused across calls.
//
// Why: a fresh tensor above glibc's mmap threshold (32 MB at most) is a new
// mapping on every call, and filling it costs one page fault per 4 KiB (a
// 4096x4096 float32 weight gradient: 16384 faults, ~18 ms on the 2-core CPU,
// more than the sparse product that fills it). Asking for huge pages before the
// first touch makes that 32 faults. On kernels with THP set to "never", or off
// Linux, this is a plain at::empty.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include <cstdint>
#include <memory>

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

// Scratch memory of the calling thread, reused from call to call: `bytes`
// bytes, 64-byte aligned, valid until this thread asks again. Why: a
// temporary of a few hundred KB freed at the top of glibc's heap is handed
// back to the kernel, so the next call's first touch page-faults and clears
// it again (11% of a LeNet fc1 sparse forward's profile at 2% density, 5% with
// this; that forward measured 37 -> 35.5 us on one thread). Requests above
// kMaxScratchBytes return nullptr (use a fresh tensor: held memory would
// outweigh the saving).
constexpr int64_t kMaxScratchBytes = int64_t(8) << 20;

inline void* thread_scratch(int64_t bytes) {
  if (bytes > kMaxScratchBytes) return nullptr;
  struct Aligned64 {
    alignas(64) unsigned char data[64];
  };
  thread_local std::unique_ptr<Aligned64[]> buffer;
  thread_local int64_t capacity = 0;
  if (bytes > capacity) {
    capacity = std::max<int64_t>(bytes, 2 * capacity);
    capacity = std::min(capacity, kMaxScratchBytes);
    buffer.reset(new Aligned64[(capacity + 63) / 64]);
  }
  return buffer.get();
}

// A temporary of `count` values of options' dtype: this thread's scratch
// buffer when it fits, else a fresh tensor (kept alive by `owner`).
struct Temporary {
  at::Tensor owner;
  void* data;

  Temporary(int64_t count, const at::TensorOptions& options)
      : data(thread_scratch(count * int64_t(options.dtype().itemsize()))) {
    if (!data) {
      owner = at::empty({count}, options);
      data = owner.data_ptr();
    }
  }

  template <typename T>
  T* as() const { return static_cast<T*>(data); }
};

}  // namespace pyprune
