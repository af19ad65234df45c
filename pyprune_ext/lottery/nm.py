"""N:M semi-structured masks: at most N weights kept in every M consecutive inputs.

NVIDIA's sparse tensor cores run the 2:4 pattern (two of every four weights
zero); PyTorch exposes it as semi-structured sparse tensors. Learning N:M masks
by magnitude keeps accuracy close to dense (Zhou et al., ICLR 2021).

Where the groups lie (:func:`groups_view`): along a layer's input, the dim a
matrix product reduces over. A Linear weight ``(out, in)`` is grouped along
``in``; a convolution weight ``(out, in, kh, kw)`` along ``in`` at each kernel
position, as an implicit GEMM over channels-last inputs reads it (NVIDIA's
ASP does the same). A tensor whose input dim is not a multiple of M has no N:M
form (:func:`nm_problem` says why).

A mask that is a subset of an N:M mask is N:M too, so unstructured pruning on
top of an N:M level keeps the pattern (:func:`is_nm` checks "at most N").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

__all__ = ["NMPattern", "groups_view", "is_nm", "nm_problem", "nm_select", "random_nm", "check_nm"]


@dataclass(frozen=True)
class NMPattern:
    """``n`` kept of every ``m`` consecutive weights along the input dim."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"an N:M pattern needs integers 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: "str | NMPattern") -> "NMPattern":
        """``"2:4"`` -> NMPattern(2, 4)."""
        if isinstance(text, NMPattern):
            return text
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"pattern must be written N:M (e.g. '2:4'), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def nm_problem(shape, pattern: NMPattern) -> Optional[str]:
    """Why a tensor of ``shape`` has no N:M form, or None when it has one."""
    if len(shape) not in (2, 4):
        return f"{len(shape)}-D tensor (N:M applies to Linear (out, in) and Conv2d (out, in, kh, kw) weights)"
    if shape[1] % pattern.m:
        return f"its input dim ({shape[1]}) is not a multiple of {pattern.m}"
    return None


def groups_view(t: Tensor, pattern: NMPattern) -> Tensor:
    """``t`` as ``(..., M)``: its last dim runs over one group of M consecutive
    inputs (a view for Linear weights; a permuted copy for convolutions)."""
    problem = nm_problem(t.shape, pattern)
    if problem:
        raise ValueError(f"no {pattern} groups: {problem}")
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)  # (out, kh, kw, in): the inputs of one kernel position together
    return t.reshape(*t.shape[:-1], t.shape[-1] // pattern.m, pattern.m)


def _from_groups(groups: Tensor, shape) -> Tensor:
    """The inverse of :func:`groups_view`."""
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return groups.reshape(shape)


def is_nm(mask: Tensor, pattern: NMPattern) -> bool:
    """Whether every group of M inputs keeps at most N weights."""
    return bool((groups_view(mask, pattern).sum(-1) <= pattern.n).all())


def nm_select(weight: Tensor, mask: Tensor, pattern: NMPattern) -> Tensor:
    """The N:M mask that keeps, in every group of M inputs, the N kept weights of
    largest ``|weight|`` (all of them where fewer than N are kept; ties go to the
    lower input index). Pruned weights stay pruned."""
    if weight.shape != mask.shape:
        raise ValueError(f"weight shape {list(weight.shape)} and mask shape {list(mask.shape)} differ")
    if not bool(torch.isfinite(weight[mask]).all()):
        raise ValueError("nm_select: the weights hold NaN or inf (did training diverge?)")
    kept = groups_view(mask, pattern)
    score = groups_view(weight.detach().abs().to(torch.float64), pattern).masked_fill(~kept, -1.0)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros_like(kept)
    chosen.scatter_(-1, order[..., :pattern.n], True)
    return _from_groups(chosen & kept, mask.shape)


def random_nm(mask: Tensor, pattern: NMPattern, generator: torch.Generator) -> Tensor:
    """A random N:M mask keeping as many weights as ``mask`` (at most N/M of them):
    N random positions in every group, then random ones of those dropped until
    the count matches. Draws on the CPU; returned on ``mask``'s device."""
    groups = groups_view(torch.ones(mask.shape, dtype=torch.bool), pattern)
    keys = torch.rand(groups.shape, generator=generator)
    chosen = torch.zeros_like(groups)
    chosen.scatter_(-1, keys.argsort(dim=-1)[..., :pattern.n], True)
    flat = _from_groups(chosen, mask.shape).flatten()
    target = int(mask.sum())
    if target > int(flat.sum()):
        raise ValueError(f"random_nm: the mask keeps {target} weights, more than {pattern} allows "
                         f"({int(flat.sum())})")
    positions = flat.nonzero().flatten()
    drop = positions[torch.randperm(positions.numel(), generator=generator)[:positions.numel() - target]]
    flat[drop] = False
    return flat.view(mask.shape).to(mask.device)


def check_nm(masks: "Dict[str, Tensor]", pattern: NMPattern, names: Iterable[str], what: str = "mask") -> None:
    """Raises ValueError naming the first tensor of ``names`` whose mask is not N:M."""
    for name in names:
        mask = masks[name]
        if not is_nm(mask, pattern):
            worst = int(groups_view(mask, pattern).sum(-1).max())
            raise ValueError(f"{what}: {name} is not {pattern}: a group of {pattern.m} inputs keeps {worst} weights")
