// CPU kernels of the sparse path of masked_linear: only the kept weights are
// read and multiplied, so the work is O(nnz * batch) instead of O(out * in * batch).
//
// Batch-last layout: the kernels work on x^T [in, M] and y^T [out, M] (M = batch
// rows), so every kept weight scales one contiguous row of M values (a vectorised
// axpy) and the sampled gradient is a contiguous dot product. Each output row is
// produced by one thread in index order: deterministic.
#include <pyprune/cpu_clones.h>
#include <pyprune/masked.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

namespace pyprune {
namespace {

// out[m] += sum_j w[j] * src[j][m] for four source rows at once (one pass over out).
template <typename scalar_t>
C10_ALWAYS_INLINE void axpy4_body(scalar_t* __restrict out, const scalar_t* w,
                                  const scalar_t* __restrict s0, const scalar_t* __restrict s1,
                                  const scalar_t* __restrict s2, const scalar_t* __restrict s3,
                                  int64_t len) {
  const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t m = 0; m < len; ++m) out[m] += w0 * s0[m] + w1 * s1[m] + w2 * s2[m] + w3 * s3[m];
}

template <typename scalar_t>
C10_ALWAYS_INLINE void axpy1_body(scalar_t* __restrict out, scalar_t w,
                                  const scalar_t* __restrict src, int64_t len) {
  for (int64_t m = 0; m < len; ++m) out[m] += w * src[m];
}

// 32-byte vectors (GCC vector extensions): an AVX2 register, two SSE ones on
// the baseline build.
template <typename scalar_t> struct Vec32;
template <> struct Vec32<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct Vec32<double> { typedef double type __attribute__((vector_size(32))); };

// acc += a[0:lanes) * b[0:lanes) (unaligned loads; by reference, as a vector
// return value would change the ABI between the per-instruction-set clones).
template <typename scalar_t>
C10_ALWAYS_INLINE void fma32(typename Vec32<scalar_t>::type& acc, const scalar_t* a, const scalar_t* b) {
  typename Vec32<scalar_t>::type va, vb;
  std::memcpy(&va, a, sizeof(va));
  std::memcpy(&vb, b, sizeof(vb));
  acc += va * vb;
}

// dot(a, b) over len values with four independent vector accumulators. An
// `omp simd reduction` loop compiled to one accumulator (bound by the FMA
// latency) and a horizontal sum through memory, slower than the products for
// the batch sizes of training (M = 64..256). Fixed summation order for a
// given len: deterministic.
template <typename scalar_t>
C10_ALWAYS_INLINE scalar_t dot_body(const scalar_t* __restrict a, const scalar_t* __restrict b,
                                    int64_t len) {
  using vec = typename Vec32<scalar_t>::type;
  constexpr int64_t lanes = 32 / sizeof(scalar_t);
  vec acc0{}, acc1{}, acc2{}, acc3{};
  int64_t m = 0;
  for (; m + 4 * lanes <= len; m += 4 * lanes) {
    fma32(acc0, a + m, b + m);
    fma32(acc1, a + m + lanes, b + m + lanes);
    fma32(acc2, a + m + 2 * lanes, b + m + 2 * lanes);
    fma32(acc3, a + m + 3 * lanes, b + m + 3 * lanes);
  }
  for (; m + lanes <= len; m += lanes) fma32(acc0, a + m, b + m);
  const vec acc = (acc0 + acc1) + (acc2 + acc3);
  scalar_t s = 0;
  for (int64_t k = 0; k < lanes; ++k) s += acc[k];
  for (; m < len; ++m) s += a[m] * b[m];
  return s;
}

// Whether row r of a packed index can be read safely: its ptr entries are
// ordered within [0, nnz] and its indices within [0, limit). Checked per row
// right before the row is used (its indices are then in cache for the real
// work), which replaces whole-array validation passes that cost up to a fifth
// of a sparse product at low density. The unsigned compare also catches
// negative indices; `&=` instead of an early exit keeps the loop vectorised.
C10_ALWAYS_INLINE bool row_in_range(const int64_t* ptr, const int64_t* idx, int64_t r, int64_t nnz,
                                    int64_t limit) {
  const int64_t p0 = ptr[r], p1 = ptr[r + 1];
  if (p0 < 0 || p1 < p0 || p1 > nnz) return false;
  bool ok = true;
  for (int64_t p = p0; p < p1; ++p) ok &= static_cast<uint64_t>(idx[p]) < static_cast<uint64_t>(limit);
  return ok;
}

// For output rows [begin, end): out[r] = init[r] (or 0) + sum over p in
// [ptr[r], ptr[r+1]) of w[r * w_row + idx[p] * w_idx] * src[idx[p]], rows of
// length M. The forward uses (w_row, w_idx) = (in, 1): weight[r, col]; the
// input gradient (in columns) uses (1, in): weight[row, r].
// Returns false, leaving the rest undone, at the first row whose index entries
// are out of range (see row_in_range).
template <typename scalar_t>
C10_ALWAYS_INLINE bool gather_axpy_rows_body(scalar_t* out, int64_t begin, int64_t end, int64_t M,
                                             const int64_t* ptr, const int64_t* idx, int64_t nnz,
                                             int64_t src_rows, const scalar_t* src, const scalar_t* init,
                                             const scalar_t* w, int64_t w_row, int64_t w_idx) {
  for (int64_t r = begin; r < end; ++r) {
    if (!row_in_range(ptr, idx, r, nnz, src_rows)) return false;
    scalar_t* o = out + r * M;
    const scalar_t* wr = w + r * w_row;
    std::fill(o, o + M, init ? init[r] : scalar_t(0));
    int64_t p = ptr[r];
    for (; p + 4 <= ptr[r + 1]; p += 4) {
      const scalar_t ws[4] = {wr[idx[p] * w_idx], wr[idx[p + 1] * w_idx], wr[idx[p + 2] * w_idx],
                              wr[idx[p + 3] * w_idx]};
      axpy4_body(o, ws, src + idx[p] * M, src + idx[p + 1] * M, src + idx[p + 2] * M,
                 src + idx[p + 3] * M, M);
    }
    for (; p < ptr[r + 1]; ++p) axpy1_body(o, wr[idx[p] * w_idx], src + idx[p] * M, M);
  }
  return true;
}

// out[r * K + idx[p]] = dot(a[r], b[idx[p]]) for the kept entries of rows [begin, end).
// Returns false at the first row whose index entries are out of range.
template <typename scalar_t>
C10_ALWAYS_INLINE bool sampled_dots_body(scalar_t* out, int64_t begin, int64_t end, int64_t M,
                                         int64_t K, const int64_t* ptr, const int64_t* idx, int64_t nnz,
                                         const scalar_t* a, const scalar_t* b) {
  for (int64_t r = begin; r < end; ++r) {
    if (!row_in_range(ptr, idx, r, nnz, K)) return false;
    for (int64_t p = ptr[r]; p < ptr[r + 1]; ++p) {
      out[r * K + idx[p]] = dot_body(a + r * M, b + idx[p] * M, M);
    }
  }
  return true;
}

// The loops above, compiled per instruction set (see cpu_clones.h).
#define PYPRUNE_SPARSE_LOOPS(T)                                                                  \
  PYPRUNE_CPU_CLONES bool gather_axpy_rows(T* out, int64_t begin, int64_t end, int64_t M,       \
                                           const int64_t* ptr, const int64_t* idx, int64_t nnz,  \
                                           int64_t src_rows, const T* src, const T* init,        \
                                           const T* w, int64_t w_row, int64_t w_idx) {           \
    return gather_axpy_rows_body(out, begin, end, M, ptr, idx, nnz, src_rows, src, init, w,      \
                                 w_row, w_idx);                                                  \
  }                                                                                              \
  PYPRUNE_CPU_CLONES bool sampled_dots(T* out, int64_t begin, int64_t end, int64_t M, int64_t K, \
                                       const int64_t* ptr, const int64_t* idx, int64_t nnz,     \
                                       const T* a, const T* b) {                                 \
    return sampled_dots_body(out, begin, end, M, K, ptr, idx, nnz, a, b);                        \
  }
PYPRUNE_SPARSE_LOOPS(float)
PYPRUNE_SPARSE_LOOPS(double)
#undef PYPRUNE_SPARSE_LOOPS

int64_t rows_per_task(int64_t M) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1)); }

void check_cpu_dtype(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
              ": the CPU sparse path supports float32 and float64, got ", weight.scalar_type());
}

at::Tensor sparse_masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                    const at::Tensor& col_ptr, const at::Tensor& row_idx,
                                    const std::optional<at::Tensor>& bias) {
  const char* op = "sparse_masked_linear";
  check_packed_ends(op, weight, row_ptr, col_idx, /*rows_first=*/true);
  // The CSC half is only used by grad_input, which validates it there.
  check_packed_shapes(op, weight, col_ptr, row_idx, weight.size(1) + 1, "col_ptr", "row_idx");
  check_cpu_dtype(op, weight);
  check_sparse_forward_args(op, x, weight, bias);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  const at::Tensor xt = batch_last(x, in_f);
  const int64_t M = xt.size(1);
  const at::Tensor w = weight.contiguous();
  at::Tensor yt = at::empty({out_f, M}, x.options());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  std::atomic<bool> in_range{true};
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_linear_cpu", [&] {
    const scalar_t* init = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, out_f, rows_per_task(M), [&](int64_t begin, int64_t end) {
      if (!gather_axpy_rows(yt.data_ptr<scalar_t>(), begin, end, M, ptr.const_data_ptr<int64_t>(),
                            idx.const_data_ptr<int64_t>(), idx.numel(), in_f, xt.const_data_ptr<scalar_t>(),
                            init, w.const_data_ptr<scalar_t>(), in_f, 1)) {
        in_range = false;
      }
    });
  });
  check_packed_rows_ok(op, in_range, weight, /*rows_first=*/true);
  return from_batch_last(yt, x, out_f);
}

at::Tensor grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& weight,
                          const at::Tensor& col_ptr, const at::Tensor& row_idx) {
  const char* op = "sparse_masked_linear_grad_input";
  check_packed_ends(op, weight, col_ptr, row_idx, /*rows_first=*/false);
  check_cpu_dtype(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == out_f, op,
              ": grad_y's last dim must be out_features = ", out_f);
  const at::Tensor gyt = batch_last(grad_y.to(weight.scalar_type()), out_f);
  const int64_t M = gyt.size(1);
  const at::Tensor w = weight.contiguous();
  at::Tensor gxt = at::empty({in_f, M}, weight.options());
  const at::Tensor ptr = col_ptr.contiguous(), idx = row_idx.contiguous();
  std::atomic<bool> in_range{true};
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_linear_cpu", [&] {
    at::parallel_for(0, in_f, rows_per_task(M), [&](int64_t begin, int64_t end) {
      if (!gather_axpy_rows(gxt.data_ptr<scalar_t>(), begin, end, M, ptr.const_data_ptr<int64_t>(),
                            idx.const_data_ptr<int64_t>(), idx.numel(), out_f, gyt.const_data_ptr<scalar_t>(),
                            nullptr, w.const_data_ptr<scalar_t>(), 1, in_f)) {
        in_range = false;
      }
    });
  });
  check_packed_rows_ok(op, in_range, weight, /*rows_first=*/false);
  return from_batch_last(gxt, grad_y, in_f);
}

at::Tensor grad_weight_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  const char* op = "sparse_masked_linear_grad_weight";
  check_packed_ends(op, weight, row_ptr, col_idx, /*rows_first=*/true);
  check_cpu_dtype(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  TORCH_CHECK(grad_y.dim() >= 1 && x.dim() >= 1 && grad_y.size(-1) == out_f && x.size(-1) == in_f, op,
              ": grad_y and x must end in out_features and in_features");
  const at::Tensor gyt = batch_last(grad_y.to(weight.scalar_type()), out_f);
  const at::Tensor xt = batch_last(x.to(weight.scalar_type()), in_f);
  TORCH_CHECK(gyt.size(1) == xt.size(1), op, ": grad_y and x must have the same number of rows");
  const int64_t M = xt.size(1);
  at::Tensor gw = at::zeros({out_f, in_f}, weight.options());  // pruned entries: exactly 0
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  std::atomic<bool> in_range{true};
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_linear_cpu", [&] {
    at::parallel_for(0, out_f, rows_per_task(M), [&](int64_t begin, int64_t end) {
      if (!sampled_dots(gw.data_ptr<scalar_t>(), begin, end, M, in_f, ptr.const_data_ptr<int64_t>(),
                        idx.const_data_ptr<int64_t>(), idx.numel(), gyt.const_data_ptr<scalar_t>(),
                        xt.const_data_ptr<scalar_t>())) {
        in_range = false;
      }
    });
  });
  check_packed_rows_ok(op, in_range, weight, /*rows_first=*/true);
  return gw;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("sparse_masked_linear", &sparse_masked_linear_cpu);
  m.impl("sparse_masked_linear_grad_input", &grad_input_cpu);
  m.impl("sparse_masked_linear_grad_weight", &grad_weight_cpu);
}

}  // namespace pyprune
