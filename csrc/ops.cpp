// Operator schemas of the pyprune library: the one TORCH_LIBRARY block.
// Backends register their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and
// csrc/cuda; the masked and sparse ops' autograd is C++ (masked_autograd.cpp,
// sparse_masked_conv2d.cpp); pyprune_ext/ops/ adds the fake kernels and the
// Taylor ops' autograd.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <pyprune/build_info.h>
#include <pyprune/masked.h>

TORCH_LIBRARY(pyprune, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "taylor_channel_stats(Tensor a, Tensor g, int channel_dim=1) "
      "-> (Tensor first, Tensor second)",
      tags);
  m.def(
      "taylor_channel_stats_(Tensor a, Tensor g, Tensor(a!) first, "
      "Tensor(b!) second, int channel_dim=1) -> ()",
      tags);
  m.def("taylor_weight_stats(Tensor w, Tensor g_w) -> (Tensor first, Tensor second)",
        tags);

  // Masked and sparse GEMM / convolution for lottery-ticket training.
  // mask is a bool tensor of weight's shape; pruned weights count as zero.
  // where(mask, weight, 0) in one pass, without promoting the bool mask to a
  // float copy first (what weight * mask does).
  m.def("apply_mask(Tensor weight, Tensor mask) -> Tensor", tags);
  // In place, for re-zeroing pruned weights (and optimizer state) after an
  // optimizer step; not differentiable (call it under no_grad).
  m.def("apply_mask_(Tensor(a!) weight, Tensor mask) -> ()", tags);
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias=None) -> Tensor",
        tags);
  // masked_linear's backward: grad_y @ (weight * mask) and (grad_y^T x) * mask.
  m.def("masked_linear_grad_input(Tensor grad_y, Tensor weight, Tensor mask) -> Tensor", tags);
  m.def("masked_linear_grad_weight(Tensor grad_y, Tensor x, Tensor mask) -> Tensor", tags);
  // masked_linear for a weight already zero where mask is False: linear(x,
  // weight, bias) with no masked copy, the weight's gradient masked (the
  // masked modules call it while the weight is unchanged since it was zeroed).
  m.def("masked_linear_prezeroed(Tensor x, Tensor weight, Tensor mask, Tensor? bias=None) -> Tensor", tags);
  // Block size (bytes) of masked_linear's CPU path: sets it when bytes > 0,
  // returns the previous value. For tests and benchmarks.
  m.def("_masked_tile_bytes(int bytes=0) -> int", &pyprune::masked_tile_bytes);
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor mask, Tensor? bias=None, "
      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor",
      tags);
  // The index structure of a 2-d mask in CSR (row_ptr, col_idx) and CSC
  // (col_ptr, row_idx) form, int64; built once per mask change.
  m.def("mask_pack(Tensor mask) -> (Tensor row_ptr, Tensor col_idx, Tensor col_ptr, Tensor row_idx)",
        tags);
  // y = x @ (weight * mask)^T + bias from the packed mask: only unpruned
  // weights are read (gathered from the dense weight on every call).
  m.def(
      "sparse_masked_linear(Tensor x, Tensor weight, Tensor row_ptr, Tensor col_idx, "
      "Tensor col_ptr, Tensor row_idx, Tensor? bias=None) -> Tensor",
      tags);
  // conv2d(x, weight * mask, bias, ...) from the CSR half of
  // mask_pack(mask.view(out, -1)): only unpruned weights are read.
  m.def(
      "sparse_masked_conv2d(Tensor x, Tensor weight, Tensor row_ptr, Tensor col_idx, Tensor? bias=None, "
      "int[2] stride=1, int[2] padding=0, int[2] dilation=1, int groups=1) -> Tensor",
      tags);
  // Its backward: grad_x as a sparse transposed convolution, grad_w at the kept
  // positions only. The CPU kernels need stride 1 and padding <= dilation *
  // (kernel - 1); the CUDA kernels take every geometry.
  m.def(
      "sparse_masked_conv2d_grad_input(Tensor grad_y, Tensor x, Tensor weight, Tensor row_ptr, "
      "Tensor col_idx, int[2] padding, int[2] dilation, int groups, int[2] stride=1) -> Tensor",
      tags);
  m.def(
      "sparse_masked_conv2d_grad_weight(Tensor grad_y, Tensor x, Tensor weight, Tensor row_ptr, "
      "Tensor col_idx, int[2] padding, int[2] dilation, int groups, int[2] stride=1) -> Tensor",
      tags);
  m.def(
      "sparse_masked_linear_grad_input(Tensor grad_y, Tensor weight, Tensor col_ptr, "
      "Tensor row_idx) -> Tensor",
      tags);
  m.def(
      "sparse_masked_linear_grad_weight(Tensor grad_y, Tensor x, Tensor weight, "
      "Tensor row_ptr, Tensor col_idx) -> Tensor",
      tags);
  // The CUDA sparse linear kernels' tiled scheme emulated on the CPU (tests
  // only; csrc/cpu/sparse_masked_linear.cpp): a product out [M, lines] from
  // src [M, K] and one half of a packed mask, entry (r, c) = weight's flat
  // element r * w_line + c * w_index; and the sampled gradient. `sms` stands
  // for the GPU's multiprocessor count (it sets the split-K plan).
  m.def(
      "_sparse_tiles_product_emulated(Tensor src, Tensor weight, Tensor ptr, Tensor idx, int w_line, "
      "int w_index, int lines, int sms, Tensor? init=None) -> Tensor");
  m.def("_sparse_tiles_sampled_emulated(Tensor grad_y, Tensor x, Tensor ptr, Tensor idx, int sms) -> Tensor");
  // The CUDA sparse convolution kernels' tiled scheme emulated on the CPU
  // (tests only; csrc/cpu/sparse_conv_tiles_emulated.cpp), with the arguments of
  // the ops they stand for; stage_bytes stands for the shared memory of a
  // block (small values force many source chunks), sms for the GPU's
  // multiprocessor count (it sets grad_weight's splits).
  m.def(
      "_sparse_conv2d_tiles_emulated(Tensor x, Tensor weight, Tensor row_ptr, Tensor col_idx, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, int stage_bytes) -> Tensor");
  m.def(
      "_sparse_conv2d_grad_input_tiles_emulated(Tensor grad_y, Tensor x, Tensor weight, Tensor row_ptr, "
      "Tensor col_idx, int[2] padding, int[2] dilation, int groups, int[2] stride, int stage_bytes) -> Tensor");
  m.def(
      "_sparse_conv2d_grad_weight_tiles_emulated(Tensor grad_y, Tensor x, Tensor weight, Tensor row_ptr, "
      "Tensor col_idx, int[2] padding, int[2] dilation, int groups, int[2] stride, int sms) -> Tensor");
  // Global magnitude selection for lottery-ticket pruning (one threshold over
  // many weight tensors): among the weights their bool masks keep, the k with
  // the smallest |w| go, ties at the threshold in (list index, flat index)
  // order; NaN counts as the largest magnitude. threshold: that k-th smallest
  // |w| (weights' dtype, 0-d); ties: how many kept weights equal to it are
  // pruned (int64, 0-d). Radix select: no concatenation, no sort.
  m.def("magnitude_threshold(Tensor[] weights, Tensor[] masks, int k) -> (Tensor threshold, Tensor ties)",
        tags);
  m.def(
      "magnitude_prune(Tensor[] weights, Tensor[] masks, int k) "
      "-> (Tensor[] masks, Tensor threshold, Tensor ties)",
      tags);
  m.def(
      "_build_info() -> (bool cuda, str cuda_arch_list, str torch_version, "
      "bool openmp)",
      &pyprune::build_info);
  // The error a CUDA op raises on a GPU whose architecture was not compiled
  // in; an op so that the tests can check it without such a GPU.
  m.def("_missing_arch_message(int major, int minor, str gpu_name) -> str",
        &pyprune::missing_arch_message);
}
