// The CPU masking loops (csrc/cpu/apply_mask.cpp), shared by the CPU kernels
// that mask weights block by block. Branch-free, multi-versioned for AVX2 /
// AVX-512 (cpu_clones.h); a pruned weight becomes +0.0 whatever its value.
#pragma once

#include <cstdint>

namespace pyprune {

// out[i] = m[i] ? w[i] : 0 (out and w must not overlap).
void select_kept(float* out, const float* w, const bool* m, int64_t n);
void select_kept(double* out, const double* w, const bool* m, int64_t n);

// w[i] = m[i] ? w[i] : 0, in place.
void zero_pruned(float* w, const bool* m, int64_t n);
void zero_pruned(double* w, const bool* m, int64_t n);

}  // namespace pyprune
