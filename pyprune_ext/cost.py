"""Parameter and multiply-accumulate (MAC) counts per layer, from one forward pass.

:func:`count_cost` runs the model once on example inputs with forward hooks on the
layers that carry the arithmetic (hooks, not ``torch.fx``: any model that runs
eagerly can be counted, data-dependent control flow included) and returns a
:class:`ModelCost`.

Conventions (the ones behind published "GMACs" / "GFLOPs" figures such as
ResNet-18's 1.82 G):

* MACs are **per example**: the counts for the given inputs divided by their batch
  size (the first dimension of the first input). Pass a batch of one to read them
  directly; the division is exact for every counted layer since their work is
  linear in the batch.
* Convolution: ``output elements x (in_channels / groups) x prod(kernel_size)``.
  Transposed convolution: ``input elements x (out_channels / groups) x prod(kernel_size)``.
* Linear: ``output elements x in_features`` (so a Linear over ``(N, L, D)`` counts
  ``L x D x out_features`` per example).
* Bias additions, activations, pooling and residual additions are not counted.
* Embedding: its parameters are counted, its MACs are 0 (a table lookup).
* BatchNorm / LayerNorm / RMSNorm / GroupNorm: their parameters are counted; their MACs are 0
  unless ``norm_macs=True``, which counts one MAC per output element (the scale and
  shift a normalisation costs at inference once BatchNorm is folded; LayerNorm's
  statistics are not counted).
* Parameters: a layer's own parameters (weight and bias, dense count: a pruning
  mask does not change it; a tensor tied between layers is counted in the first).
  ``ModelCost.total_params`` is the sum over **all**
  parameters of the model (each shared tensor once), hooked layer or not.
* A layer called several times (weight sharing) adds its MACs for every call; its
  parameters are counted once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .graph.specs import LayerSpec, spec_for

__all__ = ["LayerCost", "ModelCost", "count_cost"]


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer.

    Attributes:
        name: qualified module name (``"layer1.0.conv1"``; ``""`` for the model itself).
        type: module class name.
        in_features, out_features: input/output channels (convolutions,
            normalisations) or features (Linear).
        output_shape: shape of the layer's output without the batch dimension
            (last call); ``None`` if the layer did not run.
        params: number of the layer's own parameters.
        macs: multiply-accumulates per example, summed over calls.
        calls: how many times the layer ran in the forward pass.
    """

    name: str
    type: str
    in_features: int
    out_features: int
    output_shape: Optional[Tuple[int, ...]]
    params: int
    macs: int
    calls: int


@dataclass(frozen=True)
class ModelCost:
    """Per-layer costs and totals of a model for one input shape (see module docs)."""

    layers: Tuple[LayerCost, ...]
    total_params: int
    total_macs: int
    batch_size: int
    input_shapes: Tuple[Tuple[int, ...], ...]

    @property
    def layer_params(self) -> int:
        """Parameters held by the listed layers."""
        return sum(row.params for row in self.layers)

    @property
    def other_params(self) -> int:
        """Parameters outside the listed layers (embeddings, custom modules...)."""
        return self.total_params - self.layer_params

    def to_dict(self) -> dict:
        """Plain-data form for JSON reports."""
        return {
            "layers": [asdict(row) for row in self.layers],
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "batch_size": self.batch_size,
            "input_shapes": [list(s) for s in self.input_shapes],
        }

    def format_table(self) -> str:
        """A text table, one row per layer, then the totals."""
        header = ("layer", "type", "in", "out", "output", "params", "MACs")
        rows = [(row.name or "(model)", row.type, str(row.in_features), str(row.out_features),
                 "x".join(map(str, row.output_shape)) if row.output_shape is not None else "-",
                 f"{row.params:,}", f"{row.macs:,}") for row in self.layers]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(header)]
        numeric = {2, 3, 5, 6}  # right-align numbers

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "-" * len(line(header))
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        out = [line(header), rule, *(line(r) for r in rows), rule]
        out.append(f"total params: {self.total_params:,} ({_human(self.total_params)})"
                   + (f", of which {self.other_params:,} outside the listed layers"
                      if self.other_params else ""))
        out.append(f"total MACs per example: {self.total_macs:,} ({_human(self.total_macs)}) "
                   f"for input {shapes} (batch {self.batch_size})")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format_table()


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _cost_spec(module: nn.Module) -> Optional[LayerSpec]:
    """The layer spec that counts this module (pyprune_ext.graph.specs), if any."""
    spec = spec_for(module, any_subclass=True)
    return spec if spec is not None and spec.cost else None


def _as_tuple(example_inputs) -> Tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a Tensor or a non-empty tuple/list of inputs "
                    f"for model(*example_inputs), got {type(example_inputs).__name__}")


def count_cost(model: nn.Module, example_inputs: Union[Tensor, Sequence], *,
               norm_macs: bool = False) -> ModelCost:
    """Counts parameters and per-example MACs of every Conv, Linear, Embedding and norm
    layer (every layer whose spec in :mod:`pyprune_ext.graph.specs` has ``cost``).

    The model runs once, under ``torch.no_grad()`` and in eval mode (so BatchNorm
    running statistics are not updated and a batch of one works); every module's
    train/eval flag is restored afterwards.

    Args:
        model: any ``nn.Module``.
        example_inputs: a Tensor, or a tuple/list of positional inputs; the first
            must be a Tensor whose first dimension is the batch.
        norm_macs: count one MAC per output element of normalisation layers.

    Returns:
        :class:`ModelCost`, layers in ``model.named_modules()`` order.
    """
    inputs = _as_tuple(example_inputs)
    first = inputs[0]
    if not isinstance(first, Tensor) or first.dim() == 0 or first.shape[0] == 0:
        raise ValueError("the first example input must be a Tensor with a non-empty batch "
                         f"dimension first, got {getattr(first, 'shape', type(first).__name__)}")
    batch = int(first.shape[0])

    specs = {id(m): spec for m in model.modules() if (spec := _cost_spec(m)) is not None}
    counted = [(name, m) for name, m in model.named_modules() if id(m) in specs]
    macs: Dict[int, int] = {id(m): 0 for _, m in counted}
    calls: Dict[int, int] = {id(m): 0 for _, m in counted}
    shapes: Dict[int, Tuple[int, ...]] = {}

    def hook(module: nn.Module, args: Tuple, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        macs[id(module)] += specs[id(module)].macs(module, args[0], out, norm_macs)
        for child, count in specs[id(module)].child_macs(module, args[0], out).items():
            macs[id(module.get_submodule(child))] += count
        calls[id(module)] += 1
        shapes[id(module)] = tuple(out.shape[1:])

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for _, m in counted]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training

    rows = []
    seen: set = set()  # tied weights (one tensor in two layers) are counted once
    for name, m in counted:
        total = macs[id(m)]
        if total % batch:
            raise ValueError(f"layer {name!r} did {total} MACs for a batch of {batch}, not a "
                             "multiple of the batch size; pass a batch of one")
        in_f, out_f = specs[id(m)].features(m)
        # Parameters after the forward pass: lazy modules only have them then.
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        params = sum(p.numel() for p in own)
        rows.append(LayerCost(name=name, type=type(m).__name__, in_features=in_f,
                              out_features=out_f, output_shape=shapes.get(id(m)), params=params,
                              macs=total // batch, calls=calls[id(m)]))
    return ModelCost(
        layers=tuple(rows),
        total_params=sum(p.numel() for p in model.parameters()),
        total_macs=sum(row.macs for row in rows),
        batch_size=batch,
        input_shapes=tuple(tuple(x.shape) for x in inputs if isinstance(x, Tensor)),
    )
