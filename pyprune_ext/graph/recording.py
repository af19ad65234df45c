"""What a recording run keeps of each traced node's value (``node.meta[VALUE]``):
tensors as ``TensorMeta`` (shape and dtype), other values as they are. Shared by
both tracers (``trace`` and ``fallback``) and read by the analysis."""

from __future__ import annotations

import torch

from .layouts import TensorMeta

VALUE = "pyprune_value"


def summarize(value):
    """A run's value with tensors replaced by their shape and dtype."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        items = [summarize(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: summarize(v) for k, v in value.items()}
    return value
