"""Masked and sparse linear / conv2d ops for lottery-ticket training.

Two paths compute the same function, ``y = x @ (weight * mask)^T + bias``:

* dense-masked (``masked_linear``, ``masked_conv2d``): torch's own GEMM /
  convolution on the masked weight; every device and dtype. On the CPU,
  ``masked_linear`` masks one block of the weight at a time right before the
  GEMM reads it (no full-size masked copy per call; block size:
  :func:`masked_tile_bytes`). Its gradient w.r.t. ``weight`` is
  ``(grad_y^T x) * mask``: exactly zero at pruned positions.
* sparse (``sparse_masked_linear``, ``sparse_masked_conv2d``): the mask is packed once (``mask_pack``) into
  CSR and CSC index arrays; every call reads only the kept weights straight
  from the dense ``weight`` (so the values always follow the optimizer) and
  does O(nnz * batch) work. Backward: a transposed sparse product for
  ``grad_x`` and a sampled dense-dense product for ``grad_weight`` at kept
  positions only. CPU float32/float64; CUDA float32/float64/bfloat16/float16
  (tiled kernels, fp32 sums). ``sparse_masked_conv2d`` is a direct sparse
  convolution (no im2col); its backward is sparse for stride 1 and
  dense-masked otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class PackedMask(NamedTuple):
    """Index structure of a 2-d mask [out, in]: CSR (row_ptr, col_idx) and CSC
    (col_ptr, row_idx), int64, on the mask's device."""
    row_ptr: Tensor
    col_idx: Tensor
    col_ptr: Tensor
    row_idx: Tensor

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()


def mask_pack(mask: Tensor) -> PackedMask:
    """Packs a bool mask for :func:`sparse_masked_linear` (2-d [out, in]) or
    :func:`sparse_masked_conv2d` (4-d [out, in/groups, kh, kw], packed as
    [out, in/groups * kh * kw]). Do it once per mask change and reuse the
    result across steps."""
    if isinstance(mask, Tensor) and mask.dim() > 2:
        mask = mask.reshape(mask.shape[0], math.prod(mask.shape[1:]))  # not -1: also for 0 rows
    return PackedMask(*torch.ops.pyprune.mask_pack.default(mask))


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight`` with zeros where ``mask`` (bool, same shape) is False, in one pass;
    its gradient is the incoming gradient masked the same way."""
    return torch.ops.pyprune.apply_mask.default(weight, mask)


def apply_mask_(weight: Tensor, mask: Tensor) -> Tensor:
    """Zeroes ``weight`` in place where ``mask`` is False (one pass, no float
    copy of the mask); returns ``weight``. Not differentiable: call it under
    ``torch.no_grad()`` on parameters."""
    torch.ops.pyprune.apply_mask_.default(weight, mask)
    return weight


def masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (weight * mask)^T + bias`` for x of shape (..., in); mask is bool of
    weight's shape [out, in]. Pruned weights get exactly zero gradient."""
    return torch.ops.pyprune.masked_linear.default(x, weight, mask, bias)


def masked_linear_prezeroed(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`masked_linear` for a ``weight`` that is already zero where ``mask`` is
    False: ``x @ weight^T + bias`` by torch's own GEMM, with no masked copy of
    the weight; the weight's gradient is masked as :func:`masked_linear`'s. A
    nonzero pruned weight is used as it is (that is the caller's promise)."""
    return torch.ops.pyprune.masked_linear_prezeroed.default(x, weight, mask, bias)


def masked_conv2d(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None,
                  stride: Sequence[int] | int = 1, padding: Sequence[int] | int = 0,
                  dilation: Sequence[int] | int = 1, groups: int = 1) -> Tensor:
    """``conv2d(x, weight * mask, bias, ...)``, including grouped and depthwise
    convolution; mask is bool of weight's shape. Pruned weights get exactly zero
    gradient."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return torch.ops.pyprune.masked_conv2d.default(x, weight, mask, bias, pair(stride), pair(padding),
                                                   pair(dilation), groups)


def sparse_masked_linear(x: Tensor, weight: Tensor, packed: PackedMask,
                         bias: Optional[Tensor] = None) -> Tensor:
    """Same result as :func:`masked_linear` with the mask given in packed form;
    reads only the kept weights. CPU float32/float64; CUDA float32/float64/
    bfloat16/float16 (tiled kernels, fp32 sums)."""
    return torch.ops.pyprune.sparse_masked_linear.default(x, weight, *packed, bias)


def sparse_masked_conv2d(x: Tensor, weight: Tensor, packed: PackedMask, bias: Optional[Tensor] = None,
                         stride: Sequence[int] | int = 1, padding: Sequence[int] | int = 0,
                         dilation: Sequence[int] | int = 1, groups: int = 1) -> Tensor:
    """Same result as :func:`masked_conv2d` for x [N, C, H, W], the mask given
    as ``mask_pack(mask)``; the forward reads only the kept weights (direct
    sparse convolution). CPU float32/float64; CUDA float32/float64/bfloat16/
    float16 (a geometry whose input window of one tile does not fit in shared
    memory, e.g. a huge dilation, takes the dense-masked convolution there).
    The backward is sparse for
    stride 1 (padding <= dilation * (kernel - 1)), else torch's convolution
    backward on ``weight * mask``."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return torch.ops.pyprune.sparse_masked_conv2d.default(x, weight, packed.row_ptr, packed.col_idx, bias,
                                                          pair(stride), pair(padding), pair(dilation), groups)


def masked_tile_bytes(bytes: int = 0) -> int:
    """Block size in bytes of ``masked_linear``'s CPU path (weights larger than
    this are masked one block of rows at a time, never as one full-size
    temporary). Sets it when ``bytes > 0``; returns the previous value."""
    return torch.ops.pyprune._masked_tile_bytes.default(bytes)


# ---------------------------------------------------------------------------
# Fake kernels (masked_conv2d is composite: it needs none).


def _check_devices(op, weight, **tensors):
    """Every tensor on weight's device. Also what stops a CPU weight paired with a
    meta mask: the meta tensor routes the call here, to the fake kernel."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == weight.device,
                         lambda: f"{op}: {name} must be on weight's device ({weight.device}), got {t.device}")


@torch.library.register_fake("pyprune::apply_mask")
def _apply_mask_fake(weight, mask):
    _check_devices("apply_mask", weight, mask=mask)
    torch._check(mask.dtype == torch.bool, lambda: f"apply_mask: mask must be a bool tensor, got {mask.dtype}")
    torch._check(mask.shape == weight.shape,
                 lambda: f"apply_mask: mask must have weight's shape {list(weight.shape)}, got {list(mask.shape)}")
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _check_masked_linear_fake(op, x, weight, mask, bias):
    _check_devices(op, weight, x=x, mask=mask, bias=bias)
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-d [out, in], got {list(weight.shape)}")
    torch._check(mask.dtype == torch.bool, lambda: f"{op}: mask must be a bool tensor, got {mask.dtype}")
    torch._check(mask.shape == weight.shape,
                 lambda: f"{op}: mask must have weight's shape {list(weight.shape)}, got {list(mask.shape)}")
    torch._check(x.dtype == weight.dtype, lambda: f"{op}: x and weight must have the same dtype")
    torch._check(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                 lambda: f"{op}: x's last dim must be in_features = {weight.shape[1]}, got x of shape {list(x.shape)}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")


@torch.library.register_fake("pyprune::masked_linear")
def _masked_linear_fake(x, weight, mask, bias=None):
    _check_masked_linear_fake("masked_linear", x, weight, mask, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("pyprune::masked_linear_prezeroed")
def _masked_linear_prezeroed_fake(x, weight, mask, bias=None):
    _check_masked_linear_fake("masked_linear_prezeroed", x, weight, mask, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("pyprune::masked_linear_grad_input")
def _masked_linear_grad_input_fake(grad_y, weight, mask):
    _check_devices("masked_linear_grad_input", weight, grad_y=grad_y, mask=mask)
    torch._check(grad_y.dim() >= 1 and grad_y.shape[-1] == weight.shape[0],
                 lambda: f"masked_linear_grad_input: grad_y's last dim must be out_features = {weight.shape[0]}")
    return grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1]))


@torch.library.register_fake("pyprune::masked_linear_grad_weight")
def _masked_linear_grad_weight_fake(grad_y, x, mask):
    _check_devices("masked_linear_grad_weight", mask, grad_y=grad_y, x=x)
    torch._check(mask.dim() == 2 and grad_y.shape[-1] == mask.shape[0] and x.shape[-1] == mask.shape[1],
                 lambda: "masked_linear_grad_weight: grad_y, x and mask shapes do not match")
    return x.new_empty(mask.shape)


@torch.library.register_fake("pyprune::apply_mask_")
def _apply_mask_inplace_fake(weight, mask):
    _apply_mask_fake(weight, mask)


@torch.library.register_fake("pyprune::mask_pack")
def _mask_pack_fake(mask):
    torch._check(mask.dtype == torch.bool and mask.dim() == 2,
                 lambda: f"mask_pack: mask must be a 2-d bool tensor [out, in], got {mask.dtype} of shape {list(mask.shape)}")
    nnz = torch.library.get_ctx().new_dynamic_size()
    out_f, in_f = mask.shape
    new = lambda n: mask.new_empty((n,), dtype=torch.long)  # noqa: E731
    return new(out_f + 1), new(nnz), new(in_f + 1), new(nnz)


def _check_packed_fake(op, weight, ptr, idx, ptr_len, ptr_name):
    _check_devices(op, weight, **{ptr_name: ptr, "the packed indices": idx})
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-d [out, in], got {list(weight.shape)}")
    torch._check(ptr.dtype == torch.long and idx.dtype == torch.long and ptr.dim() == 1 and idx.dim() == 1,
                 lambda: f"{op}: the packed mask must be 1-d int64 tensors (from mask_pack)")
    torch._check(ptr.shape[0] == ptr_len,
                 lambda: f"{op}: {ptr_name} must have {ptr_len} entries for a weight of shape {list(weight.shape)}")


@torch.library.register_fake("pyprune::sparse_masked_linear")
def _sparse_masked_linear_fake(x, weight, row_ptr, col_idx, col_ptr, row_idx, bias=None):
    op = "sparse_masked_linear"
    _check_devices(op, weight, x=x, bias=bias)
    _check_packed_fake(op, weight, row_ptr, col_idx, weight.shape[0] + 1, "row_ptr")
    _check_packed_fake(op, weight, col_ptr, row_idx, weight.shape[1] + 1, "col_ptr")
    torch._check(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                 lambda: f"{op}: x's last dim must be in_features = {weight.shape[1]}, got x of shape {list(x.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("pyprune::sparse_masked_conv2d")
def _sparse_masked_conv2d_fake(x, weight, row_ptr, col_idx, bias=None, stride=(1, 1), padding=(0, 0),
                               dilation=(1, 1), groups=1):
    op = "sparse_masked_conv2d"
    _check_devices(op, weight, x=x, bias=bias)
    torch._check(weight.dim() == 4, lambda: f"{op}: weight must be 4-d [out, in/groups, kh, kw], got {list(weight.shape)}")
    out = weight.shape[0]
    torch._check(x.dim() == 4 and x.shape[1] == weight.shape[1] * groups,
                 lambda: f"{op}: x must be [N, C, H, W] with C = {weight.shape[1] * groups} channels, got {list(x.shape)}")
    _check_packed_fake(op, weight.reshape(out, -1), row_ptr, col_idx, out + 1, "row_ptr")
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.new_empty((x.shape[0], out, *size))


def _sparse_conv2d_grad_fake(op, grad_y, x, weight, row_ptr, col_idx):
    _check_devices(op, weight, grad_y=grad_y, x=x)
    torch._check(weight.dim() == 4 and x.dim() == 4 and grad_y.dim() == 4,
                 lambda: f"{op}: grad_y, x and weight must be 4-d")
    _check_packed_fake(op, weight.reshape(weight.shape[0], -1), row_ptr, col_idx, weight.shape[0] + 1, "row_ptr")


@torch.library.register_fake("pyprune::sparse_masked_conv2d_grad_input")
def _sparse_conv2d_grad_input_fake(grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups,
                                   stride=(1, 1)):
    _sparse_conv2d_grad_fake("sparse_masked_conv2d_grad_input", grad_y, x, weight, row_ptr, col_idx)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyprune::sparse_masked_conv2d_grad_weight")
def _sparse_conv2d_grad_weight_fake(grad_y, x, weight, row_ptr, col_idx, padding, dilation, groups,
                                   stride=(1, 1)):
    _sparse_conv2d_grad_fake("sparse_masked_conv2d_grad_weight", grad_y, x, weight, row_ptr, col_idx)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("pyprune::sparse_masked_linear_grad_input")
def _grad_input_fake(grad_y, weight, col_ptr, row_idx):
    _check_devices("sparse_masked_linear_grad_input", weight, grad_y=grad_y)
    _check_packed_fake("sparse_masked_linear_grad_input", weight, col_ptr, row_idx, weight.shape[1] + 1, "col_ptr")
    return weight.new_empty((*grad_y.shape[:-1], weight.shape[1]))


@torch.library.register_fake("pyprune::sparse_masked_linear_grad_weight")
def _grad_weight_fake(grad_y, x, weight, row_ptr, col_idx):
    _check_devices("sparse_masked_linear_grad_weight", weight, grad_y=grad_y, x=x)
    _check_packed_fake("sparse_masked_linear_grad_weight", weight, row_ptr, col_idx, weight.shape[0] + 1, "row_ptr")
    return torch.empty_like(weight)


# Autograd of apply_mask, masked_linear and sparse_masked_linear is registered in
# C++ (csrc/masked_autograd.cpp, csrc/masked_linear.cpp): a Python-registered
# formula costs ~100 us per forward+backward, as much as a LeNet-size layer.
