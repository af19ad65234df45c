"""Masked modules for lottery-ticket training (pruned weights stay exactly zero), and a
multi-head attention whose heads can be removed."""

from .attention import MultiheadAttention

from .masked import (MaskedConv2d, MaskedLinear, mask_model, masked_modules,
                     unmask_model)

__all__ = ["MultiheadAttention", "MaskedConv2d", "MaskedLinear", "mask_model", "masked_modules", "unmask_model"]
