"""Masked modules for lottery-ticket training: pruned weights stay exactly zero."""

from .masked import (MaskedConv2d, MaskedLinear, mask_model, masked_modules,
                     unmask_model)

__all__ = ["MaskedConv2d", "MaskedLinear", "mask_model", "masked_modules", "unmask_model"]
