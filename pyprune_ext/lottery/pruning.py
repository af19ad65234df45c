"""Magnitude pruning of the remaining weights, per layer or globally.

Counting rule (one place, :func:`count_to_prune`): a level prunes
``floor(rate * kept + 0.5)`` weights, i.e. ``rate`` times the weights still kept,
rounded to the nearest integer with halves rounded up. Per layer, ``kept`` is the
layer's count; globally, the total over all masks. So after ``L`` levels at rate
``p`` a layer keeps ``(1 - p)^L`` of its weights up to one weight of rounding per
level.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor, nn

from ..distributed import unwrap_model
from .masks import MaskSet
from .nm import NMPattern, nm_problem, nm_select
from .selection import select_smallest

__all__ = ["count_to_prune", "layer_rates", "nm_layers", "prune_by_magnitude"]

_SCOPES = ("layer", "global")
_INCOMPATIBLE = ("dense", "error")
RateKey = Union[str, type]


def count_to_prune(rate: float, kept: int) -> int:
    """``rate`` of ``kept`` weights, rounded to nearest (halves up)."""
    return int(math.floor(rate * kept + 0.5))


def _check_rate(rate, what: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {rate!r}")
    return float(rate)


def _type_matches(key: RateKey, module: Optional[nn.Module]) -> bool:
    """A class key matches instances; a string key matches the name of the module's
    class or of any base class ("Linear" matches MaskedLinear too)."""
    if module is None:
        return False
    if isinstance(key, type):
        return isinstance(module, key)
    return any(cls.__name__ == key for cls in type(module).__mro__)


def _owner_or_none(model, name: str) -> Optional[nn.Module]:
    if not isinstance(model, nn.Module):
        return None
    module_name = name.rpartition(".")[0]
    return model.get_submodule(module_name) if module_name else model


_OUTPUT = object()  # marks "use output_rate" in _rate_key


def _rate_key(name: str, module: Optional[nn.Module], rates: Mapping, is_output: bool, has_output_rate: bool):
    """Which entry sets the rate of ``name``: a key of ``rates``, _OUTPUT, or None (the default rate)."""
    module_name = name.rpartition(".")[0]
    for key in (name, module_name):
        if key in rates:
            return key
    if is_output and has_output_rate:
        return _OUTPUT
    for key in rates:
        if _type_matches(key, module):
            return key
    return None


def layer_rates(model: Union[nn.Module, Mapping[str, Tensor]], masks: MaskSet, rate: float = 0.2,
                rates: Optional[Mapping[RateKey, float]] = None,
                output_rate: Optional[float] = None) -> Dict[str, float]:
    """The pruning rate of each masked tensor.

    Precedence, first match wins: ``rates[parameter name]`` (``"fc1.weight"``),
    ``rates[module name]`` (``"fc1"``), ``output_rate`` for the output layer (the
    last tensor of ``masks``, which follows the model's parameter order),
    ``rates[type]`` (a class or class name such as ``"Conv2d"``/``"Linear"``,
    base classes included), then ``rate``.

    Raises:
        ValueError: a rate outside [0, 1], or a key of ``rates`` that matches no
            masked tensor (a typo would otherwise silently prune at ``rate``);
            type keys need ``model`` to be an ``nn.Module``.
    """
    rate = _check_rate(rate, "rate")
    rates = dict(rates or {})
    for key, value in rates.items():
        _check_rate(value, f"rates[{key!r}]")
    if output_rate is not None:
        output_rate = _check_rate(output_rate, "output_rate")
    names = list(masks)
    result: Dict[str, float] = {}
    used = set()
    for name in names:
        key = _rate_key(name, _owner_or_none(model, name), rates, is_output=(name == names[-1]),
                        has_output_rate=output_rate is not None)
        used.add(key)
        result[name] = rate if key is None else output_rate if key is _OUTPUT else rates[key]
    unused = [key for key in rates if key not in used
              and not any(_type_matches(key, _owner_or_none(model, n)) for n in names)]
    if unused:
        hint = "" if isinstance(model, nn.Module) else " (type keys need the model, not a weight dict)"
        raise ValueError(f"rates: key(s) {unused!r} match no masked tensor, module name or layer type{hint}; "
                         f"masked tensors: {', '.join(names)}")
    return result


def _weights_by_name(model, masks: MaskSet) -> Dict[str, Tensor]:
    source = (dict(unwrap_model(model, "prune_by_magnitude").named_parameters()) if isinstance(model, nn.Module)
              else dict(model))
    weights = {}
    for name, mask in masks.items():
        if name not in source:
            raise ValueError(f"prune_by_magnitude: the mask {name!r} names no weight of the model")
        w = source[name]
        if tuple(w.shape) != tuple(mask.shape):
            raise ValueError(f"prune_by_magnitude: {name!r} has shape {list(w.shape)} but its mask has shape "
                             f"{list(mask.shape)}")
        weights[name] = w.detach()
    return weights


def prune_by_magnitude(model: Union[nn.Module, Mapping[str, Tensor]], masks: MaskSet, rate: float = 0.2,
                       scope: str = "layer", rates: Optional[Mapping[RateKey, float]] = None,
                       output_rate: Optional[float] = None, *, pattern: Union[None, str, NMPattern] = None,
                       incompatible: str = "dense", impl: str = "auto") -> MaskSet:
    """Prunes the fraction ``rate`` of the remaining weights with the smallest ``|w|``
    (or, with ``pattern``, makes the masks N:M).

    Args:
        model: the trained model, or a ``name -> weight`` mapping (e.g. a state dict).
        masks: the current masks (which tensors are prunable, what is already pruned).
        rate: fraction of the remaining weights to prune (per layer, or of the total).
        scope: ``"layer"``: each tensor loses ``rate`` of its own remaining weights
            (rates per layer from ``rates`` / ``output_rate``, see :func:`layer_rates`);
            ``"global"``: one magnitude threshold over all tensors removes
            ``rate`` of the total remaining weights.
        rates, output_rate: per-layer rates (``scope="layer"`` only).
        pattern: ``"2:4"`` (N:M, :mod:`~pyprune_ext.lottery.nm`): instead of
            ``rate``, every tensor with an N:M form keeps the N largest ``|w|`` of
            its kept weights in each group of M inputs; ``rate``, ``scope`` and
            ``rates`` do not apply.
        incompatible: with ``pattern``, what happens to a tensor without an N:M
            form (an input dim that is not a multiple of M): ``"dense"`` leaves
            its mask as it is, ``"error"`` raises ValueError naming it.
        impl: passed to :func:`~pyprune_ext.lottery.selection.select_smallest`.

    Returns:
        A new :class:`MaskSet`; ``masks`` is unchanged. Counts follow
        :func:`count_to_prune`; ties go by position (see ``selection``).
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    weights = _weights_by_name(model, masks)
    names = list(masks)
    if pattern is not None:
        return _prune_to_pattern(weights, masks, NMPattern.parse(pattern), incompatible)
    if scope == "global":
        if rates or output_rate is not None:
            raise ValueError("rates and output_rate apply to scope='layer' only; global pruning uses one "
                             "rate over all prunable tensors (choose fewer prunable tensors instead)")
        kept = sum(int(m.sum()) for m in masks.values())
        k = count_to_prune(_check_rate(rate, "rate"), kept)
        new = select_smallest([weights[n] for n in names], [masks[n] for n in names], k, impl=impl)
        return MaskSet(dict(zip(names, new)))
    per_layer = layer_rates(model, masks, rate, rates, output_rate)
    result = {}
    for name in names:
        k = count_to_prune(per_layer[name], int(masks[name].sum()))
        result[name] = select_smallest([weights[name]], [masks[name]], k, impl=impl)[0]
    return MaskSet(result)


def nm_layers(masks: Mapping[str, Tensor], pattern: Union[str, NMPattern]) -> Tuple[List[str], Dict[str, str]]:
    """The masked tensors with an N:M form, and ``name -> why not`` for the others."""
    pattern = NMPattern.parse(pattern)
    problems = {name: nm_problem(tuple(mask.shape), pattern) for name, mask in masks.items()}
    return [n for n, p in problems.items() if p is None], {n: p for n, p in problems.items() if p is not None}


def _prune_to_pattern(weights: Dict[str, Tensor], masks: MaskSet, pattern: NMPattern, incompatible: str) -> MaskSet:
    if incompatible not in _INCOMPATIBLE:
        raise ValueError(f"incompatible must be one of {_INCOMPATIBLE}, got {incompatible!r}")
    compatible, problems = nm_layers(masks, pattern)
    if problems and incompatible == "error":
        name, why = next(iter(problems.items()))
        raise ValueError(f"prune_by_magnitude: {name} has no {pattern} form: {why} (incompatible='dense' leaves "
                         "such tensors unpruned)")
    return MaskSet({name: nm_select(weights[name], mask, pattern) if name in compatible else mask.clone()
                    for name, mask in masks.items()})
