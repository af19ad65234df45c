"""Masked modules for lottery-ticket training (pruned weights stay exactly zero), and
attention whose heads can be removed: :class:`MultiheadAttention` (torch's) and
``ShiftedWindowAttention`` (torchvision's Swin v1, loaded on first use since it
imports torchvision)."""

from .attention import MultiheadAttention

from .masked import (MaskedConv2d, MaskedLinear, mask_model, masked_modules,
                     unmask_model)

# ShiftedWindowAttention is not in __all__: a star import must not need torchvision
__all__ = ["MultiheadAttention", "MaskedConv2d", "MaskedLinear", "mask_model", "masked_modules", "unmask_model"]


def __getattr__(name: str):
    if name == "ShiftedWindowAttention":
        from .swin import ShiftedWindowAttention
        return ShiftedWindowAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
