// CPU kernels of the sparse path of masked_linear: only the kept weights are
// read and multiplied, so the work is O(nnz * batch) instead of O(out * in * batch).
//
// Products (forward and grad_input) work on batch tiles: the batch-first source
// ([M, in] as PyTorch stores x) is first rearranged into tiles of W <= 32 batch
// rows, [in, W] each, small enough to stay in L2. Then each task takes a chunk of
// output lines, gathers their kept weights once, and runs them over every tile,
// computing W outputs per line at once with the sums in registers (every kept
// weight scales one contiguous W-row of a tile); the results go back to the
// batch-first output. This replaced whole-matrix transposes of x and y
// (x.t().contiguous()) that cost 40-50% of a low-density product.
// The sampled gradient works on x^T and grad_y^T (batch padded to a vector): a
// contiguous dot product per kept weight.
// Every output value is computed by one thread in a fixed order: the products
// give the same bits whatever the thread count and whatever else is in the
// batch; the sampled gradient whatever the thread count.
#include <pyprune/cpu_clones.h>
#include <pyprune/cpu_memory.h>
#include <pyprune/cpu_vec.h>
#include <pyprune/masked.h>
#include <pyprune/masked_nonfinite.h>
#include <pyprune/packed_mask.h>
#include <pyprune/sparse_tiles.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pyprune {
namespace {

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

// One output line for W = V * lanes batch rows: out[0:W) = init + sum over
// k < count of vals[k] * tile[idx[k]][0:W). Two accumulator sets (even and odd
// k) keep 2V independent FMA chains in flight.
template <typename scalar_t, int V>
C10_ALWAYS_INLINE void tile_line(scalar_t* __restrict out, scalar_t init, const int64_t* idx, int64_t count,
                                 const scalar_t* __restrict tile, const scalar_t* vals) {
  using vec = typename Vec32<scalar_t>::type;
  constexpr int64_t lanes = 32 / sizeof(scalar_t), W = V * lanes;
  vec even[V], odd[V];
  for (int v = 0; v < V; ++v) {
    even[v] = vec{} + init;
    odd[v] = vec{};
  }
  int64_t k = 0;
  for (; k + 2 <= count; k += 2) {
    const scalar_t w0 = vals[k], w1 = vals[k + 1];
    const scalar_t* t0 = tile + idx[k] * W;
    const scalar_t* t1 = tile + idx[k + 1] * W;
    for (int v = 0; v < V; ++v) {
      vec x0, x1;
      std::memcpy(&x0, t0 + v * lanes, sizeof(vec));
      std::memcpy(&x1, t1 + v * lanes, sizeof(vec));
      even[v] += w0 * x0;
      odd[v] += w1 * x1;
    }
  }
  if (k < count) {
    const scalar_t w0 = vals[k];
    const scalar_t* t0 = tile + idx[k] * W;
    for (int v = 0; v < V; ++v) {
      vec x0;
      std::memcpy(&x0, t0 + v * lanes, sizeof(vec));
      even[v] += w0 * x0;
    }
  }
  for (int v = 0; v < V; ++v) {
    const vec sum = even[v] + odd[v];
    std::memcpy(out + v * lanes, &sum, sizeof(vec));
  }
}

// Lines [begin, end) over one tile into out [end - begin, W]; vals holds the
// kept values of these lines, from entry ptr[begin] on.
template <typename scalar_t, int V>
C10_ALWAYS_INLINE void tile_lines_body(scalar_t* out, const scalar_t* tile, int64_t begin, int64_t end,
                                       const int64_t* ptr, const int64_t* idx, const scalar_t* vals,
                                       const scalar_t* init) {
  constexpr int64_t W = V * (32 / sizeof(scalar_t));
  for (int64_t line = begin; line < end; ++line) {
    tile_line<scalar_t, V>(out + (line - begin) * W, init ? init[line] : scalar_t(0), idx + ptr[line],
                           ptr[line + 1] - ptr[line], tile, vals + (ptr[line] - ptr[begin]));
  }
}

// vals[p - ptr[begin]] = w[line * w_row + idx[p] * w_idx] for the kept entries
// of lines [begin, end): the values of a chunk of lines, gathered once and
// reused for every batch tile. Returns false, leaving the rest undone, at the
// first line whose index entries are out of range (see packed_line_ok).
template <typename scalar_t>
C10_ALWAYS_INLINE bool gather_values_body(scalar_t* vals, int64_t begin, int64_t end, const int64_t* ptr,
                                          const int64_t* idx, int64_t nnz, int64_t idx_limit, const scalar_t* w,
                                          int64_t w_row, int64_t w_idx) {
  for (int64_t line = begin; line < end; ++line) {
    if (!packed_line_ok(ptr, idx, line, nnz, idx_limit)) return false;
    const scalar_t* wr = w + line * w_row;
    scalar_t* v = vals + (ptr[line] - ptr[begin]);
    for (int64_t p = ptr[line]; p < ptr[line + 1]; ++p) v[p - ptr[line]] = wr[idx[p] * w_idx];
  }
  return true;
}

// In-register transpose of a lanes x lanes block (rows[i][j] -> rows[j][i]):
// log2(lanes) rounds of interleaving row i with row i + lanes / 2.
template <typename vec, typename index_vec, int lanes>
C10_ALWAYS_INLINE void transpose_block_body(vec* rows, index_vec lo, index_vec hi) {
  for (int round = 1; round < lanes; round *= 2) {
    vec next[lanes];
    for (int i = 0; i < lanes / 2; ++i) {
      next[2 * i] = __builtin_shuffle(rows[i], rows[i + lanes / 2], lo);
      next[2 * i + 1] = __builtin_shuffle(rows[i], rows[i + lanes / 2], hi);
    }
    for (int i = 0; i < lanes; ++i) rows[i] = next[i];
  }
}

C10_ALWAYS_INLINE void transpose_block(Vec32<float>::type* rows) {
  typedef int32_t index_vec __attribute__((vector_size(32)));
  transpose_block_body<Vec32<float>::type, index_vec, 8>(rows, index_vec{0, 8, 1, 9, 2, 10, 3, 11},
                                                         index_vec{4, 12, 5, 13, 6, 14, 7, 15});
}

C10_ALWAYS_INLINE void transpose_block(Vec32<double>::type* rows) {
  typedef int64_t index_vec __attribute__((vector_size(32)));
  transpose_block_body<Vec32<double>::type, index_vec, 4>(rows, index_vec{0, 4, 1, 5}, index_vec{2, 6, 3, 7});
}

// dst[c * W + m] = src[m * ld + c] for m < rows (zeros for m in [rows, W)), c < cols:
// `rows` batch rows of a batch-first matrix into a batch-last tile, a
// lanes x lanes block at a time, 64 tile lines (in L1) at a time.
template <typename scalar_t>
C10_ALWAYS_INLINE void rows_to_tile(scalar_t* __restrict dst, int64_t W, const scalar_t* __restrict src,
                                    int64_t ld, int64_t rows, int64_t cols) {
  using vec = typename Vec32<scalar_t>::type;
  constexpr int64_t lanes = 32 / sizeof(scalar_t), col_block = 64;
  for (int64_t c0 = 0; c0 < cols; c0 += col_block) {
    const int64_t c1 = std::min(cols, c0 + col_block);
    const int64_t full_end = c0 + (c1 - c0) / lanes * lanes;
    for (int64_t m0 = 0; m0 < W; m0 += lanes) {
      const int64_t n_rows = std::max<int64_t>(0, std::min(lanes, rows - m0));
      for (int64_t c = c0; c < full_end; c += lanes) {
        vec block[lanes];
        for (int64_t i = 0; i < lanes; ++i) {
          block[i] = vec{};
          if (i < n_rows) std::memcpy(&block[i], src + (m0 + i) * ld + c, sizeof(vec));
        }
        transpose_block(block);
        for (int64_t j = 0; j < lanes; ++j) std::memcpy(dst + (c + j) * W + m0, &block[j], sizeof(vec));
      }
      for (int64_t c = full_end; c < c1; ++c) {
        for (int64_t i = 0; i < lanes; ++i) dst[c * W + m0 + i] = i < n_rows ? src[(m0 + i) * ld + c] : 0;
      }
    }
  }
}

// dst[m * ld + j] = src[j * W + m] for m < rows, j < lines: back to batch-first.
template <typename scalar_t>
C10_ALWAYS_INLINE void tile_to_rows(scalar_t* __restrict dst, int64_t ld, const scalar_t* __restrict src,
                                    int64_t W, int64_t rows, int64_t lines) {
  using vec = typename Vec32<scalar_t>::type;
  constexpr int64_t lanes = 32 / sizeof(scalar_t);
  const int64_t full_lines = lines / lanes * lanes;
  for (int64_t m0 = 0; m0 < rows; m0 += lanes) {
    const int64_t n_rows = std::min(lanes, rows - m0);
    for (int64_t j = 0; j < full_lines; j += lanes) {
      vec block[lanes];
      for (int64_t k = 0; k < lanes; ++k) std::memcpy(&block[k], src + (j + k) * W + m0, sizeof(vec));
      transpose_block(block);
      for (int64_t i = 0; i < n_rows; ++i) std::memcpy(dst + (m0 + i) * ld + j, &block[i], sizeof(vec));
    }
    for (int64_t j = full_lines; j < lines; ++j) {
      for (int64_t i = 0; i < n_rows; ++i) dst[(m0 + i) * ld + j] = src[j * W + m0 + i];
    }
  }
}

// sums[j] = dot(a, b + idx[j] * M) for j < lanes, M a multiple of lanes: one
// vector accumulator per dot (independent FMA chains), then one transpose turns
// the accumulators into a vector of their sums. A horizontal sum per dot cost
// more than its products at training batch sizes.
template <typename scalar_t>
C10_ALWAYS_INLINE void dots_by_lanes(typename Vec32<scalar_t>::type& sums, const scalar_t* __restrict a,
                                     const scalar_t* __restrict b, const int64_t* idx, int64_t M) {
  using vec = typename Vec32<scalar_t>::type;
  constexpr int64_t lanes = 32 / sizeof(scalar_t);
  vec acc[lanes];
  for (int64_t j = 0; j < lanes; ++j) acc[j] = vec{};
  for (int64_t m = 0; m < M; m += lanes) {
    vec av;
    std::memcpy(&av, a + m, sizeof(vec));
    for (int64_t j = 0; j < lanes; ++j) {
      vec bv;
      std::memcpy(&bv, b + idx[j] * M + m, sizeof(vec));
      acc[j] += av * bv;
    }
  }
  transpose_block(acc);  // acc[i][j]: lane i of dot j's accumulator
  sums = acc[0];
  for (int64_t i = 1; i < lanes; ++i) sums += acc[i];
}

// Rows [begin, end) of out [*, K]: zeros, and dot(a[r], b[idx[p]]) (length M, a
// multiple of lanes) at the kept entries. Each thread zero-fills its own rows
// right before writing them (a fresh output's first touch, split between
// threads, instead of a separate zeroing pass). Returns false at the first row
// whose index entries are out of range.
template <typename scalar_t>
C10_ALWAYS_INLINE bool sampled_dots_body(scalar_t* out, int64_t begin, int64_t end, int64_t M,
                                         int64_t K, const int64_t* ptr, const int64_t* idx, int64_t nnz,
                                         const scalar_t* a, const scalar_t* b) {
  constexpr int64_t lanes = 32 / sizeof(scalar_t);
  for (int64_t r = begin; r < end; ++r) {
    if (!packed_line_ok(ptr, idx, r, nnz, K)) return false;
    scalar_t* row = out + r * K;
    std::fill(row, row + K, scalar_t(0));
    int64_t p = ptr[r];
    for (; p + lanes <= ptr[r + 1]; p += lanes) {
      typename Vec32<scalar_t>::type sums;
      dots_by_lanes(sums, a + r * M, b, idx + p, M);
      for (int64_t j = 0; j < lanes; ++j) row[idx[p + j]] = sums[j];
    }
    for (; p < ptr[r + 1]; ++p) row[idx[p]] = dot_body(a + r * M, b + idx[p] * M, M);
  }
  return true;
}

// The loops above, compiled per instruction set (see cpu_clones.h).
#define PYPRUNE_SPARSE_LOOPS(T)                                                                      \
  PYPRUNE_CPU_CLONES void tile_lines(T* out, int V, const T* tile, int64_t begin, int64_t end,        \
                                     const int64_t* ptr, const int64_t* idx, const T* vals,          \
                                     const T* init) {                                                \
    if (V == 1) return tile_lines_body<T, 1>(out, tile, begin, end, ptr, idx, vals, init);           \
    if (V == 2) return tile_lines_body<T, 2>(out, tile, begin, end, ptr, idx, vals, init);           \
    tile_lines_body<T, 4>(out, tile, begin, end, ptr, idx, vals, init);                              \
  }                                                                                                  \
  PYPRUNE_CPU_CLONES bool gather_values(T* vals, int64_t begin, int64_t end, const int64_t* ptr,      \
                                        const int64_t* idx, int64_t nnz, int64_t idx_limit,          \
                                        const T* w, int64_t w_row, int64_t w_idx) {                  \
    return gather_values_body(vals, begin, end, ptr, idx, nnz, idx_limit, w, w_row, w_idx);          \
  }                                                                                                  \
  PYPRUNE_CPU_CLONES void to_tile(T* dst, int64_t W, const T* src, int64_t ld, int64_t rows,         \
                                  int64_t cols) {                                                    \
    rows_to_tile(dst, W, src, ld, rows, cols);                                                       \
  }                                                                                                  \
  PYPRUNE_CPU_CLONES void from_tile(T* dst, int64_t ld, const T* src, int64_t W, int64_t rows,       \
                                    int64_t lines) {                                                 \
    tile_to_rows(dst, ld, src, W, rows, lines);                                                      \
  }                                                                                                  \
  PYPRUNE_CPU_CLONES bool sampled_dots(T* out, int64_t begin, int64_t end, int64_t M, int64_t K,     \
                                       const int64_t* ptr, const int64_t* idx, int64_t nnz,         \
                                       const T* a, const T* b) {                                     \
    return sampled_dots_body(out, begin, end, M, K, ptr, idx, nnz, a, b);                            \
  }
PYPRUNE_SPARSE_LOOPS(float)
PYPRUNE_SPARSE_LOOPS(double)
#undef PYPRUNE_SPARSE_LOOPS

int64_t rows_per_task(int64_t M) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1)); }

// A batch tile of a sparse product: batch rows [m0, m0 + rows), V vectors
// (W = V * lanes >= rows values) per tile line, stored at `offset` in the tiled
// source as [src_cols, W].
struct BatchTile {
  int64_t m0, rows;
  int V;
  int64_t offset;
};

// Source tiles up to this size (they should stay in L2 with room to spare).
constexpr int64_t kTileBytes = 512 * 1024;

// Tiles of the widest width (4 vectors: 32 floats, 16 doubles) that keeps a
// [src_cols, W] tile within kTileBytes, narrower for the last few rows. Depends on
// the shapes only, never on the thread count.
std::vector<BatchTile> plan_batch_tiles(int64_t M, int64_t src_cols, int64_t elem_bytes) {
  const int64_t lanes = 32 / elem_bytes;
  int max_v = 4;
  while (max_v > 1 && src_cols * max_v * 32 > kTileBytes) max_v /= 2;
  std::vector<BatchTile> tiles;
  int64_t offset = 0;
  for (int64_t m0 = 0; m0 < M;) {
    int V = 1;
    while (V < max_v && V * lanes < M - m0) V *= 2;
    const int64_t rows = std::min(M - m0, V * lanes);
    tiles.push_back({m0, rows, V, offset});
    m0 += rows;
    offset += src_cols * V * lanes;
  }
  return tiles;
}

// Lines per task: enough that the chunk's gathered values (~256 KiB of floats)
// amortise the trip through every batch tile, few enough to give each thread
// several chunks (small layers are otherwise split unevenly between threads).
int64_t lines_per_chunk(int64_t lines, int64_t nnz) {
  const int64_t per_line = std::max<int64_t>(1, nnz / std::max<int64_t>(lines, 1));
  const int64_t by_values = std::max<int64_t>(8, 65536 / per_line);
  const int64_t by_threads = std::max<int64_t>(8, lines / (8 * at::get_num_threads()));
  return std::min(by_values, by_threads);
}

// dst [cols, W] = rows [0, rows) of src [*, cols] (leading dimension ld) as a
// batch-last tile (see rows_to_tile), split by columns between threads when large:
// below ~1M values a second parallel region costs more than the (vectorised)
// rearrangement.
template <typename scalar_t>
void to_tile_parallel(scalar_t* dst, int64_t W, const scalar_t* src, int64_t ld, int64_t rows, int64_t cols) {
  const int64_t grain = W * cols < (1 << 20) ? cols : 256;
  at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
    to_tile(dst + begin * W, W, src + begin, ld, rows, end - begin);
  });
}

// out [M, lines] (batch-first) = the sparse product of src [M, src_cols]:
// out[m, line] = init[line] (or 0) + sum over p in [ptr[line], ptr[line+1]) of
// w[line * w_row + idx[p] * w_idx] * src[m, idx[p]]. The forward uses
// (w_row, w_idx) = (in, 1): weight[line, col]; the input gradient (lines = input
// columns) uses (1, in): weight[row, line]. The source is first rearranged into
// batch tiles, then each task takes a chunk of lines, gathers their kept values
// once and runs them over every tile, writing the results back batch-first.
// Returns false if some line's index entries are out of range.
bool sparse_product(at::Tensor& out, const at::Tensor& src, const at::Tensor& ptr, const at::Tensor& idx,
                    const at::Tensor& w, int64_t w_row, int64_t w_idx, const at::Tensor& init) {
  const int64_t M = src.size(0), src_cols = src.size(1), lines = out.size(1), nnz = idx.numel();
  const std::vector<BatchTile> tiles = plan_batch_tiles(M, src_cols, src.element_size());
  if (tiles.empty()) return true;
  const int64_t lanes = 32 / src.element_size();
  const int64_t tiled_count = tiles.back().offset + src_cols * tiles.back().V * lanes;
  const Temporary tiled(tiled_count, src.options());
  const int64_t chunk = lines_per_chunk(lines, nnz);
  const int64_t n_chunks = (lines + chunk - 1) / chunk;
  // Below ~32K multiply-adds a thread wake-up costs more than it saves.
  const int64_t grain = nnz * M < (1 << 15) ? n_chunks : 1;
  std::atomic<bool> in_range{true};
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "sparse_masked_linear_cpu", [&] {
    scalar_t* tiled_data = tiled.as<scalar_t>();
    for (const BatchTile& t : tiles) {
      to_tile_parallel(tiled_data + t.offset, t.V * lanes, src.const_data_ptr<scalar_t>() + t.m0 * src_cols,
                       src_cols, t.rows, src_cols);
    }
    const int64_t* p = ptr.const_data_ptr<int64_t>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    const scalar_t* bias = init.defined() ? init.const_data_ptr<scalar_t>() : nullptr;
    // Threads take the next chunk as they finish one (not a fixed share each):
    // on a shared machine a descheduled thread then delays one chunk, not half
    // the work. Each chunk's lines are still summed by one thread in one order.
    std::atomic<int64_t> next_chunk{0};
    at::parallel_for(0, n_chunks, grain, [&](int64_t, int64_t) {
      std::vector<scalar_t> lines_buf(chunk * 4 * lanes), vals;
      for (int64_t c; (c = next_chunk.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
        const int64_t l0 = c * chunk, l1 = std::min(lines, l0 + chunk);
        // The chunk's value count comes from ptr before gather_values checks its lines.
        if (p[l0] < 0 || p[l1] < p[l0] || p[l1] > nnz) {
          in_range = false;
          return;
        }
        vals.resize(p[l1] - p[l0]);
        if (!gather_values(vals.data(), l0, l1, p, ix, nnz, src_cols, w.const_data_ptr<scalar_t>(), w_row,
                           w_idx)) {
          in_range = false;
          return;
        }
        for (const BatchTile& t : tiles) {
          tile_lines(lines_buf.data(), t.V, tiled_data + t.offset, l0, l1, p, ix, vals.data(), bias);
          from_tile(out.data_ptr<scalar_t>() + t.m0 * lines + l0, lines, lines_buf.data(), t.V * lanes, t.rows,
                    l1 - l0);
        }
      }
    });
  });
  return in_range;
}

// y viewed with `like`'s leading dimensions and `last` as its last one.
at::Tensor with_leading_dims(const at::Tensor& y, const at::Tensor& like, int64_t last) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape.back() = last;
  return y.view(shape);
}

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
  // The CSC half is read only by grad_input, but must describe the mask the
  // forward uses: a stale or foreign half would give a wrong gradient.
  check_packed_halves_agree(op, weight, row_ptr, col_idx, col_ptr, row_idx);
  check_cpu_dtype(op, weight);
  check_sparse_forward_args(op, x, weight, bias);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  const at::Tensor x_rows = as_rows(x, in_f).contiguous();
  at::Tensor y = at::empty({x_rows.size(0), out_f}, x.options());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const bool in_range =
      sparse_product(y, x_rows, row_ptr.contiguous(), col_idx.contiguous(), weight.contiguous(), in_f, 1, b);
  check_packed_lines_ok(op, in_range, row_ptr, col_idx, in_f, /*rows_first=*/true);
  nonfinite_like_dense_linear(y, x_rows, weight, row_ptr, col_idx);
  return with_leading_dims(y, x, out_f);
}

at::Tensor grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& weight,
                          const at::Tensor& col_ptr, const at::Tensor& row_idx) {
  const char* op = "sparse_masked_linear_grad_input";
  check_packed_ends(op, weight, col_ptr, row_idx, /*rows_first=*/false);
  check_cpu_dtype(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == out_f, op,
              ": grad_y's last dim must be out_features = ", out_f);
  const at::Tensor gy_rows = as_rows(grad_y.to(weight.scalar_type()), out_f).contiguous();
  at::Tensor gx = at::empty({gy_rows.size(0), in_f}, weight.options());
  const bool in_range = sparse_product(gx, gy_rows, col_ptr.contiguous(), row_idx.contiguous(),
                                       weight.contiguous(), 1, in_f, at::Tensor());
  check_packed_lines_ok(op, in_range, col_ptr, row_idx, out_f, /*rows_first=*/false);
  nonfinite_like_dense_linear_grad_input(gx, gy_rows, weight, col_ptr, row_idx);
  return with_leading_dims(gx, grad_y, in_f);
}

at::Tensor grad_weight_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  const char* op = "sparse_masked_linear_grad_weight";
  check_packed_ends(op, weight, row_ptr, col_idx, /*rows_first=*/true);
  check_cpu_dtype(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  TORCH_CHECK(grad_y.dim() >= 1 && x.dim() >= 1 && grad_y.size(-1) == out_f && x.size(-1) == in_f, op,
              ": grad_y and x must end in out_features and in_features");
  const at::Tensor gy_rows = as_rows(grad_y.to(weight.scalar_type()), out_f).contiguous();
  const at::Tensor x_rows = as_rows(x.to(weight.scalar_type()), in_f).contiguous();
  TORCH_CHECK(gy_rows.size(0) == x_rows.size(0), op, ": grad_y and x must have the same number of rows");
  // Batch-last copies [features, M rounded up to a vector]: every kept weight's
  // gradient is then one contiguous dot product (the zero padding adds exact zeros).
  const int64_t lanes = 32 / weight.element_size();
  const int64_t M = (x_rows.size(0) + lanes - 1) / lanes * lanes;
  const Temporary both((out_f + in_f) * M, weight.options());
  at::Tensor gw = empty_cpu_huge_paged({out_f, in_f}, weight.options());  // every entry written (pruned: exactly 0)
  const at::Tensor ptr = row_ptr.contiguous(), idx = col_idx.contiguous();
  std::atomic<bool> in_range{true};
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sparse_masked_linear_cpu", [&] {
    scalar_t* gyt = both.as<scalar_t>();
    scalar_t* xt = gyt + out_f * M;
    to_tile_parallel(gyt, M, gy_rows.const_data_ptr<scalar_t>(), out_f, gy_rows.size(0), out_f);
    to_tile_parallel(xt, M, x_rows.const_data_ptr<scalar_t>(), in_f, x_rows.size(0), in_f);
    at::parallel_for(0, out_f, rows_per_task(M), [&](int64_t begin, int64_t end) {
      if (!sampled_dots(gw.data_ptr<scalar_t>(), begin, end, M, in_f, ptr.const_data_ptr<int64_t>(),
                        idx.const_data_ptr<int64_t>(), idx.numel(), gyt, xt)) {
        in_range = false;
      }
    });
  });
  check_packed_lines_ok(op, in_range, row_ptr, col_idx, in_f, /*rows_first=*/true);
  return gw;
}


// ---------------------------------------------------------------------------
// Tests only: the CUDA sparse linear kernels' tiled scheme (pyprune/sparse_tiles.h) run on
// the CPU, block by block and thread by thread, with the same index functions:
// the split plan, the line cursors (binary searches), the stage layouts, the
// chunk walks, the split sums in order and the 16-thread butterfly of the
// sampled gradient. The tests compare it with the plain float64 product, so
// the decomposition the GPU runs is checked on every CPU run; only the warp
// intrinsics themselves (ballot, shuffles) are left to the GPU tests.
// Slow by design (one scalar loop per emulated thread): tests only.
namespace emulated {


namespace st = sparse_tiles;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The stage of src[m0.., k0..] as the block's threads fill it; cells no thread
// writes stay NaN, so a gap in stage_coords shows up in the results.
template <typename scalar_t, typename acc_t>
void stage_source(std::vector<acc_t>& stage, const scalar_t* src, int64_t M, int64_t K, int64_t m0, int64_t k0) {
  std::fill(stage.begin(), stage.end(), std::numeric_limits<acc_t>::quiet_NaN());
  for (int t = 0; t < st::kThreads; ++t) {
    for (int step = 0; step < st::kStageSteps; ++step) {
      int k, m;
      st::stage_coords(t / 32, t % 32, step, k, m);
      const int64_t gm = m0 + m, gk = k0 + k;
      stage[k * st::kStageStride + m] = (gm < M && gk < K) ? static_cast<acc_t>(src[gm * K + gk]) : acc_t(0);
    }
  }
}

struct Cursor {
  int64_t next = 0, end = 0;
};

// cursors[group][j] of the lines of one tile within [first, last).
std::vector<Cursor> tile_cursors(int64_t line0, int64_t R, const int64_t* ptr, const int64_t* idx, int64_t first,
                                 int64_t last) {
  std::vector<Cursor> cursors(st::kLineGroups * st::kLinesPerThread);
  for (int g = 0; g < st::kLineGroups; ++g) {
    for (int j = 0; j < st::kLinesPerThread; ++j) {
      const int64_t r = st::tile_line(line0, g, j);
      if (r >= R) continue;
      Cursor& c = cursors[g * st::kLinesPerThread + j];
      c.next = st::lower_bound_index(idx, ptr[r], ptr[r + 1], first);
      c.end = st::lower_bound_index(idx, c.next, ptr[r + 1], last);
    }
  }
  return cursors;
}

template <typename scalar_t>
void check_emulation_args(const at::Tensor& src, const at::Tensor& ptr, const at::Tensor& idx, int64_t lines) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && src.device().is_cpu(),
              "_sparse_tiles_emulated: src must be a contiguous 2-d CPU tensor");
  TORCH_CHECK(ptr.scalar_type() == at::kLong && idx.scalar_type() == at::kLong && ptr.is_contiguous() &&
                  idx.is_contiguous() && ptr.numel() == lines + 1,
              "_sparse_tiles_emulated: ptr [lines + 1] and idx must be contiguous int64");
}

at::Tensor product_emulated(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& ptr,
                            const at::Tensor& idx, int64_t w_line, int64_t w_index, int64_t R, int64_t sms,
                            const std::optional<at::Tensor>& init) {
  const int64_t M = src.size(0), K = src.size(1);
  at::Tensor out = at::empty({M, R}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "_sparse_tiles_emulated", [&] {
    using acc_t = acc_type_t<scalar_t>;
    check_emulation_args<scalar_t>(src, ptr, idx, R);
    const scalar_t* x = src.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t *p_ptr = ptr.const_data_ptr<int64_t>(), *p_idx = idx.const_data_ptr<int64_t>();
    const scalar_t* b = init.has_value() && init->defined() ? init->const_data_ptr<scalar_t>() : nullptr;
    const st::SplitPlan plan = st::plan_splits(R, M, K, sms);
    std::vector<acc_t> ws(plan.splits * M * R, acc_t(0)), stage(st::kTileK * st::kStageStride);
    for (int64_t line0 = 0; line0 < R; line0 += st::kTileR) {
      for (int64_t m0 = 0; m0 < M; m0 += st::kTileM) {
        for (int64_t z = 0; z < plan.splits; ++z) {
          int64_t first, last;
          st::split_columns(z, plan.chunks_per_split, K, first, last);
          std::vector<Cursor> cursors = tile_cursors(line0, R, p_ptr, p_idx, first, last);
          // acc[(group * kLinesPerThread + j) * kTileM + m], m = 4 * sub + i
          std::vector<acc_t> acc(cursors.size() * st::kTileM, acc_t(0));
          for (int64_t k0 = first; k0 < last; k0 += st::kTileK) {
            const int64_t k1 = std::min<int64_t>(k0 + st::kTileK, last);
            stage_source(stage, x, M, K, m0, k0);
            for (size_t slot = 0; slot < cursors.size(); ++slot) {
              const int64_t r = st::tile_line(line0, slot / st::kLinesPerThread, slot % st::kLinesPerThread);
              Cursor& c = cursors[slot];
              for (; c.next < c.end && p_idx[c.next] < k1; ++c.next) {
                const int64_t col = p_idx[c.next];
                const acc_t v = static_cast<acc_t>(w[r * w_line + col * w_index]);
                for (int m = 0; m < st::kTileM; ++m) acc[slot * st::kTileM + m] += v * stage[(col - k0) * st::kStageStride + m];
              }
            }
          }
          for (size_t slot = 0; slot < cursors.size(); ++slot) {
            const int64_t r = st::tile_line(line0, slot / st::kLinesPerThread, slot % st::kLinesPerThread);
            for (int m = 0; m < st::kTileM && r < R && m0 + m < M; ++m) {
              ws[(z * M + m0 + m) * R + r] = acc[slot * st::kTileM + m];
            }
          }
        }
      }
    }
    scalar_t* y = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < M * R; ++i) {
      acc_t s = 0;
      for (int64_t z = 0; z < plan.splits; ++z) s += ws[z * M * R + i];
      y[i] = static_cast<scalar_t>(b ? s + static_cast<acc_t>(b[i % R]) : s);
    }
    const auto is_finite = [](scalar_t v) { return std::isfinite(static_cast<acc_t>(v)); };
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t r = 0; r < R; ++r) {
        if (st::meets_nonfinite_through_pruned(x + m * K, K, p_idx, p_ptr[r], p_ptr[r + 1], is_finite)) {
          y[m * R + r] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
        }
      }
    }
  });
  return out;
}

at::Tensor sampled_emulated(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& ptr, const at::Tensor& idx,
                            int64_t sms) {
  const int64_t M = x.size(0), K = x.size(1), R = gy.size(1);
  at::Tensor gw = at::zeros({R, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "_sparse_tiles_emulated", [&] {
    using acc_t = acc_type_t<scalar_t>;
    check_emulation_args<scalar_t>(x, ptr, idx, R);
    TORCH_CHECK(gy.is_contiguous() && gy.size(0) == M, "_sparse_tiles_emulated: gy must be contiguous [M, lines]");
    const scalar_t *g_data = gy.const_data_ptr<scalar_t>(), *x_data = x.const_data_ptr<scalar_t>();
    const int64_t *p_ptr = ptr.const_data_ptr<int64_t>(), *p_idx = idx.const_data_ptr<int64_t>();
    const st::SplitPlan plan = st::plan_splits(R, st::kTileM, K, sms);
    std::vector<acc_t> sums(idx.numel(), std::numeric_limits<acc_t>::quiet_NaN());
    std::vector<acc_t> stage(st::kTileK * st::kStageStride), lines(st::kTileM * st::kGroupStageStride);
    for (int64_t line0 = 0; line0 < R; line0 += st::kTileR) {
      for (int64_t z = 0; z < plan.splits; ++z) {
        int64_t first, last;
        st::split_columns(z, plan.chunks_per_split, K, first, last);
        const std::vector<Cursor> start = tile_cursors(line0, R, p_ptr, p_idx, first, last);
        for (int64_t m0 = 0; m0 < M; m0 += st::kTileM) {
          // g[(group * kLinesPerThread + j) * kTileM + 4 * sub + i], through the lines stage
          std::vector<acc_t> g(start.size() * st::kTileM);
          for (int j = 0; j < st::kLinesPerThread; ++j) {
            for (int t = 0; t < st::kThreads; ++t) {
              for (int step = 0; step < st::kGroupStageSteps; ++step) {
                int m, line;
                st::group_stage_coords(t, step, m, line);
                const int64_t gm = m0 + m, r = line0 + st::kGroup * j + line;
                lines[m * st::kGroupStageStride + line] =
                    (gm < M && r < R) ? static_cast<acc_t>(g_data[gm * R + r]) : acc_t(0);
              }
            }
            for (int group = 0; group < st::kLineGroups; ++group) {
              for (int m = 0; m < st::kTileM; ++m) {
                g[(group * st::kLinesPerThread + j) * st::kTileM + m] = lines[m * st::kGroupStageStride + group];
              }
            }
          }
          std::vector<Cursor> cursors = start;
          for (int64_t k0 = first; k0 < last; k0 += st::kTileK) {
            const int64_t k1 = std::min<int64_t>(k0 + st::kTileK, last);
            stage_source(stage, x_data, M, K, m0, k0);
            for (size_t slot = 0; slot < cursors.size(); ++slot) {
              for (Cursor& c = cursors[slot]; c.next < c.end && p_idx[c.next] < k1; ++c.next) {
                const int64_t col = p_idx[c.next] - k0;
                acc_t part[st::kGroup];  // each thread's 4-term sum, then the butterfly
                for (int sub = 0; sub < st::kGroup; ++sub) {
                  const acc_t* gs = &g[slot * st::kTileM + 4 * sub];
                  const acc_t* row = &stage[col * st::kStageStride + 4 * sub];
                  part[sub] = gs[0] * row[0] + gs[1] * row[1] + gs[2] * row[2] + gs[3] * row[3];
                }
                for (int offset = st::kGroup / 2; offset > 0; offset /= 2) {
                  acc_t next[st::kGroup];
                  for (int sub = 0; sub < st::kGroup; ++sub) next[sub] = part[sub] + part[sub ^ offset];
                  std::copy(next, next + st::kGroup, part);
                }
                sums[c.next] = (m0 == 0 ? acc_t(0) : sums[c.next]) + part[0];
              }
            }
          }
        }
      }
    }
    scalar_t* out = gw.data_ptr<scalar_t>();
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t p = p_ptr[r]; p < p_ptr[r + 1]; ++p) out[r * K + p_idx[p]] = static_cast<scalar_t>(sums[p]);
    }
  });
  return gw;
}

}  // namespace emulated

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("sparse_masked_linear", &sparse_masked_linear_cpu);
  m.impl("sparse_masked_linear_grad_input", &grad_input_cpu);
  m.impl("sparse_masked_linear_grad_weight", &grad_weight_cpu);
  m.impl("_sparse_tiles_product_emulated", &emulated::product_emulated);
  m.impl("_sparse_tiles_sampled_emulated", &emulated::sampled_emulated);
}

}  // namespace pyprune
