"""Rules for ``call_module`` nodes: the layers we can shrink, the modules that
pass channels through, and everything else (unknown: blocked, with a warning)."""

from __future__ import annotations

from torch import fx, nn

from .analysis import Analyzer
from .layouts import Tracked, Untracked, iter_layouts
from .specs import spec_for
from .trace import VALUE


# f(0) == 0, element-wise: masked channels stay zero
ZERO_PRESERVING = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU, nn.SELU, nn.CELU, nn.Tanh,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Softsign, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
NOT_ZERO_PRESERVING = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
SPATIAL = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
    nn.FractionalMaxPool2d: 2, nn.Upsample: None,
}
PADS = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
        nn.modules.padding._ReplicationPadNd)
if hasattr(nn.modules.padding, "_CircularPadNd"):
    PADS = PADS + (nn.modules.padding._CircularPadNd,)
SOFTMAXES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)

def spatial_dims(module: nn.Module, ndim: int) -> int:
    for cls, k in SPATIAL.items():
        if isinstance(module, cls):
            return ndim - 2 if k is None else k
    raise KeyError(type(module).__name__)


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
    if len(tracked) == 1 and x is tracked[0]:
        out = _passthrough_module(an, node, name, module, x, meta)
        if out is not NotImplemented:
            return out
    return an.unknown(node, (args, kwargs), meta,
                      f"unknown module {name} ({type(module).__name__}) at node '{node.name}'")


# -- layers with a spec (pyprune_ext.graph.specs) ----------------------------------------------
def _registered_layer(an: Analyzer, spec, node, name, module, x, meta):
    out = spec.analyse(an, node, name, module, x, meta)
    problem = spec.unsupported_state(name, module)
    if problem:  # neither axis of this layer may change
        an.elements.block(an.elements.module_elements(name), problem)
    return out


# -- modules that pass channels through ----------------------------------------------------
def _passthrough_module(an: Analyzer, node, name, module, x: Tracked, meta):
    """The rule for activation, dropout, pooling, padding, softmax and reshaping
    modules, or NotImplemented."""
    el = an.elements
    if isinstance(module, ZERO_PRESERVING):
        return an.passthrough(x, meta)
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        if not module.min_val <= 0 <= module.max_val:
            el.mark_inexact(x.ids, f"{name} maps 0 to a non-zero value")
        return an.passthrough(x, meta)
    if isinstance(module, nn.Threshold):
        if not (module.threshold < 0 or module.value == 0):
            el.mark_inexact(x.ids, f"{name} maps 0 to {module.value}")
        return an.passthrough(x, meta)
    if isinstance(module, NOT_ZERO_PRESERVING):
        el.mark_inexact(x.ids, f"{type(module).__name__} {name} maps 0 to a non-zero value")
        return an.passthrough(x, meta)
    if isinstance(module, tuple(SPATIAL)):
        k = spatial_dims(module, len(x.shape))
        if x.dim >= len(x.shape) - k:
            return an.unknown(node, x, meta, f"{name} ({type(module).__name__}) pools over the channel dim")
        return an.passthrough(x, meta)
    if isinstance(module, PADS):
        k = len(module.padding) // 2
        padded = {len(x.shape) - 1 - i for i in range(k)
                  if module.padding[2 * i] or module.padding[2 * i + 1]}
        if x.dim in padded:
            return an.unknown(node, x, meta, f"{name} pads the channel dim")
        if getattr(module, "value", 0) != 0:
            el.mark_inexact(x.ids, f"{name} pads with {module.value}")
        return an.passthrough(x, meta)
    if isinstance(module, SOFTMAXES):
        dim = -3 if isinstance(module, nn.Softmax2d) else module.dim
        if dim is None:  # legacy implicit dim, as torch picks it
            dim = 0 if len(x.shape) in (0, 1, 3) else 1
        if dim % len(x.shape) == x.dim:
            el.block(x.ids, f"{name} ({type(module).__name__}) normalizes over the channels")
        else:
            el.mark_inexact(x.ids, f"{name} ({type(module).__name__}) maps 0 to a non-zero value")
        return an.passthrough(x, meta)
    if isinstance(module, (nn.Flatten, nn.Unflatten)):
        from .function_rules import reshape_via_probe
        literals = tuple(module.unflattened_size) if isinstance(module, nn.Unflatten) else ()
        return reshape_via_probe(an, node, "flatten" if isinstance(module, nn.Flatten) else "unflatten",
                                 x, (x,), {}, meta, module=module, literals=literals)
    return NotImplemented
