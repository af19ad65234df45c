"""Masks for parameters the masked modules do not cover (biases, norm weights,
Conv1d/Conv3d or Linear subclasses), used only when a user asks to prune them.

Such a parameter is zeroed at pruned positions in place, and after every
optimizer step (a global step post-hook, as pyprune_ext.nn does for its modules)
it and its optimizer state (momentum, Adam moments) are zeroed there again. Its
gradient is not masked, so this costs one multiply per step and keeps the pruned
entries exactly zero after every step, which is what the forward pass sees.
"""

from __future__ import annotations

import weakref
from typing import Dict, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

# id(parameter) -> (weak reference to it, its bool mask). Keyed by id because
# tensors compare element-wise, which a WeakKeyDictionary would trip over.
_MASKS: Dict[int, Tuple["weakref.ref[Tensor]", Tensor]] = {}
_HOOK = None


def _rezero(optimizer, args, kwargs) -> None:
    if not _MASKS:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = _MASKS.get(id(param))
            if entry is None or entry[0]() is not param:
                continue
            mask = entry[1]
            pruned = mask == 0
            with torch.no_grad():  # masked_fill_, not mul_: a pruned inf or NaN must become 0
                param.masked_fill_(pruned, 0)
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        value.masked_fill_(pruned, 0)


def _forget(key: int) -> None:
    _MASKS.pop(key, None)


def set_param_mask(param: Tensor, mask: Tensor) -> None:
    """Zeroes ``param`` where ``mask`` is False and keeps it zero after optimizer steps."""
    global _HOOK
    mask = mask.to(device=param.device, dtype=torch.bool).clone()
    key = id(param)
    _MASKS[key] = (weakref.ref(param, lambda _ref, key=key: _forget(key)), mask)
    with torch.no_grad():
        param.mul_(mask)
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_rezero)


def param_mask(param: Tensor):
    """The mask registered for ``param`` by :func:`set_param_mask`, or None."""
    entry = _MASKS.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None
