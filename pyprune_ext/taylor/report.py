"""Costs of a channel-pruned model: the estimate used while pruning (to know
when the target is reached) and the before/after report."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from torch import Tensor, nn

from ..cost import LayerCost, ModelCost


def _removed_per_layer(groups: Sequence, alive: Mapping[int, Tensor]) -> tuple[dict, dict]:
    """Output channels and input features each layer loses with these masks."""
    out_removed: dict[str, int] = defaultdict(int)
    in_removed: dict[str, int] = defaultdict(int)
    for i, live in alive.items():
        removed = int((~live).sum())
        if not removed:
            continue
        for member in groups[i].members:
            if member.role in ("out", "norm", "depthwise"):
                out_removed[member.name] += removed
            if member.role == "in":
                in_removed[member.name] += removed * member.span
            if member.role == "depthwise":
                in_removed[member.name] += removed
    return out_removed, in_removed


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _scaled_layer(layer: LayerCost, module: nn.Module | None, out_left: int, in_left: int) -> LayerCost:
    """The layer's cost with out_left output channels and in_left input features."""
    out_frac = out_left / layer.out_features if layer.out_features else 1.0
    in_frac = in_left / layer.in_features if layer.in_features else 1.0
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not _is_depthwise(module):
        weight = module.weight.numel() * out_frac * in_frac
        bias = out_left if module.bias is not None else 0
        params, macs = round(weight) + bias, round(layer.macs * out_frac * in_frac)
    else:  # depthwise conv, norms: everything per channel
        params, macs = round(layer.params * out_frac), round(layer.macs * out_frac)
    return LayerCost(layer.name, layer.type, in_left, out_left, layer.output_shape, params, macs, layer.calls)


def estimate_layers(before: ModelCost, groups: Sequence, alive: Mapping[int, Tensor],
                    modules: Mapping[str, nn.Module]) -> list[LayerCost]:
    out_removed, in_removed = _removed_per_layer(groups, alive)
    return [_scaled_layer(layer, modules.get(layer.name),
                          layer.out_features - out_removed.get(layer.name, 0),
                          layer.in_features - in_removed.get(layer.name, 0))
            for layer in before.layers]


def _totals(before: ModelCost, layers: Sequence[LayerCost]) -> tuple[int, int]:
    """(MACs, params) of the model with ``layers`` in place of ``before.layers``."""
    params = before.total_params - sum(l.params for l in before.layers) + sum(l.params for l in layers)
    macs = before.total_macs - sum(l.macs for l in before.layers) + sum(l.macs for l in layers)
    return macs, params


def estimate_cost(before: ModelCost, groups: Sequence, alive: Mapping[int, Tensor],
                  modules: Mapping[str, nn.Module]) -> tuple[int, int]:
    """(MACs per example, parameters) after removing the channels not alive.
    Exact for Conv/Linear/norm layers; other parameters are unchanged."""
    return _totals(before, estimate_layers(before, groups, alive, modules))


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
            macs_after, params_after = _totals(before, after_layers)
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
