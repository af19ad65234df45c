"""Costs of a channel-pruned model: the estimate used while pruning (to know
when the target is reached) and the before/after report."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from torch import Tensor, nn

from ..cost import LayerCost, ModelCost
from ..graph.specs import spec_for


def _removed_per_axis(groups: Sequence, alive: Mapping[int, Tensor]) -> dict[str, dict[str, int]]:
    """module name -> role -> positions that axis loses with these masks."""
    removed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i, live in alive.items():
        count = int((~live).sum())
        if count:
            for member in groups[i].members:
                removed[member.name][member.role] += count * member.span
    return removed


def _scaled_layer(layer: LayerCost, module: nn.Module | None, removed: Mapping[str, int]) -> LayerCost:
    """The layer's cost once ``removed[role]`` positions left each axis of its spec:
    parameters from the shrunk tensor shapes, MACs in proportion to the weight
    (every counted layer's MACs are proportional to its weight's size: a conv's
    output channels x input channels per group, a Linear's features, a norm's
    channels), features in proportion to the axes they are counted on."""
    spec = spec_for(module, any_subclass=True) if module is not None else None
    if spec is None or not removed:
        return layer
    axes = spec.axes(module)
    kept = {role: (axes[role].length - n) / axes[role].length for role, n in removed.items()
            if role in axes and axes[role].length}
    own = [(name, p) for name, p in module._parameters.items() if p is not None]
    before = sum(p.numel() for _, p in own)
    after = sum(spec.shrunk_numel(module, name, removed) for name, _ in own)
    params = round(layer.params * after / before) if before else 0
    weight = module._parameters.get(spec.macs_tensor)
    if weight is not None and weight.numel():
        macs_kept = spec.shrunk_numel(module, spec.macs_tensor, removed) / weight.numel()
    else:  # a norm without affine parameters: per channel
        macs_kept = math.prod(kept.values())
    in_kept = math.prod(kept[r] for r in kept if axes[r].in_feature)
    out_kept = math.prod(kept[r] for r in kept if axes[r].out_feature)
    return LayerCost(layer.name, layer.type, round(layer.in_features * in_kept), round(layer.out_features * out_kept),
                     layer.output_shape, params, round(layer.macs * macs_kept), layer.calls)


def estimate_layers(before: ModelCost, groups: Sequence, alive: Mapping[int, Tensor],
                    modules: Mapping[str, nn.Module]) -> list[LayerCost]:
    removed = _removed_per_axis(groups, alive)
    return [_scaled_layer(layer, modules.get(layer.name), removed.get(layer.name, {})) for layer in before.layers]


def _tensor_params_removed(groups: Sequence, alive: Mapping[int, Tensor], modules) -> int:
    """Parameters that the tensors read directly (role "tensor" members) lose."""
    removed = 0
    for i, live in alive.items():
        count = int((~live).sum())
        for member in groups[i].members if count else ():
            if member.role == "tensor":
                owner, _, attr = member.name.rpartition(".")
                tensor = modules[owner]._parameters.get(attr)
                if tensor is not None:
                    removed += tensor.numel() // tensor.shape[member.dim] * count * member.span
    return removed


def _totals(before: ModelCost, layers: Sequence[LayerCost], tensors_removed: int = 0) -> tuple[int, int]:
    """(MACs, params) of the model with ``layers`` in place of ``before.layers``
    and ``tensors_removed`` parameters fewer outside them."""
    params = before.total_params - sum(l.params for l in before.layers) + sum(l.params for l in layers) \
        - tensors_removed
    macs = before.total_macs - sum(l.macs for l in before.layers) + sum(l.macs for l in layers)
    return macs, params


def estimate_cost(before: ModelCost, groups: Sequence, alive: Mapping[int, Tensor],
                  modules: Mapping[str, nn.Module]) -> tuple[int, int]:
    """(MACs per example, parameters) after removing the channels not alive.
    Exact for the layers with a spec; other parameters are unchanged."""
    return _totals(before, estimate_layers(before, groups, alive, modules),
                   _tensor_params_removed(groups, alive, modules))


@dataclass(frozen=True)
class LayerChange:
    name: str
    type: str
    in_before: int         # input / output channels (features)
    out_before: int
    in_after: int
    out_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def channels_before(self) -> str:
        return f"{self.in_before}->{self.out_before}"

    @property
    def channels_after(self) -> str:
        return f"{self.in_after}->{self.out_after}"


@dataclass(frozen=True)
class PruningReport:
    """Per-layer and total channels / parameters / MACs (per example) before and
    after pruning. ``measured`` is True once the model has been finalized (the
    "after" side counted on the rebuilt model), False for an estimate."""

    layers: tuple[LayerChange, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    measured: bool
    steps: int

    @classmethod
    def build(cls, before: ModelCost, after: ModelCost | None, groups, alive, modules, history) -> "PruningReport":
        if after is not None:
            by_name = {l.name: l for l in after.layers}
            after_layers = [by_name.get(l.name, l) for l in before.layers]
            params_after, macs_after = after.total_params, after.total_macs
        else:
            after_layers = estimate_layers(before, groups, alive, modules)
            macs_after, params_after = _totals(before, after_layers, _tensor_params_removed(groups, alive, modules))
        rows = tuple(LayerChange(b.name, b.type, b.in_features, b.out_features, a.in_features, a.out_features,
                                 b.params, a.params, b.macs, a.macs)
                     for b, a in zip(before.layers, after_layers))
        return cls(rows, before.total_params, params_after, before.total_macs, macs_after,
                   after is not None, len(history))

    @property
    def flops_kept(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    @property
    def params_kept(self) -> float:
        return self.params_after / max(self.params_before, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [asdict(l) for l in self.layers]
        out.update(flops_kept=self.flops_kept, params_kept=self.params_kept)
        return out

    def format_table(self) -> str:
        header = ("layer", "type", "channels before", "after", "params before", "after", "MACs before", "after")
        rows = [(l.name, l.type, l.channels_before, l.channels_after, f"{l.params_before:,}",
                 f"{l.params_after:,}", f"{l.macs_before:,}", f"{l.macs_after:,}") for l in self.layers]
        rows.append(("total", "", "", "", f"{self.params_before:,}", f"{self.params_after:,}",
                     f"{self.macs_before:,}", f"{self.macs_after:,}"))
        widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
        line = lambda r: "  ".join(str(v).ljust(w) if k < 2 else str(v).rjust(w)  # noqa: E731
                                   for k, (v, w) in enumerate(zip(r, widths)))
        kind = "measured" if self.measured else "estimated"
        summary = (f"params kept {self.params_kept:.1%}, MACs kept {self.flops_kept:.1%} "
                   f"({kind}, {self.steps} pruning steps)")
        return "\n".join([line(header), *map(line, rows), summary])

    def __str__(self) -> str:
        return self.format_table()
