"""Global magnitude selection for lottery-ticket pruning (iterative magnitude
pruning with one threshold over many weight tensors).

``magnitude_prune(weights, masks, k)`` prunes, among the weights that ``masks``
keep, the ``k`` with the smallest ``|w|`` over all tensors together, and returns
new masks. The kernels (csrc/cpu/magnitude.cpp, csrc/cuda/magnitude.cu) find the
k-th smallest ``|w|`` by a radix select on the float's bits: a few histogram
passes over the tensors in place. Nothing is concatenated or sorted, so the
extra memory is a 2048-bin histogram and a few counters per 64K weights,
whatever the model size; the output masks are the only large allocation.

Exact rules:

* Exactly ``k`` kept weights are pruned; weights already pruned stay pruned
  and are never counted.
* Ties: among kept weights whose ``|w|`` equals the threshold, those earlier
  in (position in the list, flat row-major index in the tensor) order go first.
* ``-0.0`` and ``0.0`` have the same magnitude and tie.
* NaN counts as larger than ``inf``; all NaNs tie with each other.
* ``k == 0`` returns copies of the masks; ``k`` larger than the number of kept
  weights is a RuntimeError.

Not differentiable: masks and the threshold are a selection (like ``argmax``);
their outputs never require grad, even when the weights do.

On CUDA every histogram pass is read back to the host to pick the next digit
(a synchronisation per pass), so the ops cannot be captured in a CUDA graph
(``torch.compile(mode="reduce-overhead")``); plain ``torch.compile`` works.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class MagnitudeThreshold(NamedTuple):
    """Where the global magnitude cut falls.

    The pruned weights are the kept weights with ``|w| < threshold`` plus the
    first ``ties`` kept weights with ``|w| == threshold`` in (list index, flat
    index) order.

    threshold: 0-d tensor, the weights' dtype and device: the k-th smallest
        kept ``|w|`` (NaN when the cut reaches NaN weights; 0 when k == 0).
    ties: 0-d int64 tensor on the same device (0 when k == 0).
    """
    threshold: Tensor
    ties: Tensor


class MagnitudePruned(NamedTuple):
    """New masks (contiguous bool, the masks' shapes) and the cut that made them."""
    masks: list[Tensor]
    threshold: Tensor
    ties: Tensor


def magnitude_threshold(weights: Sequence[Tensor], masks: Sequence[Tensor], k: int) -> MagnitudeThreshold:
    """The global threshold of :func:`magnitude_prune` without writing masks.

    Args:
        weights: tensors of any shapes and strides, one dtype (float32, float64,
            float16 or bfloat16) and one device (CPU or CUDA).
        masks: bool tensors, ``masks[i]`` of ``weights[i]``'s shape; True = kept.
        k: how many kept weights to prune, 0 <= k <= number of kept weights.
    """
    return MagnitudeThreshold(*torch.ops.pyprune.magnitude_threshold.default(list(weights), list(masks), k))


def magnitude_prune(weights: Sequence[Tensor], masks: Sequence[Tensor], k: int) -> MagnitudePruned:
    """Prunes the ``k`` kept weights of smallest ``|w|`` over all ``weights``.

    Same arguments as :func:`magnitude_threshold`. Returns new masks (the
    inputs are not modified) with exactly ``k`` fewer True entries in all,
    and the threshold and tie count that define them. Deterministic.
    """
    new_masks, threshold, ties = torch.ops.pyprune.magnitude_prune.default(list(weights), list(masks), k)
    return MagnitudePruned(list(new_masks), threshold, ties)


def kept_count(masks: Sequence[Tensor]) -> int:
    """Number of True entries over all masks (one device sync); with
    :func:`magnitude_prune`, ``k = round(fraction * kept_count(masks))`` prunes
    a fraction of the remaining weights (one IMP level)."""
    if len(masks) == 0:
        return 0
    return int(torch.stack([m.count_nonzero() for m in masks]).sum())


# ---------------------------------------------------------------------------
# Fake kernels: the same argument checks as C++ where they need no data.


def _check_fake(op: str, weights, masks, k) -> None:
    torch._check(len(weights) == len(masks),
                 lambda: f"{op}: weights and masks must be lists of the same length, "
                         f"got {len(weights)} weights and {len(masks)} masks")
    torch._check(k >= 0, lambda: f"{op}: k (the number of weights to prune) must be >= 0, got {k}")
    for i, (w, m) in enumerate(zip(weights, masks)):
        torch._check(w.dtype in _SUPPORTED_DTYPES,
                     lambda: f"{op}: weights[{i}] must be float32, float64, float16 or bfloat16, got {w.dtype}")
        torch._check(w.dtype == weights[0].dtype,
                     lambda: f"{op}: all weights must have the same dtype, got {weights[0].dtype} for "
                             f"weights[0] and {w.dtype} for weights[{i}]")
        torch._check(w.device == weights[0].device and m.device == w.device,
                     lambda: f"{op}: all tensors must be on one device")
        torch._check(m.dtype == torch.bool, lambda: f"{op}: masks[{i}] must be a bool tensor, got {m.dtype}")
        torch._check(m.shape == w.shape,
                     lambda: f"{op}: masks[{i}] must have the shape of weights[{i}] {list(w.shape)}, "
                             f"got {list(m.shape)}")


def _selection_fake(weights) -> tuple[Tensor, Tensor]:
    if len(weights) == 0:
        return torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.long)
    return weights[0].new_empty(()), weights[0].new_empty((), dtype=torch.long)


@torch.library.register_fake("pyprune::magnitude_threshold")
def _magnitude_threshold_fake(weights, masks, k):
    _check_fake("magnitude_threshold", weights, masks, k)
    return _selection_fake(weights)


@torch.library.register_fake("pyprune::magnitude_prune")
def _magnitude_prune_fake(weights, masks, k):
    _check_fake("magnitude_prune", weights, masks, k)
    new_masks = [torch.empty_like(m, memory_format=torch.contiguous_format) for m in masks]
    return (new_masks, *_selection_fake(weights))
