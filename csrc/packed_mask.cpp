// Validation of packed masks (see pyprune/packed_mask.h) and the mask a pack
// describes. The per-line checks run inside the kernels; what is here runs on
// the error path (naming the first bad entry) or once per call (the checksums
// that tie the two halves together).
#include <pyprune/cpu_clones.h>
#include <pyprune/packed_mask.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <sstream>

namespace pyprune {
namespace {

struct HalfNames {
  const char* ptr;
  const char* idx;
  const char* line;   // what a ptr entry indexes: "row" (CSR) or "column" (CSC)
  const char* index;  // what an idx entry is
};

HalfNames names_of(bool rows_first) {
  return rows_first ? HalfNames{"row_ptr", "col_idx", "row", "column"}
                    : HalfNames{"col_ptr", "row_idx", "column", "row"};
}

// The first problem of a half whose lines did not all pass packed_line_ok.
std::string first_problem(const at::Tensor& ptr_t, const at::Tensor& idx_t, int64_t limit, bool rows_first) {
  const HalfNames n = names_of(rows_first);
  const at::Tensor pc = ptr_t.contiguous(), ic = idx_t.contiguous();
  const int64_t* ptr = pc.const_data_ptr<int64_t>();
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const int64_t lines = pc.numel() - 1, nnz = ic.numel();
  std::ostringstream why;
  for (int64_t r = 0; r < lines; ++r) {
    const int64_t p0 = ptr[r], p1 = ptr[r + 1];
    if (p0 < 0 || p1 < p0 || p1 > nnz) {
      why << n.ptr << "[" << r << "] = " << p0 << ", " << n.ptr << "[" << r + 1 << "] = " << p1
          << ": the entries must be non-decreasing within [0, " << nnz << "]";
      return why.str();
    }
    for (int64_t p = p0; p < p1; ++p) {
      if (idx[p] < 0 || idx[p] >= limit) {
        why << n.idx << "[" << p << "] = " << idx[p] << " (" << n.line << " " << r << ") is outside [0, " << limit
            << ")";
        return why.str();
      }
      if (p > p0 && idx[p] == idx[p - 1]) {
        why << n.idx << "[" << p << "] = " << idx[p] << " repeats " << n.idx << "[" << p - 1 << "] in " << n.line
            << " " << r << ": a duplicate entry (its weight would count twice)";
        return why.str();
      }
      if (p > p0 && idx[p] < idx[p - 1]) {
        why << n.idx << "[" << p << "] = " << idx[p] << " follows " << n.idx << "[" << p - 1 << "] = " << idx[p - 1]
            << " in " << n.line << " " << r << ": the " << n.index << " indices of a " << n.line
            << " must be increasing";
        return why.str();
      }
    }
  }
  return "no problem found";
}

// The sum of packed_key_hash(idx[p] * scale + offset) over a line: the terms
// of CSR row r are (scale, offset) = (1, r * in), of CSC column c (in, c).
// Multi-versioned: with AVX2 the hashes are computed 8 at a time.
PYPRUNE_CPU_CLONES uint32_t line_checksum(const int64_t* idx, int64_t count, uint32_t scale, uint32_t offset) {
  uint32_t sum = 0;
  for (int64_t p = 0; p < count; ++p) sum += packed_key_hash(static_cast<uint32_t>(idx[p]) * scale + offset);
  return sum;
}

// The checksum of a half (see packed_entry_hash) and whether all its lines
// pass packed_line_ok. One pass over the indices, split between threads.
std::pair<uint32_t, bool> half_checksum(const at::Tensor& ptr_t, const at::Tensor& idx_t, int64_t limit,
                                        bool rows_first, int64_t in) {
  const at::Tensor pc = ptr_t.contiguous(), ic = idx_t.contiguous();
  const int64_t* ptr = pc.const_data_ptr<int64_t>();
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const int64_t lines = pc.numel() - 1, nnz = ic.numel();
  std::atomic<bool> ok{true};
  // ~64K entries per task: below that a thread wake-up costs more than the pass.
  const int64_t per_line = std::max<int64_t>(1, nnz / std::max<int64_t>(1, lines));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_line);
  const uint32_t sum = at::parallel_reduce(
      0, lines, grain, uint32_t(0),
      [&](int64_t begin, int64_t end, uint32_t acc) {
        for (int64_t r = begin; r < end; ++r) {
          if (!packed_line_ok(ptr, idx, r, nnz, limit)) {
            ok = false;
            return acc;
          }
          const uint32_t line = static_cast<uint32_t>(r);
          acc += rows_first ? line_checksum(idx + ptr[r], ptr[r + 1] - ptr[r], 1, line * static_cast<uint32_t>(in))
                            : line_checksum(idx + ptr[r], ptr[r + 1] - ptr[r], static_cast<uint32_t>(in), line);
        }
        return acc;
      },
      [](uint32_t a, uint32_t b) { return a + b; });
  return {sum, ok.load()};
}

}  // namespace

void check_packed_shapes(const char* op, const at::Tensor& weight, const at::Tensor& ptr,
                         const at::Tensor& idx, int64_t ptr_len, const char* ptr_name,
                         const char* idx_name) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-d [out, in], got ", weight.sizes());
  for (const auto* t : {&ptr, &idx}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, op, ": ",
                t == &ptr ? ptr_name : idx_name,
                " must be a 1-d int64 tensor (from mask_pack), got ", t->scalar_type(), " of shape ",
                t->sizes());
    TORCH_CHECK(t->device() == weight.device(), op, ": ", t == &ptr ? ptr_name : idx_name,
                " must be on weight's device (", weight.device(), "), got ", t->device());
  }
  TORCH_CHECK(ptr.size(0) == ptr_len, op, ": ", ptr_name, " must have ", ptr_len,
              " entries for a weight of shape ", weight.sizes(), ", got ", ptr.size(0),
              " (was the mask packed for another layer?)");
}

void check_packed_ends(const char* op, const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx,
                       bool rows_first) {
  const HalfNames n = names_of(rows_first);
  const int64_t lines = weight.size(rows_first ? 0 : 1);
  check_packed_shapes(op, weight, ptr, idx, lines + 1, n.ptr, n.idx);
  TORCH_CHECK(ptr.is_cpu(), op, ": ", n.ptr, " must be on the CPU here");
  const at::Tensor p = ptr.contiguous();
  const int64_t* data = p.const_data_ptr<int64_t>();
  TORCH_CHECK(data[0] == 0 && data[lines] == idx.numel(), op, ": ", n.ptr, " must start at 0 and end at ",
              n.idx, ".numel() = ", idx.numel(), ", got ", n.ptr, "[0] = ", data[0], " and ", n.ptr, "[", lines,
              "] = ", data[lines]);
}

void check_packed_lines_ok(const char* op, bool ok, const at::Tensor& ptr, const at::Tensor& idx, int64_t limit,
                           bool rows_first) {
  if (ok) return;
  TORCH_CHECK(false, op, ": the packed mask is not one mask_pack builds: ",
              first_problem(ptr, idx, limit, rows_first), " (pack the mask with mask_pack for this layer)");
}

void check_packed_halves_agree(const char* op, const at::Tensor& weight, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const at::Tensor& col_ptr, const at::Tensor& row_idx) {
  check_packed_ends(op, weight, col_ptr, row_idx, /*rows_first=*/false);
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(col_idx.numel() == row_idx.numel(), op, ": the CSR half has ", col_idx.numel(),
              " entries and the CSC half ", row_idx.numel(),
              ": they must describe the same mask (pack both with one mask_pack call)");
  const auto [csr_sum, csr_ok] = half_checksum(row_ptr, col_idx, in, /*rows_first=*/true, in);
  check_packed_lines_ok(op, csr_ok, row_ptr, col_idx, in, /*rows_first=*/true);
  const auto [csc_sum, csc_ok] = half_checksum(col_ptr, row_idx, out, /*rows_first=*/false, in);
  check_packed_lines_ok(op, csc_ok, col_ptr, row_idx, out, /*rows_first=*/false);
  if (csr_sum == csc_sum) return;
  const at::Tensor from_csr = mask_from_pack(row_ptr, col_idx, weight);
  const at::Tensor from_csc = mask_from_pack(col_ptr, row_idx, weight.t()).t();
  const at::Tensor differ = (from_csr != from_csc).nonzero();
  TORCH_CHECK(differ.size(0) > 0, op, ": the CSR and CSC halves have different checksums but the same entries");
  const int64_t r = differ[0][0].item<int64_t>(), c = differ[0][1].item<int64_t>();
  const bool in_csr = from_csr[r][c].item<bool>();
  TORCH_CHECK(false, op, ": the CSR half (row_ptr, col_idx) and the CSC half (col_ptr, row_idx) describe "
              "different masks: entry (row ", r, ", column ", c, ") is in the ", in_csr ? "CSR" : "CSC",
              " half only (pack both halves with one mask_pack call)");
}

// (Symbolic sizes throughout: torch.compile traces the sparse conv's backward,
// which uses this, with them.)
at::Tensor mask_from_pack(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& weight) {
  at::Tensor mask = at::zeros_like(weight, weight.options().dtype(at::kBool).memory_format(at::MemoryFormat::Contiguous));
  c10::SymInt per_row = 1;  // a product, not numel / size(0): no division by an empty dim
  for (int64_t d = 1; d < weight.dim(); ++d) per_row *= weight.sym_size(d);
  const at::Tensor rows = at::repeat_interleave_symint(at::arange(c10::Scalar(weight.sym_size(0)), row_ptr.options()),
                                                       row_ptr.diff(), 0, col_idx.sym_numel());
  return mask.reshape({-1}).index_fill_(0, rows * per_row + col_idx, true).view_as(weight);
}

}  // namespace pyprune
