"""Rewind points: the training state at iteration k, and restoring it under a mask.

``k = 0`` is the initialisation (the original lottery-ticket reset); ``k > 0`` is
late resetting / rewinding (Frankle et al. 2019). A point always holds the model's
state (parameters and buffers, e.g. BatchNorm statistics) and, as options, the
optimizer state, the LR-scheduler state and the data-order position at step k.

:func:`rewind` copies the saved state into the model, applies the masks (pruned
weights exactly zero), and then checks that every parameter equals the saved
value at kept positions and zero elsewhere: a rewind that did not happen is an
error, never a silent no-op.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..nn import masked_modules
from .data_order import DataOrder
from .io import PathLike, load_tensors, save_tensors
from .masks import MaskSet

__all__ = ["RewindPoint", "rewind"]

_FORMAT = "pyprune_ext.lottery.RewindPoint"


def _mask_buffer_names(model: nn.Module) -> set:
    """State-dict keys of the masked modules' mask buffers: masks come from the
    MaskSet of each level, not from the rewind point."""
    return {f"{name}.mask" if name else "mask" for name in masked_modules(model)}


def model_state(model: nn.Module) -> Dict[str, Tensor]:
    """A detached copy of ``model.state_dict()`` without mask buffers."""
    skip = _mask_buffer_names(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in skip}


@dataclass
class RewindPoint:
    """The state to rewind to. Build it with :meth:`capture`."""

    iteration: int
    model_state: Dict[str, Tensor]
    optimizer_state: Optional[Dict[str, Any]] = None
    scheduler_state: Optional[Dict[str, Any]] = None
    data_state: Optional[Dict[str, Any]] = None

    @classmethod
    def capture(cls, model: nn.Module, iteration: int = 0, optimizer: Optional[torch.optim.Optimizer] = None,
                scheduler=None, data_order: Optional[DataOrder] = None) -> "RewindPoint":
        """Snapshots (copies) the model and, when given, the optimizer, the LR
        scheduler and the data order, as they are at ``iteration``."""
        if iteration < 0:
            raise ValueError(f"RewindPoint: iteration must be >= 0, got {iteration}")
        return cls(
            iteration=int(iteration),
            model_state=model_state(model),
            optimizer_state=None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
            scheduler_state=None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
            data_state=None if data_order is None else data_order.state_dict(),
        )

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "iteration": self.iteration,
                "model_state": {k: v.cpu() for k, v in self.model_state.items()},
                "optimizer_state": self.optimizer_state, "scheduler_state": self.scheduler_state,
                "data_state": self.data_state}

    def save(self, path: PathLike) -> None:
        """Writes the point atomically."""
        save_tensors(self.state_dict(), path)

    @classmethod
    def load(cls, path: PathLike) -> "RewindPoint":
        """Reads a point written by :meth:`save` (``torch.load(weights_only=True)``)."""
        state = load_tensors(path)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a RewindPoint file (no '{_FORMAT}' format tag)")
        return cls(iteration=int(state["iteration"]), model_state=dict(state["model_state"]),
                   optimizer_state=state.get("optimizer_state"), scheduler_state=state.get("scheduler_state"),
                   data_state=state.get("data_state"))


def _load_model_state(model: nn.Module, saved: Dict[str, Tensor]) -> None:
    """Copies ``saved`` into the model's tensors in place, requiring exactly the same
    keys and shapes (no silent partial load)."""
    target = {k: v for k, v in model.state_dict().items() if k not in _mask_buffer_names(model)}
    missing = sorted(set(target) - set(saved))
    unexpected = sorted(set(saved) - set(target))
    if missing or unexpected:
        raise ValueError(f"rewind: the rewind point does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, value in saved.items():
            if target[key].shape != value.shape:
                raise ValueError(f"rewind: {key!r} has shape {list(target[key].shape)} in the model but "
                                 f"{list(value.shape)} in the rewind point")
            target[key].copy_(value)


def _mask_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: MaskSet) -> None:
    """Zeroes the optimizer's per-weight state (moments, momentum) at pruned positions."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            for value in optimizer.state.get(params[name], {}).values():
                if isinstance(value, Tensor) and value.shape == mask.shape:
                    value.mul_(mask.to(value.device))


def _verify(model: nn.Module, saved: Dict[str, Tensor], masks: MaskSet) -> None:
    """Raises unless every parameter equals the saved value masked by its mask."""
    for name, param in model.named_parameters():
        if name not in saved:
            continue
        expected = saved[name].to(param.device)
        if name in masks:
            expected = expected * masks[name].to(param.device)
        if not torch.equal(param.detach(), expected):
            raise RuntimeError(f"rewind: {name!r} does not hold the rewound values after rewinding "
                               "(something re-initialised or replaced the parameter)")


def rewind(model: nn.Module, point: RewindPoint, masks: MaskSet,
           optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
           data_order: Optional[DataOrder] = None) -> nn.Module:
    """Restores ``point`` into ``model`` (in place) and applies ``masks``.

    Args:
        model: the network (masked or not; it is masked on return).
        point: what to restore.
        masks: the masks of the new level; pruned weights are zero on return.
        optimizer: restore the optimizer state saved in ``point`` into it (its
            per-weight state is zeroed at pruned positions). An error if the
            point holds none.
        scheduler: restore the LR-scheduler position (and set the optimizer's
            learning rates to the scheduler's values at that position).
        data_order: restore the data position.

    Returns:
        ``model``. Raises RuntimeError if, afterwards, a weight differs from the
        saved value masked by its mask.
    """
    masks.validate(model)
    wanted = {"optimizer": (optimizer, point.optimizer_state), "scheduler": (scheduler, point.scheduler_state),
              "data_order": (data_order, point.data_state)}
    for what, (target, state) in wanted.items():
        if target is not None and state is None:
            raise ValueError(f"rewind: a {what} was given but the rewind point holds no {what} state "
                             f"(capture it with RewindPoint.capture(..., {what}=...))")
    _load_model_state(model, point.model_state)
    masks.apply(model)
    if optimizer is not None:
        optimizer.load_state_dict(copy.deepcopy(point.optimizer_state))
        _mask_optimizer_state(optimizer, model, masks)
    if scheduler is not None:
        scheduler.load_state_dict(copy.deepcopy(point.scheduler_state))
        # A scheduler only writes learning rates into the optimizer when it steps;
        # without this the first step after rewinding would use the lr of step 0.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    if data_order is not None:
        data_order.load_state_dict(point.data_state)
    _verify(model, point.model_state, masks)
    return model
