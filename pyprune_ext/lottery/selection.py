"""Exact selection of the k smallest-magnitude kept weights over several tensors.

One function, :func:`select_smallest`, serves both per-layer pruning (one tensor)
and global pruning (all prunable tensors, one threshold). Semantics:

* only kept weights (mask True) are candidates; pruned ones stay pruned;
* exactly ``k`` of them are pruned: those with the smallest ``|w|``;
* ties in ``|w|`` are broken by position: tensor index first, then flat (row-major)
  index inside the tensor, earlier positions pruned first. So the result does not
  depend on the sort algorithm, the device or the number of threads.

Two implementations with those semantics:

* the ``torch.ops.pyprune.magnitude_prune(weights, masks, k)`` op, when the
  compiled extension has it (selection without concatenating or sorting);
* :func:`select_smallest_reference`, plain torch: it concatenates the kept
  magnitudes of every tensor into one float64 vector (8 bytes per kept weight,
  on top of the weights) and runs ``kthvalue`` on it. It is the readable
  reference and the fallback, and the memory-hungry one on big models.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

__all__ = ["native_op_available", "select_smallest", "select_smallest_reference"]

_IMPLS = ("auto", "op", "reference")


def native_op_available() -> bool:
    """Whether the compiled extension registers ``torch.ops.pyprune.magnitude_prune``."""
    import pyprune_ext  # noqa: F401  (loads the compiled ops)

    try:
        torch.ops.pyprune.magnitude_prune
    except (AttributeError, RuntimeError):
        return False
    return True


def _check_inputs(weights: Sequence[Tensor], masks: Sequence[Tensor], k: int) -> int:
    """Validates the arguments; returns the number of kept weights."""
    if len(weights) != len(masks):
        raise ValueError(f"select_smallest: {len(weights)} weight tensors but {len(masks)} masks")
    devices = {w.device for w in weights} | {m.device for m in masks}
    if len(devices) > 1:
        raise ValueError(f"select_smallest: all tensors must be on one device, got {sorted(map(str, devices))}")
    kept = 0
    for i, (w, m) in enumerate(zip(weights, masks)):
        if m.dtype != torch.bool:
            raise TypeError(f"select_smallest: masks[{i}] must be bool, got {m.dtype}")
        if w.shape != m.shape:
            raise ValueError(f"select_smallest: weights[{i}] has shape {list(w.shape)} but masks[{i}] has "
                             f"shape {list(m.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"select_smallest: weights[{i}] must be floating point, got {w.dtype}")
        kept += int(m.sum())
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"select_smallest: k must be an int, got {k!r}")
    if not 0 <= k <= kept:
        raise ValueError(f"select_smallest: k={k} but only {kept} weights are still kept "
                         f"(k must lie in [0, {kept}])")
    return kept


def select_smallest_reference(weights: Sequence[Tensor], masks: Sequence[Tensor], k: int) -> List[Tensor]:
    """Plain-torch :func:`select_smallest` (concatenates: see the module docstring)."""
    _check_inputs(weights, masks, k)
    if k == 0:
        return [m.clone() for m in masks]
    # float64 holds every float16/bfloat16/float32 value exactly, so tensors of
    # different dtypes compare exactly.
    magnitudes = [w.detach().abs().to(torch.float64) for w in weights]
    kept_values = torch.cat([a[m] for a, m in zip(magnitudes, masks)])
    if bool(torch.isnan(kept_values).any()):
        raise ValueError("select_smallest: a kept weight is NaN; magnitude pruning cannot rank it")
    threshold = torch.kthvalue(kept_values, k).values  # the k-th smallest kept |w|
    ties_to_prune = k - int((kept_values < threshold).sum())
    del kept_values
    new_masks, ties_seen = [], 0
    for a, m in zip(magnitudes, masks):
        prune = m & (a < threshold)
        tie = (m & (a == threshold)).flatten()
        if ties_seen < ties_to_prune:
            # 1-based rank of each tie in global (tensor, flat index) order.
            rank = torch.cumsum(tie, 0) + ties_seen
            prune |= (tie & (rank <= ties_to_prune)).view_as(m)
        ties_seen += int(tie.sum())
        new_masks.append(m & ~prune)
    return new_masks


def select_smallest(weights: Sequence[Tensor], masks: Sequence[Tensor], k: int, *,
                    impl: str = "auto") -> List[Tensor]:
    """New masks with exactly the ``k`` smallest-``|w|`` kept weights pruned.

    Args:
        weights: the tensors to rank (any floating dtype, one device).
        masks: bool masks of the same shapes (True = kept); not modified.
        k: how many kept weights to prune, ``0 <= k <= kept``.
        impl: ``"auto"`` (the compiled op when present, else the reference),
            ``"op"`` (the compiled op, an error if absent) or ``"reference"``.

    Returns:
        One new bool mask per input, same shapes. Ties are broken by (tensor
        index, flat index), earlier first; already-pruned weights stay pruned.
    """
    if impl not in _IMPLS:
        raise ValueError(f"select_smallest: impl must be one of {_IMPLS}, got {impl!r}")
    use_op = impl == "op" or (impl == "auto" and native_op_available())
    if not use_op:
        return select_smallest_reference(weights, masks, k)
    if not native_op_available():
        raise RuntimeError("select_smallest(impl='op'): this build of pyprune_ext has no "
                           "torch.ops.pyprune.magnitude_prune op")
    kept = _check_inputs(weights, masks, k)
    new_masks, _threshold, _ties = torch.ops.pyprune.magnitude_prune(list(weights), list(masks), k)
    result = list(new_masks)
    # A cheap guard on the op's contract: exactly k weights removed, none revived.
    left = sum(int(r.sum()) for r in result)
    revived = any(bool((r & ~m).any()) for r, m in zip(result, masks))
    if left != kept - k or revived:
        raise RuntimeError(f"torch.ops.pyprune.magnitude_prune broke its contract: {kept - left} weights "
                           f"pruned instead of {k}{' and pruned weights revived' if revived else ''}")
    return result
