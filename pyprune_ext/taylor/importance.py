"""Importance criteria: what :class:`~pyprune_ext.taylor.TaylorPruner` ranks
channels by, as a protocol and a registry of named criteria.

An importance criterion is built for a model and its channel groups
(:func:`pyprune_ext.graph.dependency_groups`) and follows the
:class:`Importance` protocol:

``attach()``
    installs what it needs on the model (forward or gradient hooks); the
    pruner calls it once, before the first minibatch.
``end_minibatch() -> bool``
    called after each backward pass: folds that pass into the scores. True
    when the minibatch counted; False when nothing was gathered (e.g. no
    backward pass reached the hooks), and the pruner then does not count it
    towards its schedule.
``means() -> sequence``
    the scores gathered since the last ``reset()``: entry ``k`` is a tensor of
    ``groups[k].size`` scores (on the CPU or the model's device), higher
    meaning more important. Entries of groups the pruner leaves alone are not
    read (they may be None).
``reset()``
    called after each pruning step: start gathering afresh.
``detach()``
    removes everything ``attach()`` installed; may be called more than once.

The five Taylor criteria of :mod:`pyprune_ext.taylor.estimators` are registered
under their names (``fo_bn``, ``fo_gate``, ``fo_fg``, ``fo_weight``,
``so_fisher``). :func:`register_importance` adds one: a *factory* that builds an
Importance from ``(model, groups, **options)``. The pruner offers the options
``device`` (where the model's parameters are), ``sync`` (a
:class:`pyprune_ext.distributed.Sync` in a synchronised distributed run, else
None) and ``square_then_sum``; a factory receives those its signature names
(all of them when it takes ``**options``), so a plain ``(model, groups)``
factory works too.

Any object with those five methods is accepted; subclassing :class:`Importance`
gives ``attach``, ``reset`` and ``detach`` that do nothing, for criteria that
read the model's current state when asked (see ``examples/custom_importance.py``).
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .estimators import CRITERIA, TaylorImportance

PROTOCOL_METHODS = ("attach", "end_minibatch", "means", "reset", "detach")

ImportanceFactory = Callable[..., "Importance"]


class Importance(abc.ABC):
    """Scores every channel of the channel groups it was built for (see the
    module docs for what the pruner calls when)."""

    def attach(self) -> "Importance":
        """Installs hooks on the model; none by default. Returns self."""
        return self

    @abc.abstractmethod
    def end_minibatch(self) -> bool:
        """Folds the last backward pass into the scores; True when it counted."""

    @abc.abstractmethod
    def means(self) -> Sequence[Tensor | None]:
        """One tensor of ``group.size`` scores per group, in the groups' order."""

    def reset(self) -> None:
        """Forgets what was gathered since the last reset; nothing by default."""

    def detach(self) -> None:
        """Removes what :meth:`attach` installed; nothing by default."""


Importance.register(TaylorImportance)  # follows the protocol without inheriting from it

_REGISTRY: dict[str, ImportanceFactory] = {}
_BUILTIN: dict[str, ImportanceFactory] = {}


def _missing_methods(obj: Any) -> list[str]:
    return [name for name in PROTOCOL_METHODS if not callable(getattr(obj, name, None))]


def follows_protocol(obj: Any) -> bool:
    """True when ``obj`` is an importance object (not a class) with the five
    protocol methods."""
    return not isinstance(obj, type) and not _missing_methods(obj)


# ------------------------------------------------------------------ registry

def register_importance(name: str, factory: ImportanceFactory, *, replace: bool = False) -> ImportanceFactory:
    """Registers ``factory`` (``factory(model, groups, **options) -> Importance``)
    under ``name``, for ``TaylorPruner(importance=name)`` and ``pyprune taylor
    --criterion name`` (register before calling :func:`pyprune_ext.cli.main`).
    ``replace=True`` replaces an existing registration. Returns ``factory``."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"an importance criterion's name is a non-empty string without spaces, got {name!r}")
    if follows_protocol(factory):
        raise TypeError(f"register_importance({name!r}, ...) takes a factory that builds an Importance for "
                        f"(model, groups, **options), not a built {type(factory).__name__} object: "
                        "register its class or a function, or pass the object to TaylorPruner(importance=...)")
    if not callable(factory):
        raise TypeError(f"register_importance({name!r}, ...): the factory must be callable as "
                        f"factory(model, groups, **options), got {type(factory).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"an importance criterion named {name!r} is already registered "
                         f"({_describe(_REGISTRY[name])}); pass replace=True to replace it")
    _REGISTRY[name] = factory
    return factory


def unregister_importance(name: str) -> ImportanceFactory:
    """Removes a registration (a built-in one too) and returns its factory."""
    if name not in _REGISTRY:
        raise ValueError(_unknown(name))
    return _REGISTRY.pop(name)


def registered_importances() -> tuple[str, ...]:
    """The registered criteria's names: the built-in ones, then the users', in
    registration order."""
    return tuple(_REGISTRY)


def importance_factory(name: str) -> ImportanceFactory:
    """The factory registered under ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ValueError(_unknown(name)) from None


def is_builtin(name: str) -> bool:
    """True when ``name`` is registered by pyprune_ext itself (and not replaced),
    so that a freshly started process (a ``--nproc`` worker) knows it too."""
    return name in _BUILTIN and _REGISTRY.get(name) is _BUILTIN[name]


def _unknown(name) -> str:
    # "Taylor criterion": the pruner's name for what it ranks by, whatever computes it.
    return (f"unknown Taylor criterion {name!r}; registered importance criteria: "
            f"{', '.join(_REGISTRY) or 'none'} (register_importance adds one)")


def _describe(factory) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__


# ----------------------------------------------------------------- building

def build_importance(spec, model: nn.Module, groups: Sequence, **offered) -> Any:
    """The importance object ``spec`` stands for, for ``model`` and ``groups``:

    * a registered name: its factory is called;
    * an object following the protocol: returned as it is (it must have been
      built for the same groups);
    * any other callable (a class, a function): called as a factory.

    A factory gets ``model``, ``groups`` and those of the ``offered`` options
    its signature takes. Not attached yet: the caller calls ``attach()``."""
    if isinstance(spec, str):
        factory, label = importance_factory(spec), repr(spec)
    elif follows_protocol(spec):
        return spec
    elif callable(spec):
        factory, label = spec, _describe(spec)
    else:
        missing = ", ".join(_missing_methods(spec))
        raise TypeError(f"importance must be a registered criterion name ({', '.join(_REGISTRY)}), an object "
                        f"with the methods {', '.join(PROTOCOL_METHODS)}, or a factory (model, groups, **options) "
                        f"-> such an object; got a {type(spec).__name__}, which lacks {missing}")
    built = factory(model, groups, **_accepted(factory, offered))
    if not follows_protocol(built):
        why = "is a class, not an object" if isinstance(built, type) else f"lacks {', '.join(_missing_methods(built))}"
        raise TypeError(f"importance factory {label} returned a {type(built).__name__}, which is not an importance "
                        f"object: it {why} (the protocol: {', '.join(PROTOCOL_METHODS)})")
    return built


def _accepted(factory, offered: dict) -> dict:
    """The options ``factory`` takes: those its signature names, or all of them
    when it takes ``**options``."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C builtin): offer nothing
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(offered)
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {key: value for key, value in offered.items() if key in names}


def read_scores(importance, groups: Sequence, indices: Sequence[int]) -> dict[int, Tensor]:
    """``importance.means()`` for the groups at ``indices``, checked (one real
    score per channel, no NaN) and as detached float64 CPU tensors (a score
    that required grad would otherwise chain the pruner's moving average into
    one autograd graph across the whole run)."""
    means = importance.means()
    who = type(importance).__name__
    if len(means) != len(groups):
        raise ValueError(f"importance {who} gave {len(means)} score tensors for {len(groups)} channel groups: "
                         "build it for the groups the pruner uses (pass the same list as groups=)")
    scores = {}
    for i in indices:
        group, score = groups[i], means[i]
        if not isinstance(score, Tensor):
            raise ValueError(f"importance {who} gave no scores for channel group {group.name!r} "
                             f"(got {type(score).__name__}); leave the group out with ignore= or use a criterion "
                             "that scores it")
        if tuple(score.shape) != (group.size,) or score.is_complex():
            raise ValueError(f"importance {who} gave channel group {group.name!r} scores of shape "
                             f"{tuple(score.shape)} and dtype {score.dtype}; expected {group.size} real scores")
        score = score.detach().to("cpu", torch.float64)
        if bool(score.isnan().any()):
            raise ValueError(f"importance {who} gave channel group {group.name!r} NaN scores "
                             "(a NaN loss or NaN weights?)")
        scores[i] = score
    return scores


# --------------------------------------------------------------- built-ins

def _taylor_factory(criterion: str) -> ImportanceFactory:
    def build(model, groups, *, square_then_sum: bool = False, device=None, sync=None) -> TaylorImportance:
        return TaylorImportance(model, groups, criterion, square_then_sum, device, sync)
    build.__qualname__ = f"TaylorImportance(criterion={criterion!r})"
    build.__doc__ = f"The Taylor criterion {criterion!r} (see pyprune_ext.taylor.estimators)."
    return build


for _criterion in CRITERIA:
    _BUILTIN[_criterion] = register_importance(_criterion, _taylor_factory(_criterion))
