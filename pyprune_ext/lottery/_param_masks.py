"""Masks for parameters the masked modules do not cover (biases, norm weights,
Conv1d/Conv3d or Linear subclasses), used only when a user asks to prune them.

Such a parameter is zeroed at pruned positions in place, and after every
optimizer step it and its optimizer state (momentum, Adam moments) are zeroed
there again, by one :class:`pyprune_ext.masking.ZeroKeeper` for the whole
process. Its gradient is not masked, so this costs one pass per step and keeps
the pruned entries exactly zero after every step, which is what the forward
pass sees. The keeper holds parameters weakly: a mask lives as long as its
parameter.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..masking import ZeroKeeper

_KEEPER = ZeroKeeper()


def set_param_mask(param: Tensor, mask: Tensor) -> None:
    """Zeroes ``param`` where ``mask`` is False and keeps it zero after optimizer
    steps (replacing a mask set before)."""
    _KEEPER.set_mask(param, mask)


def param_mask(param: Tensor) -> Optional[Tensor]:
    """The mask registered for ``param`` by :func:`set_param_mask`, or None."""
    return _KEEPER.mask_of(param)
