"""TaylorPruner: iterative Taylor-importance channel pruning during training,
then physical removal of the pruned channels.

Usage, in the user's own training loop::

    pruner = TaylorPruner(model, example_inputs, target=Target.flops(0.5))
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.step()            # scores this minibatch; prunes every `every` calls
        optimizer.step()         # pruned channels are re-zeroed after every step
        if pruner.done: ...      # target reached: fine-tune on
    small = pruner.finalize()    # an ordinary nn.Module with fewer channels
    print(pruner.report().format_table())

Schedule (the paper's): every ``every`` minibatches, the ``prune_per_step``
lowest-scored channels over all prunable groups (``scope="global"``) are
masked: zeroed in place and kept at zero through optimizer steps (weights and
optimizer state), until the target is reached. Scores are the mean over the
minibatches since the previous pruning step, smoothed across steps by an
exponential moving average (``momentum``). With ``scope="local"`` every group
loses the same fraction of its live channels per step instead.

Distributed training (DDP, launched with ``torchrun``): pass the
DistributedDataParallel-wrapped model (or the module inside it) on every rank.
The statistics are all-reduced every minibatch (see
:mod:`pyprune_ext.taylor.estimators`), so every rank ranks the same scores and
masks the same channels; a checksum all-reduce verifies it at each pruning step
and after ``finalize()``. ``finalize()`` changes the parameters' shapes, so the
DDP wrapper and the optimizer must be rebuilt around the returned module::

    small = pruner.finalize()
    model = DistributedDataParallel(small)          # new wrapper over the pruned module
    optimizer = torch.optim.SGD(model.parameters(), ...)

BatchNorm normalises each rank's local batch unless it is converted to
``torch.nn.SyncBatchNorm``; the pruning decisions are identical on every rank
either way. FSDP-sharded models are refused (each rank sees a shard of every
weight).
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..cost import ModelCost, count_cost
from ..graph import dependency_groups, remove_channels
from ..graph.attention import checked_gqa
from ..graph.specs import member_layer
from ..graph.surgery import member_positions, zeroed_entries
from ..nn.attention import convert as convert_attention
from .norm_masks import NormMasks
from ..masking import ZeroKeeper
from .importance import build_importance, read_scores
from .report import PruningReport, estimate_cost


@dataclass(frozen=True)
class Target:
    """When pruning stops: ``channels`` removed (a count), or the fraction of
    ``flops`` (multiply-accumulates) or ``params`` kept."""

    kind: str
    value: float

    @classmethod
    def flops(cls, keep: float) -> "Target":
        return cls("flops", keep)

    @classmethod
    def params(cls, keep: float) -> "Target":
        return cls("params", keep)

    @classmethod
    def channels(cls, removed: int) -> "Target":
        return cls("channels", removed)

    def __post_init__(self):
        if self.kind not in ("flops", "params", "channels"):
            raise ValueError(f"target kind must be 'flops', 'params' or 'channels', got {self.kind!r}")
        if self.kind == "channels":
            if self.value != int(self.value) or self.value < 1:
                raise ValueError(f"a channels target is a number of channels to remove (>= 1), got {self.value}")
        elif not 0.0 < self.value < 1.0:
            raise ValueError(f"a {self.kind} target is the fraction kept, strictly between 0 and 1, "
                             f"got {self.value}")


def _floor(group, max_fraction, round_to: int) -> int:
    """The fewest channels ``group`` may keep: one (``round_to`` where it has that
    many), and at least ``1 - max_fraction`` of them; for a group of several
    ``blocks`` (query heads per KV head) a count every block can keep alike: one
    per block, and a multiple of ``blocks`` (and of ``round_to``)."""
    blocks = group.blocks
    floor = math.lcm(blocks, round_to) if group.size >= round_to else blocks
    if max_fraction is None:
        return floor
    fraction = max_fraction(group) if callable(max_fraction) else max_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"max_fraction must be a fraction in [0, 1] (or a function of the group returning one), "
                         f"got {fraction!r} for group '{group.name}'")
    least = group.size - math.floor(fraction * group.size + 1e-9)
    return max(floor, blocks * math.ceil(least / blocks))  # never prune more than the fraction


NORMALIZATIONS = ("l2", "macs", "params")


def _normalization(normalize) -> str | None:
    """The ``normalize`` option as None or one of NORMALIZATIONS (True means "l2")."""
    if normalize is False or normalize is None:
        return None
    if normalize is True:
        return "l2"
    if isinstance(normalize, str) and normalize in NORMALIZATIONS:
        return normalize
    raise ValueError(f"normalize must be False, True or one of {', '.join(map(repr, NORMALIZATIONS))}, "
                     f"got {normalize!r}")


def alike_groups(groups, indices) -> list[list[int]]:
    """Classes of groups that are the same layer in different blocks: their member
    names and roles match once the block numbers are dropped
    (``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``), with equal sizes."""
    classes: dict[tuple, list[int]] = {}
    for i in indices:
        g = groups[i]
        key = (g.size, g.blocks,
               tuple(sorted((re.sub(r"\.\d+(?=\.|$)", ".*", m.name), m.role, m.span) for m in g.members)))
        classes.setdefault(key, []).append(i)
    return list(classes.values())


def _as_target(target) -> Target:
    if isinstance(target, Target):
        return target
    if isinstance(target, bool) or target is None:
        raise TypeError("target is required: Target.flops(keep), Target.params(keep) or Target.channels(n)")
    if isinstance(target, int):
        return Target.channels(target)
    if isinstance(target, float):
        return Target.flops(target)
    raise TypeError(f"target must be a Target, an int (channels to remove) or a float (FLOPs fraction kept), "
                    f"got {type(target).__name__}")


@dataclass
class PruneStep:
    """What one pruning step removed."""

    step: int                        # 1, 2, ... pruning steps so far
    minibatch: int                   # minibatches seen when it happened
    removed: dict[str, int]          # group name -> channels removed at this step
    channels_removed: int            # total so far
    flops_kept: float                # estimated fractions of the original model kept
    params_kept: float
    scores: dict[str, float] = field(default_factory=dict)  # group name -> lowest removed score


class TaylorPruner:
    """Taylor-importance channel pruning of ``model`` (see the module docs).

    Args:
        model: the model to prune (modified in place).
        example_inputs: a tensor or tuple of tensors the model runs on (for the
            dependency analysis and the FLOPs/parameter counts).
        importance: what channels are ranked by: the name of a registered
            criterion (:func:`~pyprune_ext.taylor.registered_importances`; built
            in: ``fo_bn``, the default, ``fo_gate``, ``fo_fg``, ``fo_weight``,
            ``so_fisher``, see :mod:`pyprune_ext.taylor.estimators`), an object
            following the :class:`~pyprune_ext.taylor.Importance` protocol built
            for this model's groups (pass the same list as ``groups=``), or a
            factory ``(model, groups, **options) -> Importance`` (a class).
        criterion: the older name of ``importance`` (give one of the two).
        target: when to stop: ``Target.flops(keep)``, ``Target.params(keep)``,
            ``Target.channels(n)``; an int means channels, a float FLOPs kept.
        prune_per_step: channels removed per pruning step (default: 2% of the
            prunable channels, at least 1).
        every: minibatches between pruning steps (the paper: 30).
        ignore: modules whose output channels must not be pruned.
        round_to: keep every group's channel count a multiple of this (when the
            group has at least that many channels), for fast kernels.
        scope: ``"global"`` (one ranking over all groups, the paper's) or
            ``"local"`` (each group loses the same fraction of its channels).
        momentum: EMA momentum of the scores across pruning steps (0 disables).
        normalize: how scores are made comparable across groups before ranking:
            False (default, as in the paper): raw scores; ``"l2"`` (or True): each
            group's scores divided by their L2 norm (a per-layer normalisation);
            ``"macs"`` / ``"params"``: each channel's score divided by the MACs /
            parameters its removal saves in the current model, so a unit that costs
            as much as sixteen others (an attention head beside MLP neurons) must be
            that much more important to stay: the greedy order of keeping the most
            importance within a cost budget.
        square_then_sum: ``fo_weight`` only: sum of squares instead of square of sum.
        groups: precomputed :func:`pyprune_ext.graph.dependency_groups` (optional).
        gqa: grouped-query attention's unit (see
            :func:`~pyprune_ext.graph.dependency_groups`): ``"kv"`` (default), a KV
            head with its query heads; ``"query"``, query heads one by one with the
            KV heads kept and the same number of query heads kept per KV head. The
            ranking then removes, from such a group of Hkv blocks, the lowest-scored
            live query head of every block at once, scored by their mean (the unit
            takes Hkv channels of the step's budget, like Hkv channels, so its score
            per channel is what competes, also per MAC with ``normalize="macs"``);
            ``max_fraction`` and ``round_to`` are met with whole such units.
            ``prune_per_step`` must be at least Hkv.
        max_fraction: the largest fraction of each group that may be pruned: a
            float, or a function of the :class:`~pyprune_ext.graph.ChannelGroup`
            (e.g. 0.25 for attention heads, 0.3 for MLP neurons; 0 leaves a group alone).
        uniform: alike groups (the same layer in every block, e.g. each layer's
            heads) lose the same number of channels, ranked by their mean score, so
            every block keeps the same shape (a Hugging Face config can describe it).
        distributed: None (default): synchronise the statistics over the ranks
            when torch.distributed is initialised with more than one process;
            True: require that; False: never (each process prunes on its own).
        process_group: the process group to synchronise over (default: the world).

    Groups the analysis marks unprunable, and groups where zeroing a channel is
    not the same as removing it (``exact_masking`` False), are left alone, except
    groups coupled only to LayerNorm/RMSNorm over their channels (a transformer's
    residual stream, ``ChannelGroup.exact_with_masked_norms``): those norms then
    take their statistics over the kept channels (:mod:`pyprune_ext.taylor.norm_masks`),
    so the masked model computes what the pruned one will. A group never loses
    its last channel.
    """

    def __init__(self, model: nn.Module, example_inputs, importance=None, *, criterion=None, target=None,
                 prune_per_step: int | None = None, every: int = 30, ignore: Iterable[nn.Module] = (),
                 round_to: int = 1, scope: str = "global", momentum: float = 0.9, normalize: bool | str = False,
                 square_then_sum: bool = False, groups: Sequence | None = None, gqa: str = "kv",
                 max_fraction=None, uniform: bool = False,
                 distributed: bool | None = None, process_group=None):
        if importance is not None and criterion is not None:
            raise TypeError("TaylorPruner: give importance= or its older name criterion=, not both")
        self.target = _as_target(target)
        model = dist_utils.unwrap_model(model, "TaylorPruner")
        self.sync = dist_utils.sync_for(distributed, process_group)
        if every < 1:
            raise ValueError(f"every must be >= 1 minibatch, got {every}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        if scope not in ("global", "local"):
            raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
        if uniform and scope != "global":
            raise ValueError("uniform=True ranks alike groups together: it needs scope='global'")
        gqa = checked_gqa(gqa)
        if groups is not None and gqa != "kv":
            raise ValueError("TaylorPruner: gqa= chooses how dependency_groups analyses the model; with precomputed "
                             "groups= pass it to dependency_groups(..., gqa=...) instead")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.model, self.every, self.round_to, self.scope = model, every, round_to, scope
        self.momentum, self.normalize = momentum, _normalization(normalize)
        self.example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        # torch's MultiheadAttention and torchvision's Swin window attention compute their output
        # projection as a function, where a head's gate cannot observe it: switch to pyprune_ext's
        # (same parameters and outputs)
        self.converted_attention = convert_attention(model)
        self.groups = list(groups) if groups is not None else dependency_groups(model, self.example_inputs, ignore,
                                                                                gqa=gqa)
        self.prunable = [i for i, g in enumerate(self.groups)
                         if g.prunable and (g.exact_masking or g.exact_with_masked_norms)]
        self._floor = {i: _floor(self.groups[i], max_fraction, round_to) for i in self.prunable}
        self.prunable = [i for i in self.prunable if self._floor[i] < self.groups[i].size]
        self.uniform = uniform
        self._alike = alike_groups(self.groups, self.prunable) if uniform else None
        if not self.prunable:
            raise ValueError("no prunable channel group found in the model (see the dependency-analysis warnings)")
        total = sum(self.groups[i].size for i in self.prunable)
        self.prune_per_step = prune_per_step if prune_per_step is not None else max(1, round(0.02 * total))
        if self.prune_per_step < 1:
            raise ValueError(f"prune_per_step must be >= 1, got {prune_per_step}")
        widest = max(self.prunable, key=lambda i: self.groups[i].blocks)
        if self.prune_per_step < self.groups[widest].blocks:
            raise ValueError(f"prune_per_step ({self.prune_per_step}) is smaller than the {self.groups[widest].blocks} "
                             f"query heads group '{self.groups[widest].name}' loses at once (one per key/value head, "
                             "gqa='query'): it could never be pruned")
        device = next(model.parameters()).device
        self.alive = {i: torch.ones(self.groups[i].size, dtype=torch.bool) for i in self.prunable}
        if importance is None:
            importance = criterion if criterion is not None else "fo_bn"
        self.importance = build_importance(importance, model, self.groups, device=device, sync=self.sync,
                                           square_then_sum=square_then_sum)
        self.importance.attach()
        # a pruner dropped before finishing takes its hooks off the model (the callback holds
        # the importance object, not the pruner, so it does not keep the pruner alive)
        self._detach_when_collected = weakref.finalize(self, self.importance.detach)
        self._ema: dict[int, Tensor] = {}
        self._zeros = ZeroKeeper()  # masked channels, held at zero after every optimizer step
        # norms over pruned channels take their statistics over the kept ones (masking == removal)
        self._norm_masks = NormMasks(model, [n for i in self.prunable for n in self.groups[i].masked_norms])
        weakref.finalize(self, self._norm_masks.remove)
        self._modules = dict(model.named_modules())
        self.cost_before: ModelCost = count_cost(model, self.example_inputs)
        self.history: list[PruneStep] = []
        self.minibatches = 0
        self.done = False
        self.finalized = False

    # ------------------------------------------------------------------ loop

    def step(self) -> PruneStep | None:
        """Call after each ``loss.backward()``: adds this minibatch's scores and,
        every ``every`` minibatches, prunes. Returns what it pruned, or None."""
        if self.finalized:
            raise RuntimeError("TaylorPruner.step() after finalize(): the model has been rebuilt")
        if self.done or not self.importance.end_minibatch():
            return None
        self.minibatches += 1
        if self.minibatches % self.every:
            return None
        return self.prune_now()

    def prune_now(self) -> PruneStep | None:
        """One pruning step with the scores gathered so far."""
        scores = self._smoothed_scores()
        self.importance.reset()
        chosen = self._choose(scores)
        self._check_ranks_agree(f"pruning step {len(self.history) + 1}'s channels",
                                [torch.tensor([i] + list(c)) for i, c in sorted(chosen.items())])
        if not chosen:
            self._finish("no channel left to prune: every group is at its minimum size")
            return None
        for i, channels in chosen.items():
            self._mask_channels(i, channels)
        record = self._record(chosen, scores)
        self.history.append(record)
        if self._target_reached():
            self._finish(None)
        return record

    # ------------------------------------------------------------- scoring

    def _smoothed_scores(self) -> dict[int, Tensor]:
        means = read_scores(self.importance, self.groups, self.prunable)
        costs = self.channel_costs(self.normalize) if self.normalize in ("macs", "params") else None
        scores = {}
        for i in self.prunable:
            score = means[i]
            if i in self._ema and self.momentum > 0:
                score = self.momentum * self._ema[i] + (1 - self.momentum) * score
            self._ema[i] = score
            if self.normalize == "l2":
                score = score / score[self.alive[i]].norm().clamp_min(1e-30)
            elif costs is not None:
                score = score / costs[i]
            scores[i] = torch.where(self.alive[i], score, torch.zeros_like(score))
        return scores

    def channel_costs(self, kind: str = "macs") -> dict[int, int]:
        """Prunable group index -> the MACs (``kind="macs"``) or parameters
        (``"params"``) that removing one more of its live channels saves, given the
        channels masked so far (a neuron's cost shrinks as the residual width it
        reads shrinks). At least 1: a channel that saves nothing scores its full
        importance and goes last, unless its importance is zero."""
        if kind not in ("macs", "params"):
            raise ValueError(f"channel_costs: kind must be 'macs' or 'params', got {kind!r}")
        macs, params = self.estimated_cost()
        base = macs if kind == "macs" else params
        costs = {}
        for i in self.prunable:
            live = self.alive[i].nonzero().flatten()
            if not len(live):
                costs[i] = 1
                continue
            after = self.estimated_cost({i: [int(live[0])]})[0 if kind == "macs" else 1]
            costs[i] = max(base - after, 1)
        return costs

    def _min_alive(self, i: int) -> int:
        return self._floor[i]

    def _choose(self, scores: dict[int, Tensor]) -> dict[int, list[int]]:
        """group -> channels to mask at this step."""
        if self.uniform:
            chosen = self._choose_uniform(scores)
        elif self.scope == "global":
            chosen = self._choose_global(scores)
        else:
            chosen = self._choose_local(scores)
        if self.round_to > 1:
            chosen = self._round_counts(chosen, scores)
        return {i: c for i, c in chosen.items() if c}

    def _removal_units(self, i: int, scores) -> list[tuple[float, list[int]]]:
        """Group ``i``'s live channels as the units the ranking removes, lowest score
        first: (score, channels). A unit is one channel, except in a group of several
        ``blocks`` (query heads per KV head, gqa="query"), whose k-th unit is the k-th
        lowest live channel of every block, so removing whole units keeps the blocks
        equal. Such a unit scores the mean of its channels: it takes ``blocks``
        channels of the step's budget, so its score per channel is what competes
        (and with normalize="macs" the mean of per-MAC scores is the unit's
        importance per MAC)."""
        group = self.groups[i]
        order = torch.argsort(scores[i], stable=True)
        order = order[self.alive[i][order]]
        if group.blocks == 1:
            return [(score, [c]) for score, c in zip(scores[i][order].tolist(), order.tolist())]
        width = group.size // group.blocks
        per_block = [order[order // width == b] for b in range(group.blocks)]
        units = torch.stack(per_block, dim=1)  # row k: the k-th lowest live channel of every block
        return list(zip(scores[i][units].mean(1).tolist(), units.tolist()))

    def _choose_global(self, scores) -> dict[int, list[int]]:
        candidates = sorted((score, i, k, unit) for i in self.prunable
                            for k, (score, unit) in enumerate(self._removal_units(i, scores)))
        chosen: dict[int, list[int]] = {}
        alive = {i: int(self.alive[i].sum()) for i in self.prunable}
        budget = self._step_budget()
        for _, i, _, unit in candidates:
            if budget == 0:
                break
            if len(unit) > budget or alive[i] - len(unit) < self._min_alive(i):
                continue
            chosen.setdefault(i, []).extend(unit)
            alive[i] -= len(unit)
            budget -= len(unit)
            if self.target.kind != "channels" and self._target_reached(extra=chosen):
                break
        return chosen

    def _choose_uniform(self, scores) -> dict[int, list[int]]:
        """Global ranking over classes of alike groups (the same layer in every
        block): a class's next candidate is the mean of its groups' lowest live
        scores (removal units, see ``_removal_units``), and taking it removes one
        unit from each of its groups, so alike groups keep equal sizes (a Hugging
        Face config then still fits)."""
        units = {i: self._removal_units(i, scores) for i in self.prunable}
        taken = {i: 0 for i in self.prunable}
        alive = {i: int(self.alive[i].sum()) for i in self.prunable}
        chosen: dict[int, list[int]] = {}
        budget = self._step_budget()
        while budget > 0:
            best = None
            for members in self._alike:
                width = sum(self.groups[i].blocks for i in members)  # channels one candidate removes
                if width > budget or any(alive[i] - self.groups[i].blocks < self._min_alive(i) for i in members):
                    continue
                mean = sum(units[i][taken[i]][0] for i in members) / len(members)
                if best is None or mean < best[0]:
                    best = (mean, members, width)
            if best is None:
                break
            for i in best[1]:
                chosen.setdefault(i, []).extend(units[i][taken[i]][1])
                taken[i] += 1
                alive[i] -= self.groups[i].blocks
            budget -= best[2]
            if self.target.kind != "channels" and self._target_reached(extra=chosen):
                break
        return chosen

    def _choose_local(self, scores) -> dict[int, list[int]]:
        alive_total = sum(int(a.sum()) for a in self.alive.values())
        fraction = min(1.0, self._step_budget() / max(alive_total, 1))
        chosen = {}
        for i in self.prunable:
            units = self._removal_units(i, scores)
            spare = (int(self.alive[i].sum()) - self._min_alive(i)) // self.groups[i].blocks
            count = min(math.ceil(fraction * len(units)), spare)
            if count > 0:
                chosen[i] = [c for _, unit in units[:count] for c in unit]
        return chosen

    def _round_counts(self, chosen, scores) -> dict[int, list[int]]:
        """Adjusts each group's removal so its live count is a multiple of round_to
        (nearest multiple, never below round_to). A group of several blocks rounds
        the count per block to a multiple of ``quantum``, which makes the total a
        multiple of round_to, and removes whole units (``_removal_units``)."""
        rounded = {}
        for i, picked in chosen.items():
            group = self.groups[i]
            if group.size < self.round_to:
                rounded[i] = picked
                continue
            quantum = self.round_to // math.gcd(group.blocks, self.round_to)
            live = int(self.alive[i].sum()) // group.blocks  # per block
            remaining = live - len(picked) // group.blocks
            keep = max(quantum, int(round(remaining / quantum)) * quantum)
            units = self._removal_units(i, scores)
            rounded[i] = [c for _, unit in units[:max(live - keep, 0)] for c in unit]
        return rounded

    def _step_budget(self) -> int:
        if self.target.kind == "channels":
            return min(self.prune_per_step, int(self.target.value) - self.channels_removed)
        return self.prune_per_step

    # -------------------------------------------------------------- masking

    def _mask_channels(self, i: int, channels: list[int]) -> None:
        group = self.groups[i]
        self.alive[i][channels] = False
        index = torch.tensor(channels, dtype=torch.long)
        for member in group.members:
            positions = member_positions(member, index)
            module, spec = member_layer(self._modules, member)
            # a zeroes_inputs group (query heads reading kept KV heads) zeroes its consumers' columns too
            for param, dim, entries in zeroed_entries(module, member.role, positions, spec,
                                                      inputs=group.zeroes_inputs):
                self._zeros.add_indices(param, dim, entries)
            if member.role == "norm" and member.name in self._norm_masks.keep:
                self._norm_masks.mask(member.name, positions)

    def _check_ranks_agree(self, what: str, tensors) -> None:
        if self.sync is not None:
            dist_utils.check_same_on_all_ranks(what, dist_utils.tensor_bytes(tensors), self.sync.group)

    # ------------------------------------------------------------ progress

    @property
    def channels_removed(self) -> int:
        return sum(int((~a).sum()) for a in self.alive.values())

    def estimated_cost(self, extra: dict[int, list[int]] | None = None) -> tuple[int, int]:
        """(MACs, params) the model will have after finalize(), with the channels
        masked so far (and ``extra`` ones)."""
        alive = {i: a.clone() for i, a in self.alive.items()}
        for i, channels in (extra or {}).items():
            alive[i][channels] = False
        return estimate_cost(self.cost_before, self.groups, alive, self._modules)

    def _target_reached(self, extra=None) -> bool:
        if self.target.kind == "channels":
            return self.channels_removed >= self.target.value
        macs, params = self.estimated_cost(extra)
        if self.target.kind == "flops":
            return macs <= self.target.value * self.cost_before.total_macs
        return params <= self.target.value * self.cost_before.total_params

    def _record(self, chosen, scores) -> PruneStep:
        macs, params = self.estimated_cost()
        names = {i: self.groups[i].name for i in chosen}
        return PruneStep(
            step=len(self.history) + 1, minibatch=self.minibatches,
            removed={names[i]: len(c) for i, c in chosen.items()},
            channels_removed=self.channels_removed,
            flops_kept=macs / max(self.cost_before.total_macs, 1),
            params_kept=params / max(self.cost_before.total_params, 1),
            scores={names[i]: float(scores[i][c].min()) for i, c in chosen.items()})

    def _finish(self, why_short: str | None) -> None:
        self.done = True
        self.importance.detach()
        if why_short is not None:
            warnings.warn(f"TaylorPruner stopped before its target {self.target}: {why_short}", stacklevel=3)

    # ------------------------------------------------------------- results

    def finalize(self) -> nn.Module:
        """Removes the masked channels physically and returns the model: plain
        torch modules, no hooks, nothing from pyprune_ext needed to run it.
        Optimizers built on the old parameters must be rebuilt, and so must a
        DistributedDataParallel wrapper (the module inside it is returned)."""
        if self.finalized:
            return self.model
        self.importance.detach()
        self._norm_masks.remove()
        self._zeros.remove()
        self._zeros.clear()  # its indices are of the shapes before removal
        keep = {i: a.nonzero().flatten() for i, a in self.alive.items() if not bool(a.all())}
        remove_channels(self.model, self.groups, keep)
        self._check_ranks_agree("the finalized model's parameter shapes",
                                [torch.tensor(p.shape) for p in self.model.parameters()])
        self.finalized = True
        self.done = True
        self.cost_after = count_cost(self.model, self.example_inputs)
        return self.model

    def report(self) -> PruningReport:
        """Per-layer channels, parameters and MACs before and after (measured on
        the finalized model, estimated before finalize)."""
        after = self.cost_after if self.finalized else None
        alive = {i: a.clone() for i, a in self.alive.items()}
        return PruningReport.build(self.cost_before, after, self.groups, alive, self._modules, self.history)

    def plan(self) -> dict[str, list[int]]:
        """The channels kept, per pruned group name: with :func:`apply_plan` it
        rebuilds the pruned architecture from a freshly built model, so a
        ``state_dict`` of the pruned model can be loaded into it."""
        return {self.groups[i].name: a.nonzero().flatten().tolist()
                for i, a in self.alive.items() if not bool(a.all())}

    def remove(self) -> None:
        """Detaches every hook without finalizing (masked channels stay zero; norms
        over masked channels count them in their statistics again)."""
        self.importance.detach()
        self._norm_masks.remove()
        self._zeros.remove()
        self.done = True


def apply_plan(model: nn.Module, example_inputs, plan: dict[str, list[int]], gqa: str = "kv") -> nn.Module:
    """Removes channels from ``model`` (in place) as ``plan`` (from
    :meth:`TaylorPruner.plan`) says, e.g. to rebuild a pruned architecture from
    a fresh model before loading the pruned model's ``state_dict``. ``gqa``: the
    pruner's (the groups a plan names depend on it)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    groups = dependency_groups(model, inputs, gqa=gqa)
    index = {g.name: i for i, g in enumerate(groups)}
    unknown = sorted(set(plan) - set(index))
    if unknown:
        raise ValueError(f"apply_plan: the model has no channel group named {unknown[0]!r} "
                         f"(was the plan made for another architecture?)")
    keep = {index[name]: torch.tensor(kept, dtype=torch.long) for name, kept in plan.items()}
    return remove_channels(model, groups, keep)
