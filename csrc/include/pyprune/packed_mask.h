// The packed form of a 2-d mask [out, in] (mask_pack): a CSR half (row_ptr,
// col_idx) and a CSC half (col_ptr, row_idx), int64. The sparse ops trust
// nothing in it: every index is range-checked, the indices of a line must be
// strictly increasing (no duplicate weight is counted twice), and the two
// halves must hold the same entries (grad_input reads the CSC half, the
// forward the CSR half). All of it costs one pass over the indices, which the
// CPU kernels fold into the reads they make anyway.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <string>

namespace pyprune {

// The checksum term of one entry (row, col) of a mask with `in` columns:
// murmur3's 32-bit finaliser of row * in + col (mod 2^32). The sum of the
// terms over a half (mod 2^32) is the same for both halves of a consistent
// pack, in any order; a missing, extra or moved entry changes it except with
// probability ~2^-32. 32-bit, so that the CPU loop vectorises (AVX2 has no
// 64-bit multiply).
C10_HOST_DEVICE inline uint32_t packed_key_hash(uint32_t key) {
  key ^= key >> 16;
  key *= 0x85EBCA6Bu;
  key ^= key >> 13;
  key *= 0xC2B2AE35u;
  return key ^ (key >> 16);
}

C10_HOST_DEVICE inline uint32_t packed_entry_hash(int64_t row, int64_t col, int64_t in) {
  return packed_key_hash(static_cast<uint32_t>(row) * static_cast<uint32_t>(in) + static_cast<uint32_t>(col));
}

// Whether line r of a compressed index can be read: ptr[r] <= ptr[r + 1]
// within [0, nnz], and its indices strictly increasing within [0, limit).
// (Unsigned compares catch negative values; `&=` keeps the loop vectorised.)
C10_HOST_DEVICE inline bool packed_line_ok(const int64_t* ptr, const int64_t* idx, int64_t r, int64_t nnz,
                                           int64_t limit) {
  const int64_t p0 = ptr[r], p1 = ptr[r + 1];
  if (p0 < 0 || p1 < p0 || p1 > nnz) return false;
  if (p1 == p0) return true;
  bool ok = static_cast<uint64_t>(idx[p1 - 1]) < static_cast<uint64_t>(limit) && idx[p0] >= 0;
  for (int64_t p = p0 + 1; p < p1; ++p) ok &= idx[p - 1] < idx[p];
  return ok;
}

// Shape/dtype/device checks of one half against a weight [out, in] that need
// no data: ptr [ptr_len], idx 1-d, both int64 on weight's device.
void check_packed_shapes(const char* op, const at::Tensor& weight, const at::Tensor& ptr,
                         const at::Tensor& idx, int64_t ptr_len, const char* ptr_name,
                         const char* idx_name);

// CPU: the shapes, and ptr's two end entries (0 and idx.numel()). The kernels
// check every line with packed_line_ok as they read it and report through
// check_packed_lines_ok. rows_first: the CSR half, else the CSC half.
void check_packed_ends(const char* op, const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx,
                       bool rows_first);

// When !ok: an error naming the first bad entry of the half (its position, its
// value and what is wrong with it). `limit` is the index range ([0, in) for
// the CSR half of a linear weight, [0, in/groups * kh * kw) for a conv).
void check_packed_lines_ok(const char* op, bool ok, const at::Tensor& ptr, const at::Tensor& idx, int64_t limit,
                           bool rows_first);

// CPU: the CSC half of a weight [out, in] fully validated, and both halves
// holding the same entries (checksums compared; on a mismatch, the first
// entry one half has and the other lacks is named). The CSR half must have
// passed packed_line_ok already.
void check_packed_halves_agree(const char* op, const at::Tensor& weight, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx);

// The bool mask of weight's shape ([out, *], the CSR half over its rows
// flattened) that a validated CSR half describes. Any device; symbolic sizes,
// so that torch.compile can trace formulas that use it.
at::Tensor mask_from_pack(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& weight);

}  // namespace pyprune
