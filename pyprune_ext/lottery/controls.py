"""The two controls every lottery-ticket study needs (Frankle & Carbin 2019):

* random re-initialisation: the ticket's mask on a fresh initialisation
  (:func:`random_reinit`);
* random pruning: a random mask with the ticket's sparsity, per layer (each layer
  keeps its count) or globally (only the total is kept), on the original
  initialisation (:func:`random_prune`); for N:M tickets a random N:M mask with
  the ticket's per-layer counts (:func:`random_prune_nm`).

Both run on the levels of an existing run: :func:`level_masks` reads a run's mask
files and :func:`control_masks` derives the control's mask for one level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .io import PathLike
from .masks import MaskSet
from .nm import NMPattern, nm_problem, random_nm
from .seeding import derive_seed

__all__ = ["CONTROLS", "control_masks", "level_masks", "random_prune", "random_prune_nm", "random_reinit"]

#: Values of ``LotteryConfig.control``.
CONTROLS = ("none", "reinit", "random")
_SCOPES = ("layer", "global")


def random_reinit(model_factory: Callable[[], nn.Module], masks: MaskSet, seed: int) -> nn.Module:
    """A fresh model from ``model_factory`` initialised under ``seed``, with ``masks``
    applied (pruned weights zero). The global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory()
    return masks.apply(model)


def _scatter_kept(size: int, kept: int, generator: torch.Generator) -> torch.Tensor:
    """A flat bool vector of ``size`` with ``kept`` True entries at random positions."""
    flat = torch.zeros(size, dtype=torch.bool)
    flat[torch.randperm(size, generator=generator)[:kept]] = True
    return flat


def random_prune(masks: MaskSet, seed: int, scope: str = "layer") -> MaskSet:
    """A random mask with the sparsity of ``masks``.

    ``scope="layer"``: each tensor keeps exactly as many weights as in ``masks``,
    at uniformly random positions. ``scope="global"``: the total number kept is
    the same, placed uniformly over all tensors (per-layer counts vary).
    Deterministic in ``seed``; masks come back on their original devices.
    """
    if scope not in _SCOPES:
        raise ValueError(f"random_prune: scope must be one of {_SCOPES}, got {scope!r}")
    generator = torch.Generator().manual_seed(seed)
    counts = masks.counts()
    if scope == "layer":
        return MaskSet({n: _scatter_kept(m.numel(), counts[n][0], generator).view(m.shape).to(m.device)
                        for n, m in masks.items()})
    total_kept = sum(k for k, _ in counts.values())
    flat = _scatter_kept(sum(s for _, s in counts.values()), total_kept, generator)
    result, offset = {}, 0
    for name, mask in masks.items():
        result[name] = flat[offset:offset + mask.numel()].view(mask.shape).to(mask.device)
        offset += mask.numel()
    return MaskSet(result)


def level_masks(run_dir: PathLike, model: Optional[nn.Module] = None) -> Dict[int, MaskSet]:
    """The mask of every level of a run directory that has one, ``level -> MaskSet``
    (validated against ``model`` when given)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    result = {}
    for level_dir in sorted(run_dir.glob("level_*")):
        suffix = level_dir.name[len("level_"):]
        if suffix.isdigit() and (level_dir / "mask.pt").is_file():
            result[int(suffix)] = MaskSet.load(level_dir / "mask.pt", model)
    return result


def random_prune_nm(masks: MaskSet, pattern, seed: int) -> MaskSet:
    """A random mask with the per-layer counts of ``masks`` that is N:M in every
    tensor with an N:M form (:func:`~pyprune_ext.lottery.nm.random_nm`); the
    other tensors are drawn as :func:`random_prune` per layer does."""
    pattern = NMPattern.parse(pattern)
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, mask in masks.items():
        if nm_problem(tuple(mask.shape), pattern) is None:
            result[name] = random_nm(mask, pattern, generator)
        else:
            result[name] = _scatter_kept(mask.numel(), int(mask.sum()), generator).view(mask.shape).to(mask.device)
    return MaskSet(result)


def control_masks(ticket_masks: MaskSet, control: str, seed: int, level: int, scope: str = "layer",
                  pattern=None) -> MaskSet:
    """The mask a control trains at ``level``: the ticket's own for ``"none"`` and
    ``"reinit"``, a random one with its sparsity for ``"random"`` (seeded by
    ``(seed, level)`` so every level gets an independent draw; N:M where the
    tickets are, with ``pattern``)."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    if control == "random":
        if pattern is not None and level >= 1:
            return random_prune_nm(ticket_masks, pattern, derive_seed(seed, "random-prune", level))
        return random_prune(ticket_masks, derive_seed(seed, "random-prune", level), scope)
    return ticket_masks
