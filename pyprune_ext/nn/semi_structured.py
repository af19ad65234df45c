"""2:4 masks on NVIDIA's sparse tensor cores, through PyTorch's semi-structured
sparse tensors (``torch.sparse.to_sparse_semi_structured``: CUTLASS or
cuSPARSELt kernels, compute capability 8.0+, float16 / bfloat16).

:class:`pyprune_ext.nn.MaskedLinear` uses this path on its own when its mask is
2:4 along ``in_features`` (as ``prune_by_magnitude(..., pattern="2:4")`` makes
it) and the layer is on a supporting GPU (``semi_structured=False`` turns it
off). The weight, already zero at its pruned positions, is compressed once and
kept until the weight or the mask changes (by their version counters; in
training, so once per optimizer step). The forward runs the sparse GEMM; the
backward is dense-masked (``grad_x = grad_y @ weight``, ``grad_w`` masked):
PyTorch's semi-structured tensors have no transposed sparse product for it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


def unsupported_reason(weight: Tensor, mask: Tensor) -> Optional[str]:
    """Why a Linear weight with this mask cannot take the 2:4 path, or None."""
    if weight.device.type != "cuda":
        return f"the weight is on {weight.device.type}, not CUDA"
    if weight.dtype not in DTYPES:
        return f"the weight is {weight.dtype}; the 2:4 path runs float16 and bfloat16"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no semi-structured sparse tensors"
    capability = torch.cuda.get_device_capability(weight.device)
    if capability < MIN_CAPABILITY:
        return f"the GPU has compute capability {capability}; 2:4 sparse tensor cores need 8.0+"
    from ..lottery.nm import NMPattern, is_nm, nm_problem  # lazy: the lottery package imports nn

    pattern = NMPattern(2, 4)
    problem = nm_problem(tuple(mask.shape), pattern)
    if problem:
        return problem
    if not is_nm(mask, pattern):
        return "the mask keeps more than 2 of 4 consecutive inputs somewhere"
    return None


def compress(weight: Tensor) -> Tensor:
    """The semi-structured form of a weight that is zero at its pruned positions
    (PyTorch compresses the nonzeros: a third nonzero in a group of four would be
    dropped, so callers pass the masked weight)."""
    return torch.sparse.to_sparse_semi_structured(weight.detach())


class SemiStructuredLinear(torch.autograd.Function):
    """``linear(x, compressed, bias)`` forward; the masked layer's gradients."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, compressed, weight_zeroed: bool):
        ctx.save_for_backward(x, weight, mask)
        ctx.weight_zeroed = weight_zeroed
        ctx.has_bias = bias is not None
        return F.linear(x, compressed, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            masked = weight if ctx.weight_zeroed else torch.ops.pyprune.apply_mask(weight, mask)
            grad_x = grad_y @ masked
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.pyprune.masked_linear_grad_weight(grad_y, x, mask)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_w, None, grad_b, None, None
