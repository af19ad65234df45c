// 32-byte vectors (GCC vector extensions) for the CPU kernels' hand-blocked
// loops: an AVX2 register, two SSE ones on the baseline build.
#pragma once

namespace pyprune {

template <typename scalar_t> struct Vec32;
template <> struct Vec32<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct Vec32<double> { typedef double type __attribute__((vector_size(32))); };

}  // namespace pyprune
