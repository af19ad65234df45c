"""MaskSet: the bool masks of a model's prunable weights, by parameter name.

Names are parameter names as in ``model.named_parameters()`` (``"fc1.weight"``,
``"features.0.weight"``); a mask has its parameter's shape, True = kept.

Which parameters are prunable (:func:`prunable_parameters`): by default the
weights of Linear and convolution layers; biases and normalisation parameters are
never pruned unless named explicitly.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ..distributed import unwrap_model
from ..graph.specs import spec_for
from ..nn import mask_model
from ..nn.masked import _MaskedMixin
from . import _param_masks
from .io import PathLike, load_tensors, save_tensors

__all__ = ["MaskSet", "Prunable", "Remaining", "prunable_parameters"]

#: What :func:`prunable_parameters` accepts: None (Linear/Conv weights), parameter
#: names or ``fnmatch`` patterns (``"fc*.weight"``), or ``f(name, module, param) -> bool``.
Prunable = Union[None, str, Iterable[str], Callable[[str, nn.Module, nn.Parameter], bool]]

_FORMAT = "pyprune_ext.lottery.MaskSet"
_FORMAT_VERSION = 1
# Modules whose `weight` the masked modules of pyprune_ext.nn replace.
_MASKABLE = (nn.Linear, nn.Conv2d)


def _default_prunable(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    """The parameters the module's layer spec names as ticket weights (Conv and Linear weights)."""
    spec = spec_for(module, any_subclass=True)
    return spec is not None and name.rpartition(".")[2] in spec.ticket_weights


def _owner(model: nn.Module, name: str) -> nn.Module:
    module_name = name.rpartition(".")[0]
    return model.get_submodule(module_name) if module_name else model


def prunable_parameters(model: nn.Module, prunable: Prunable = None) -> "OrderedDict[str, nn.Parameter]":
    """The parameters of ``model`` selected by ``prunable``, in the model's order.

    Raises:
        ValueError: a name or pattern matches no parameter, or nothing is selected.
        TypeError: an FSDP-sharded model (a DDP wrapper is looked through).
    """
    model = unwrap_model(model, "lottery-ticket pruning")
    params = OrderedDict(model.named_parameters())
    if prunable is None or callable(prunable):
        test = _default_prunable if prunable is None else prunable
        chosen = [n for n, p in params.items() if test(n, _owner(model, n), p)]
    else:
        patterns = [prunable] if isinstance(prunable, str) else list(prunable)
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in params):
                raise ValueError(f"prunable: {pattern!r} matches no parameter of the model "
                                 f"(parameters: {', '.join(list(params)[:8])}{', ...' if len(params) > 8 else ''})")
        chosen = [n for n in params if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError("prunable: no parameter of the model is selected for pruning")
    return OrderedDict((n, params[n]) for n in chosen)


class Remaining(NamedTuple):
    """Fractions of weights kept: ``total`` over all masks, ``per_layer`` by name,
    and the counts behind the total."""

    total: float
    per_layer: Dict[str, float]
    kept: int
    size: int


def _check_mask(name: str, mask) -> Tensor:
    if not isinstance(name, str):
        raise TypeError(f"MaskSet: names must be strings, got {name!r}")
    if not isinstance(mask, Tensor):
        raise TypeError(f"MaskSet: the mask of {name!r} must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"MaskSet: the mask of {name!r} must be a bool tensor, got {mask.dtype}")
    return mask


class MaskSet(Mapping[str, Tensor]):
    """An ordered, immutable mapping ``parameter name -> bool mask`` (True = kept).

    Operations that change masks (:func:`~pyprune_ext.lottery.prune_by_magnitude`,
    :func:`~pyprune_ext.lottery.random_prune`) return a new MaskSet.
    """

    def __init__(self, masks: Mapping[str, Tensor]):
        self._masks: "OrderedDict[str, Tensor]" = OrderedDict(
            (name, _check_mask(name, mask)) for name, mask in masks.items())

    # ---------------------------------------------------------------- construction

    @classmethod
    def ones(cls, model: nn.Module, prunable: Prunable = None) -> "MaskSet":
        """All-kept masks for the prunable parameters of ``model`` (see :func:`prunable_parameters`)."""
        return cls({n: torch.ones_like(p, dtype=torch.bool)
                    for n, p in prunable_parameters(model, prunable).items()})

    # ----------------------------------------------------------------- mapping API

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other) -> bool:
        if not isinstance(other, MaskSet):
            return NotImplemented
        return (list(self) == list(other)
                and all(torch.equal(self[n].cpu(), other[n].cpu()) for n in self))

    __hash__ = None  # mutable tensors inside

    def __repr__(self) -> str:
        rem = self.remaining()
        return f"MaskSet({len(self)} tensors, {rem.kept}/{rem.size} kept = {100 * rem.total:.2f}%)"

    @property
    def names(self) -> List[str]:
        return list(self._masks)

    def to(self, device) -> "MaskSet":
        """A copy with every mask on ``device``."""
        return MaskSet({n: m.to(device) for n, m in self.items()})

    def clone(self) -> "MaskSet":
        return MaskSet({n: m.clone() for n, m in self.items()})

    # -------------------------------------------------------------------- report

    def counts(self) -> Dict[str, tuple]:
        """``name -> (kept, size)``."""
        return {n: (int(m.sum()), m.numel()) for n, m in self.items()}

    def remaining(self) -> Remaining:
        """Fractions kept per layer and in total (a :class:`Remaining`)."""
        counts = self.counts()
        kept = sum(k for k, _ in counts.values())
        size = sum(s for _, s in counts.values())
        per_layer = {n: (k / s if s else 1.0) for n, (k, s) in counts.items()}
        return Remaining(kept / size if size else 1.0, per_layer, kept, size)

    def report(self) -> str:
        """A plain-text table: name, shape, kept, size, remaining %, then the total."""
        counts = self.counts()
        rows = [(n, "x".join(map(str, m.shape)), *counts[n]) for n, m in self.items()]
        width = max([len("layer"), len("total")] + [len(r[0]) for r in rows])
        lines = [f"{'layer':<{width}}  {'shape':>14}  {'kept':>10}  {'size':>10}  {'remaining':>9}"]
        for name, shape, kept, size in rows:
            lines.append(f"{name:<{width}}  {shape:>14}  {kept:>10}  {size:>10}  "
                         f"{100 * kept / max(size, 1):>8.2f}%")
        rem = self.remaining()
        lines.append(f"{'total':<{width}}  {'':>14}  {rem.kept:>10}  {rem.size:>10}  {100 * rem.total:>8.2f}%")
        return "\n".join(lines)

    # ------------------------------------------------------------------ validation

    def validate(self, model: nn.Module) -> None:
        """Raises ValueError unless every name is a parameter of ``model`` with the mask's shape."""
        params = dict(unwrap_model(model, "MaskSet").named_parameters())
        for name, mask in self.items():
            if name not in params:
                raise ValueError(f"mask {name!r} names no parameter of the model "
                                 f"(parameters: {', '.join(list(params)[:8])}{', ...' if len(params) > 8 else ''})")
            if tuple(mask.shape) != tuple(params[name].shape):
                raise ValueError(f"mask {name!r} has shape {list(mask.shape)} but the parameter has shape "
                                 f"{list(params[name].shape)}; the mask belongs to another model")

    # ------------------------------------------------------------------- apply

    def apply(self, model: nn.Module) -> nn.Module:
        """Masks ``model`` in place and returns it.

        Linear / Conv2d weights go through :func:`pyprune_ext.nn.mask_model` (their
        modules become MaskedLinear / MaskedConv2d, or get ``set_mask`` if already
        masked); any other parameter is zeroed and kept zero after every optimizer
        step (see ``_param_masks``). Pruned weights are zero when this returns.
        """
        given, model = model, unwrap_model(model, "MaskSet.apply")  # a DDP wrapper: mask the module inside
        self.validate(model)
        by_module: Dict[str, Tensor] = {}
        for name, mask in self.items():
            module_name, _, attr = name.rpartition(".")
            module = _owner(model, name)
            if attr == "weight" and (isinstance(module, _MaskedMixin) or type(module) in _MASKABLE):
                by_module[module_name] = mask
            else:
                _param_masks.set_param_mask(dict(model.named_parameters())[name], mask)
        if "" in by_module:  # the model itself is one Linear/Conv2d: cannot be replaced in place
            raise ValueError("MaskSet.apply: the model is itself a single Linear/Conv2d layer; wrap it in "
                             "an nn.Sequential so it can be replaced by its masked version")
        mask_model(model, by_module)
        return given

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION,
                "masks": OrderedDict((n, m.detach().cpu()) for n, m in self.items())}

    def save(self, path: PathLike) -> None:
        """Writes the masks to ``path`` atomically (temporary file + ``os.replace``)."""
        save_tensors(self.state_dict(), path)

    @classmethod
    def from_state_dict(cls, state, source: str = "state") -> "MaskSet":
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{source}: not a MaskSet file (no '{_FORMAT}' format tag)")
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{source}: MaskSet format version {state.get('version')!r} is not supported "
                             f"(this code reads version {_FORMAT_VERSION})")
        masks = state.get("masks")
        if not isinstance(masks, dict):
            raise ValueError(f"{source}: the 'masks' entry must be a dict of bool tensors")
        try:
            return cls(masks)
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: PathLike, model: Optional[nn.Module] = None) -> "MaskSet":
        """Reads a file written by :meth:`save` (``torch.load(weights_only=True)``).

        With ``model``, checks every name and shape against it.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a MaskSet file, a non-bool mask, or (with ``model``) an
                unknown name or a shape mismatch; the message names the file.
        """
        masks = cls.from_state_dict(load_tensors(path), str(path))
        if model is not None:
            try:
                masks.validate(model)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
        return masks
