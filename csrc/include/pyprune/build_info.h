// What the compiled library holds, and the error a CUDA op raises when the GPU
// it runs on is not among the architectures compiled in (defined in
// csrc/build_info.cpp; the CUDA kernels call it, the tests reach it through
// torch.ops.pyprune._missing_arch_message).
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

namespace pyprune {

// (cuda kernels compiled, their archs as "8.0;9.0", torch version built
// against, openmp).
std::tuple<bool, std::string, std::string, bool> build_info();

// "this GPU (name, compute capability major.minor) is not compiled in: ...
// rebuild with ...".
std::string missing_arch_message(int64_t major, int64_t minor, const std::string& gpu_name);

}  // namespace pyprune
