"""Keep chosen entries of parameters at zero through training.

One service for everything in the library that prunes by masking
(:mod:`pyprune_ext.nn`'s masked layers, the lottery's masks for other
parameters, :class:`pyprune_ext.taylor.TaylorPruner`'s masked channels), and for
users who prune their own way::

    keeper = ZeroKeeper()
    keeper.add_mask(model.fc.weight, keep)             # bool, the weight's shape: False = zero
    keeper.add_indices(model.conv.weight, 0, [3, 7])   # output channels 3 and 7
    for x, y in loader:
        ...
        optimizer.step()        # afterwards: those entries are 0, and so is the optimizer's state there
    keeper.remove()             # or: with ZeroKeeper() as keeper: ...

Why after the step: an optimizer moves a zeroed weight even when its gradient
is zero (momentum, Adam moments and weight decay carried over from before
pruning), and a user may write to the weights. So after every
``optimizer.step()`` the held entries are zeroed again (``ops.apply_mask_`` /
``index_fill_``: a pruned inf or NaN becomes 0, not NaN), and so are the
optimizer's state tensors shaped like the parameter (momentum buffers, moments).

Lifetime: by default a keeper acts after every step of every optimizer in the
process, through one global step post-hook for the whole library;
``attach(optimizer)`` restricts it to the optimizers it is attached to. Neither
the global hook nor an optimizer's hook keeps a keeper alive, and a keeper holds
its parameters by weak reference: a dropped pruner or masked model is garbage
collected as usual, and its zeros stop being kept. ``remove()`` (or leaving a
``with`` block) stops a keeper explicitly.

Only the parameters of the optimizer that stepped are touched: two models with
two optimizers do not interfere.

A weak reference to a parameter stops ``torch.utils.swap_tensors`` on it, which
``module.to()`` uses only when
``torch.__future__.set_swap_module_params_on_conversion(True)`` is set (or for
tensor subclasses such as DTensor): move such a model before masking it, or
discard its parameters first and add them again after the move.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops

__all__ = ["ZeroKeeper"]

Indices = Union[int, Sequence[int], range, Tensor]

# Every change to what a keeper holds for a parameter gets a new number, so an
# optimizer's state is known to be clean for exactly that version (a number is
# never reused, unlike id() of a dead parameter).
_VERSIONS = itertools.count()

# Keepers acting after every optimizer step of the process (weakly held).
_GLOBAL_KEEPERS: "weakref.WeakSet[ZeroKeeper]" = weakref.WeakSet()
_GLOBAL_HOOK = None


def _after_any_step(optimizer, args, kwargs) -> None:
    """The library's one global step post-hook."""
    if not _GLOBAL_KEEPERS:  # the usual case when nothing is masked: one length check
        return
    keepers = [keeper for keeper in list(_GLOBAL_KEEPERS) if keeper._held]
    if keepers:
        _zero_after_step(keepers, optimizer)


def _zero_after_step(keepers: "List[ZeroKeeper]", optimizer) -> None:
    """Lets the keepers holding parameters of ``optimizer`` zero them (the others,
    e.g. another model's, are skipped by one set operation each)."""
    stepped = _param_ids(optimizer)
    keepers = [keeper for keeper in keepers if not stepped.isdisjoint(keeper._held)]
    if keepers:
        with torch.no_grad():  # once per step, not per keeper: entering it costs microseconds
            for keeper in keepers:
                keeper._after_step(optimizer, stepped)


def _ensure_global_hook() -> None:
    global _GLOBAL_HOOK
    if _GLOBAL_HOOK is None:
        _GLOBAL_HOOK = register_optimizer_step_post_hook(_after_any_step)


def _param_ids(optimizer) -> set:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _attached_hook(keeper_ref: "weakref.ref[ZeroKeeper]"):
    """An optimizer step post-hook that does not keep the keeper alive."""
    def hook(optimizer, args, kwargs) -> None:
        keeper = keeper_ref()
        if keeper is not None and keeper._held:
            _zero_after_step([keeper], optimizer)
    return hook


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class _Held:
    """What one keeper holds at zero for one parameter."""

    __slots__ = ("ref", "shape", "keep", "rows", "version", "zeroed_at")

    def __init__(self, ref: "weakref.ref[Tensor]", shape: torch.Size):
        self.ref = ref
        self.shape = shape                    # checked before zeroing: masks do not fit a reshaped parameter
        self.keep: Optional[Tensor] = None    # bool, the parameter's shape; False = held at zero
        self.rows: Dict[int, Tensor] = {}     # dim -> sorted unique int64 indices held at zero
        self.version = next(_VERSIONS)
        # (parameter's _version, keep's _version) right after the last zeroing
        self.zeroed_at: Optional[tuple] = None

    def changed(self) -> None:
        self.version = next(_VERSIONS)
        self.zeroed_at = None

    def check_shape(self, param: Tensor) -> None:
        if param.shape != self.shape:
            raise RuntimeError(
                f"ZeroKeeper: a parameter changed shape from {list(self.shape)} to {list(param.shape)} "
                f"since its zeros were registered; discard(param) and register its new zeros")

    def zero(self, tensor: Tensor, is_param: bool) -> None:
        """Zeroes ``tensor`` (the parameter or a state tensor shaped like it) at the
        held entries. The parameter's device is the one masks are kept on: they
        follow it when it moves."""
        if self.keep is not None:
            keep = self.keep
            if keep.device != tensor.device:
                keep = keep.to(tensor.device)
                if is_param:
                    self.keep = keep
            ops.apply_mask_(tensor, keep)
        for dim, rows in self.rows.items():
            if rows.device != tensor.device:
                rows = rows.to(tensor.device)
                if is_param:
                    self.rows[dim] = rows
            tensor.index_fill_(dim, rows, 0)
        if is_param:
            self.zeroed_at = self.versions(tensor)

    def versions(self, param: Tensor) -> tuple:
        return param._version, (self.keep._version if self.keep is not None else -1)

    def keep_mask(self, param: Tensor) -> Tensor:
        keep = (self.keep.to(param.device).clone() if self.keep is not None
                else torch.ones(param.shape, dtype=torch.bool, device=param.device))
        for dim, rows in self.rows.items():
            keep.index_fill_(dim, rows.to(param.device), False)
        return keep


def _state_tensors(param: Tensor, state: dict) -> List[Tensor]:
    """The optimizer state tensors laid out like ``param`` (momentum, moments;
    not ``step``, which is per parameter, not per entry, even for a scalar one)."""
    return [value for key, value in state.items()
            if key != "step" and isinstance(value, Tensor) and value.shape == param.shape]


class ZeroKeeper:
    """Keeps chosen entries of parameters at zero, and the optimizer state shaped
    like them, after every optimizer step (see the module docs).

    Args:
        grads_masked: promise that the gradients at held entries are exactly
            zero (the forward pass masks the weight, as the masked layers do).
            Then each optimizer's state is zeroed once per change of what is held
            (and when the state tensors are replaced, e.g. created at the first
            step or loaded), not after every step: with zero gradients and zero
            weights, momentum and moments stay zero by themselves (state that is
            not a running sum of gradients may drift, e.g. Adamax's running max
            becomes eps and Rprop's step size its minimum, but moves no weight
            with a zero gradient). The weights are re-zeroed after every step
            either way.

    A parameter is any tensor an optimizer updates (usually an ``nn.Parameter``).
    Masks are bool tensors of the parameter's shape, True where the value is kept
    (as everywhere in this library). Registering zeros zeroes the parameter at
    once; the optimizer state is zeroed after the next step.
    """

    def __init__(self, *, grads_masked: bool = False):
        self.grads_masked = bool(grads_masked)
        self._held: Dict[int, _Held] = {}  # id(param) -> entry: tensors compare element-wise, ids do not
        # optimizer -> {id(param): (version, ids of the state tensors) last cleaned}; grads_masked only
        self._cleaned: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._handles: list = []           # hooks of attached optimizers
        self._attached: "weakref.WeakSet" = weakref.WeakSet()
        self._finalizer = None
        self._removed = False
        _GLOBAL_KEEPERS.add(self)
        _ensure_global_hook()

    # ------------------------------------------------------------- what is held

    def add_mask(self, param: Tensor, mask: Tensor) -> None:
        """Holds ``param`` at zero where ``mask`` is False, in addition to what is
        already held for it (the masks are ANDed)."""
        held = self._lookup(param)
        mask = self._checked_mask(param, mask, copy=held is None or held.keep is None)
        held = held or self._entry(param)
        held.keep = mask if held.keep is None else held.keep & mask.to(held.keep.device)
        held.changed()
        self._zero_param(param, held)

    def set_mask(self, param: Tensor, mask: Tensor, *, copy: bool = True) -> None:
        """Holds ``param`` at zero exactly where ``mask`` is False, replacing what
        was held for it (indices included). ``copy=False`` keeps a bool mask that is
        already on the parameter's device without copying it: the caller then
        promises to call ``set_mask`` again after changing it."""
        mask = self._checked_mask(self._checked_param(param), mask, copy=copy)
        held = self._entry(param)
        held.keep, held.rows = mask, {}
        held.changed()
        self._zero_param(param, held)

    def add_indices(self, param: Tensor, dim: int, indices: Indices) -> None:
        """Holds the slices ``indices`` of ``param`` along ``dim`` at zero (e.g. dim 0:
        output channels of a Conv2d or Linear weight, dim 1: of a ConvTranspose2d
        weight, dim -1: a LayerNorm's channels), added to what is already held."""
        dim = self._checked_dim(self._checked_param(param), dim)
        rows = self._checked_indices(param, dim, indices)
        if rows.numel() == 0:
            return
        held = self._entry(param)
        previous = held.rows.get(dim)
        if previous is not None:
            rows = torch.cat([previous, rows.to(previous.device)])
        held.rows[dim] = torch.unique(rows)  # sorted
        held.changed()
        self._zero_param(param, held)

    def discard(self, param: Tensor) -> None:
        """Stops holding ``param``'s entries at zero (its values stay as they are)."""
        self._held.pop(id(self._checked_param(param)), None)

    def clear(self) -> None:
        """Stops holding anything at zero."""
        self._held.clear()
        self._cleaned = weakref.WeakKeyDictionary()

    def params(self) -> List[Tensor]:
        """The live parameters with entries held at zero."""
        return [p for p in (held.ref() for held in list(self._held.values())) if p is not None]

    def zeroed(self, param: Tensor) -> bool:
        """Whether ``param`` is known to be zero at every held entry: it has not been
        written (nor its mask changed in place) since this keeper last zeroed it.
        Judged by version counters, as autograd judges: writes through
        ``param.data`` are not seen (write under ``torch.no_grad()`` instead)."""
        held = self._lookup(param)
        return held is not None and held.zeroed_at is not None and held.zeroed_at == held.versions(param)

    def mask_of(self, param: Tensor) -> Optional[Tensor]:
        """A new bool tensor of ``param``'s shape, False where it is held at zero
        (masks and indices together); None when nothing is held for it."""
        held = self._lookup(param)
        return held.keep_mask(param) if held is not None else None

    def indices(self, param: Tensor, dim: int) -> Tensor:
        """The sorted indices along ``dim`` registered by :meth:`add_indices` (empty if none)."""
        held = self._lookup(param)
        dim = self._checked_dim(param, dim)
        if held is None or dim not in held.rows:
            return torch.empty(0, dtype=torch.long, device=param.device)
        return held.rows[dim].clone()

    def __contains__(self, param) -> bool:
        return isinstance(param, Tensor) and self._lookup(param) is not None

    def __len__(self) -> int:
        return len(self.params())

    # ------------------------------------------------------------------ zeroing

    @torch.no_grad()
    def zero_now(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Zeroes every held entry now and, if given, ``optimizer``'s state tensors
        shaped like the parameters there."""
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ZeroKeeper.zero_now: optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        for held in list(self._held.values()):
            param = held.ref()
            if param is None:
                continue
            held.check_shape(param)
            held.zero(param, is_param=True)
            state = optimizer.state.get(param) if optimizer is not None else None
            for value in _state_tensors(param, state or {}):
                held.zero(value, is_param=False)

    def _after_step(self, optimizer, stepped: set) -> None:
        """Zeroes the held entries of the parameters ``optimizer`` just stepped
        (called under no_grad), and their state (see ``grads_masked``)."""
        cleaned = None
        if self.grads_masked:
            cleaned = self._cleaned.get(optimizer)
            if cleaned is None:
                cleaned = self._cleaned[optimizer] = {}
        for key, held in list(self._held.items()):
            if key not in stepped:  # another optimizer's parameter: not ours to touch now
                continue
            param = held.ref()
            if param is None:
                continue
            if param.shape != held.shape:
                held.check_shape(param)
            held.zero(param, is_param=True)
            state = optimizer.state.get(param)
            if not state:  # no state yet (made lazily at a first step with a gradient)
                continue
            if cleaned is not None:
                # The per-parameter state dict is new when the state is loaded or
                # rebuilt, and grows when a first step fills it: either way clean again.
                stamp = (held.version, id(state), len(state))
                if cleaned.get(key) == stamp:
                    continue
                cleaned[key] = stamp
            for value in _state_tensors(param, state):
                held.zero(value, is_param=False)

    @torch.no_grad()
    def _zero_param(self, param: Tensor, held: _Held) -> None:
        held.zero(param, is_param=True)

    # ----------------------------------------------------------------- lifetime

    def attach(self, optimizer: torch.optim.Optimizer) -> "ZeroKeeper":
        """Acts after ``optimizer.step()`` only (and after the steps of any other
        optimizer attached the same way), instead of after every optimizer's
        step. The optimizer's hook does not keep this keeper alive. Returns self."""
        if self._removed:
            raise RuntimeError("ZeroKeeper.attach after remove(): make a new ZeroKeeper")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ZeroKeeper.attach: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _GLOBAL_KEEPERS.discard(self)
        if optimizer in self._attached:
            return self
        self._attached.add(optimizer)
        self._handles.append(optimizer.register_step_post_hook(_attached_hook(weakref.ref(self))))
        if self._finalizer is None:  # a dropped keeper takes its hooks off the optimizers
            self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        return self

    def remove(self) -> None:
        """Stops acting after optimizer steps, for good (what is held stays
        registered: ``zero_now`` still works). Safe to call twice."""
        self._removed = True
        _GLOBAL_KEEPERS.discard(self)
        _remove_handles(self._handles)

    @property
    def active(self) -> bool:
        """Whether the keeper acts after optimizer steps (globally or attached)."""
        return not self._removed

    def __enter__(self) -> "ZeroKeeper":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        mode = "removed" if self._removed else (f"attached to {len(self._attached)} optimizer(s)"
                                                if self._handles else "after every optimizer step")
        return f"ZeroKeeper({len(self)} parameter(s), {mode})"

    # --------------------------------------------------------------- internals

    def _entry(self, param: Tensor) -> _Held:
        """The entry for ``param``, made on first use."""
        self._checked_param(param)
        key = id(param)
        held = self._held.get(key)
        if held is not None and held.ref() is param:
            return held
        self_ref = weakref.ref(self)

        def forget(ref, key=key):  # the parameter died: drop its masks (no strong reference to self)
            keeper = self_ref()
            if keeper is not None and key in keeper._held and keeper._held[key].ref is ref:
                del keeper._held[key]

        held = _Held(weakref.ref(param, forget), param.shape)
        self._held[key] = held
        return held

    def _lookup(self, param: Tensor) -> Optional[_Held]:
        held = self._held.get(id(self._checked_param(param)))
        return held if held is not None and held.ref() is param else None

    @staticmethod
    def _checked_param(param) -> Tensor:
        if isinstance(param, nn.Module):
            raise TypeError(f"ZeroKeeper: expected a parameter, got a {type(param).__name__} module; "
                            f"pass one of its parameters, e.g. module.weight")
        if not isinstance(param, Tensor):
            raise TypeError(f"ZeroKeeper: expected a parameter (a tensor an optimizer updates), "
                            f"got {type(param).__name__}")
        if not param.is_leaf:
            raise ValueError("ZeroKeeper: expected a parameter, got the result of a computation (a non-leaf "
                             "tensor); optimizers update leaf tensors such as nn.Parameter")
        return param

    @staticmethod
    def _checked_mask(param: Tensor, mask, copy: bool) -> Tensor:
        if not isinstance(mask, Tensor):
            raise TypeError(f"ZeroKeeper: mask must be a bool tensor, got {type(mask).__name__}")
        if mask.shape != param.shape:
            raise ValueError(f"ZeroKeeper: mask must have the parameter's shape {list(param.shape)}, "
                             f"got {list(mask.shape)}")
        if mask.dtype != torch.bool:  # numbers are accepted when they are all 0 or 1
            if mask.is_complex():
                raise TypeError(f"ZeroKeeper: mask must be bool (or 0/1 numbers), got dtype {mask.dtype}")
            if not mask.is_meta:
                values = torch.unique(mask)
                if not bool(((values == 0) | (values == 1)).all()):
                    raise ValueError(f"ZeroKeeper: mask must be bool or hold only 0 and 1, got "
                                     f"{mask.dtype} values {values.tolist()[:5]}")
        converted = mask.to(device=param.device, dtype=torch.bool)
        return converted.clone() if copy and converted is mask else converted

    @staticmethod
    def _checked_dim(param: Tensor, dim) -> int:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"ZeroKeeper: dim must be an int, got {type(dim).__name__}")
        ndim = param.dim()
        if ndim == 0 or not -ndim <= dim < ndim:
            raise IndexError(f"ZeroKeeper: dim {dim} is out of range for a parameter of shape "
                             f"{list(param.shape)} ({ndim} dims)")
        return dim % ndim

    @staticmethod
    def _checked_indices(param: Tensor, dim: int, indices: Indices) -> Tensor:
        if isinstance(indices, Tensor):
            rows = indices.detach()
        elif isinstance(indices, (int, range, list, tuple)) and not isinstance(indices, bool):
            try:
                rows = torch.as_tensor(list(indices) if isinstance(indices, range) else indices)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"ZeroKeeper: indices must be ints, got {indices!r}") from err
        else:
            raise TypeError(f"ZeroKeeper: indices must be an int, a sequence of ints or an integer tensor, "
                            f"got {type(indices).__name__}")
        if rows.numel() == 0:
            return torch.empty(0, dtype=torch.long, device=param.device)
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"ZeroKeeper: indices must be integers, got {rows.dtype} "
                            f"(a bool keep-mask goes to add_mask)")
        if rows.dim() > 1:
            raise ValueError(f"ZeroKeeper: indices must be one-dimensional, got shape {list(rows.shape)}")
        rows = rows.reshape(-1).to(dtype=torch.long)
        size = param.shape[dim]
        bad = rows[(rows < 0) | (rows >= size)]
        if bad.numel():
            raise IndexError(f"ZeroKeeper: index {int(bad[0])} is out of range for dim {dim} of size {size} "
                             f"(parameter shape {list(param.shape)})")
        return rows.to(param.device)
