// Function multi-versioning for hot CPU loops. The extension is compiled for
// baseline x86-64 (it must load on any x86-64 machine); a function marked
// PYPRUNE_CPU_CLONES is also compiled for x86-64-v3 (AVX2 + FMA) and x86-64-v4
// (AVX-512), and the loader picks the best version for the running CPU once.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYPRUNE_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYPRUNE_CPU_CLONES
#endif
