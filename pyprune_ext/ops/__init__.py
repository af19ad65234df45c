"""Typed wrappers, fake (meta) kernels and autograd for torch.ops.pyprune.*,
one module per op family (the kernels live in csrc/)."""

from .magnitude import (MagnitudePruned, MagnitudeThreshold, kept_count, magnitude_prune,
                        magnitude_threshold)
from .masked import (PackedMask, apply_mask, apply_mask_, mask_pack, masked_conv2d, masked_linear,
                     masked_linear_prezeroed, masked_tile_bytes, sparse_masked_conv2d, sparse_masked_linear)
from .taylor import (stats_dtype, taylor_channel_stats, taylor_channel_stats_,
                     taylor_weight_stats)

__all__ = [
    "MagnitudePruned", "MagnitudeThreshold", "kept_count", "magnitude_prune", "magnitude_threshold",
    "PackedMask", "apply_mask", "apply_mask_", "mask_pack", "masked_conv2d", "masked_linear", "masked_linear_prezeroed",
    "masked_tile_bytes",
    "sparse_masked_conv2d", "sparse_masked_linear",
    "stats_dtype", "taylor_channel_stats", "taylor_channel_stats_", "taylor_weight_stats",
]
