"""``call_module`` nodes: layers with a spec (``specs``), modules the table
below maps to an op rule (``rules``) with the module's settings as the op's
arguments, a user's module rules, and everything else (unknown: blocked, with
a warning)."""

from __future__ import annotations

from typing import Callable

from torch import fx, nn

from .analysis import Analyzer
from .layouts import Tracked, Untracked, iter_layouts
from .recording import VALUE
from .rules import (Clamp, ElementWise, OpCall, OpRule, Pad, Softmax, Spatial, module_class_rule,
                    reshape_via_probe)
from .specs import spec_for


class _RunModuleOnProbe(OpRule):
    """Flatten / Unflatten: the module itself runs on the index probe."""

    def apply(self, an, call):
        module = an.model.get_submodule(call.node.target)
        literals = tuple(module.unflattened_size) if isinstance(module, nn.Unflatten) else ()
        name = "unflatten" if isinstance(module, nn.Unflatten) else "flatten"
        return reshape_via_probe(an, call.node, name, call.args[0], call.args[:1], {}, call.meta, module=module,
                                 literals=literals)


def _pad_settings(m) -> tuple:
    mode = {nn.modules.padding._ReflectionPadNd: "reflect", nn.modules.padding._ReplicationPadNd: "replicate"}
    kind = next((v for k, v in mode.items() if isinstance(m, k)), "circular" if not hasattr(m, "value") else "constant")
    return (list(m.padding), kind, getattr(m, "value", None))


_ZERO, _NOT_ZERO = ElementWise(True), ElementWise(False)
_SPATIAL_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
    nn.FractionalMaxPool2d: 2, nn.Upsample: None,
}
_PADS = [nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
         nn.modules.padding._ReplicationPadNd]
if hasattr(nn.modules.padding, "_CircularPadNd"):
    _PADS.append(nn.modules.padding._CircularPadNd)

# module class -> (rule, canonical op name, the module's settings as the op's arguments after the input)
MODULE_RULES: dict[type, Callable[[nn.Module], tuple[OpRule, str, tuple]]] = {
    **{cls: (lambda m: (_ZERO, "relu", ())) for cls in (
        nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU, nn.SELU, nn.CELU, nn.Tanh,
        nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Softsign, nn.Identity, nn.Dropout, nn.Dropout1d,
        nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)},
    **{cls: (lambda m: (_NOT_ZERO, "sigmoid", ())) for cls in (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus,
                                                               nn.LogSigmoid)},
    nn.Hardtanh: lambda m: (Clamp(), "hardtanh", (m.min_val, m.max_val)),  # ReLU6 too
    nn.Threshold: lambda m: (Clamp(), "threshold", (m.threshold, m.value)),
    **{cls: (lambda m, k=k: (Spatial(k), "pool", ())) for cls, k in _SPATIAL_DIMS.items()},
    **{cls: (lambda m: (Pad(), "pad", _pad_settings(m))) for cls in _PADS},
    **{cls: (lambda m: (Softmax(), "softmax", (m.dim,))) for cls in (nn.Softmax, nn.LogSoftmax, nn.Softmin)},
    nn.Softmax2d: lambda m: (Softmax(), "softmax", (-3,)),
    nn.Flatten: lambda m: (_RunModuleOnProbe(), "flatten", ()),
    nn.Unflatten: lambda m: (_RunModuleOnProbe(), "unflatten", ()),
}


def _as_op(module: nn.Module):
    """(rule, op name, settings) for a module of the table (looked up along its class's MRO)."""
    for base in type(module).__mro__:
        entry = MODULE_RULES.get(base)
        if entry is not None:
            return entry(module)
    return None


def visit_module(an: Analyzer, node: fx.Node):
    name = node.target
    module = an.model.get_submodule(name)
    an.calls[name] = an.calls.get(name, 0) + 1
    an.first_seen.setdefault(name, len(an.first_seen))
    args, kwargs = an.resolve(node.args), an.resolve(node.kwargs)
    meta = node.meta.get(VALUE)
    x = args[0] if args else kwargs.get("input")
    spec = spec_for(module)
    if spec is not None and isinstance(x, (Tracked, Untracked)):
        out = _registered_layer(an, spec, node, name, module, x, meta)
        if name in an.ignored:
            for layout in iter_layouts(out):
                if isinstance(layout, Tracked):
                    an.elements.block(layout.ids, f"output of ignored module {name}")
        return out
    tracked = [v for v in iter_layouts((args, kwargs)) if isinstance(v, Tracked)]
    if not tracked:
        return an.untracked_like(meta, f"comes from module '{name}' ({type(module).__name__}), "
                                       "whose inputs carry no prunable channels")
    if name in an.ignored:
        for layout in tracked:
            an.elements.block(layout.ids, f"input of ignored module {name}")
        return an.untracked_like(meta, f"comes from ignored module '{name}'")
    user_rule = module_class_rule(module)
    if user_rule is not None:
        return user_rule.apply(an, OpCall(node, None, False, args, kwargs, meta))
    as_op = _as_op(module)
    if as_op is not None and len(tracked) == 1 and x is tracked[0]:
        rule, op_name, settings = as_op
        return rule.apply(an, OpCall(node, op_name, False, (x, *settings), {}, meta))
    return an.unknown(node, (args, kwargs), meta,
                      f"unknown module {name} ({type(module).__name__}) at node '{node.name}'")


# -- layers with a spec (pyprune_ext.graph.specs) ----------------------------------------------
def _registered_layer(an: Analyzer, spec, node, name, module, x, meta):
    out = spec.analyse(an, node, name, module, x, meta)
    problem = spec.unsupported_state(name, module)
    if problem:  # neither axis of this layer may change
        an.elements.block(an.elements.module_elements(name), problem)
    return out


