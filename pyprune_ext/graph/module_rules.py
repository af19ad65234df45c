"""Rules for ``call_module`` nodes: the layers we can shrink, the modules that
pass channels through, and everything else (unknown: blocked, with a warning)."""

from __future__ import annotations

from itertools import chain

from torch import fx, nn
from torch.nn.utils import parametrize

from .analysis import Analyzer
from .layers import BATCHNORMS, CONVS, is_shrinkable
from .layouts import Tracked, Untracked, iter_layouts
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

# parameters/buffers each layer type is rebuilt with
EXPECTED_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def unsupported_state(name: str, module: nn.Module) -> str | None:
    """Why ``surgery`` could not shrink this layer, or None. Extra tensors shaped
    like the weight (MaskedConv2d's mask) are sliced with it; others are not."""
    if parametrize.is_parametrized(module):
        return f"{name} is parametrized (torch.nn.utils.parametrize); its weight cannot be shrunk"
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if weight is not None else None
    extras = [n for n, t in chain(module._parameters.items(), module._buffers.items())
              if n not in EXPECTED_STATE and t is not None and tuple(t.shape) != shape]
    if extras:
        return f"{name} ({type(module).__name__}) holds tensors that cannot be shrunk with it: {', '.join(extras)}"
    return None


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
    if is_shrinkable(module) and isinstance(x, (Tracked, Untracked)):
        out = _shrinkable(an, node, name, module, x, meta)
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


# -- layers we can shrink ------------------------------------------------------------------
def _shrinkable(an: Analyzer, node, name, module, x, meta):
    problem = unsupported_state(name, module)
    if isinstance(module, CONVS):
        out = _conv(an, node, name, module, x, meta)
    elif isinstance(module, nn.Linear):
        in_ids = an.channels_in(x, len(x.shape) - 1, name)
        an.elements.attach(name, "in", in_ids)
        out_ids = an.produce(name, module.out_features, node, -1)
        out = Tracked(len(meta.shape) - 1, out_ids, meta.shape)
    elif isinstance(module, BATCHNORMS):
        ids = an.channels_in(x, 1 if len(x.shape) > 1 else 0, name)
        an.elements.attach(name, "norm", ids)
        if not module.affine:
            an.elements.mark_inexact(ids, f"{name} has no affine weight/bias to zero")
        out = an.tracked_like(meta, 1 if len(x.shape) > 1 else 0, ids)
    else:
        out = _layernorm(an, node, name, module, x, meta)
    if problem:  # neither axis of this layer may change
        an.elements.block(an.elements.module_elements(name), problem)
    return out


def _conv(an: Analyzer, node, name, conv, x, meta):
    cd = len(x.shape) - len(conv.kernel_size) - 1  # 1 for batched input, 0 for unbatched
    in_ids = an.channels_in(x, cd, name)
    if conv.groups == 1:
        an.elements.attach(name, "in", in_ids)
        return Tracked(cd, an.produce(name, conv.out_channels, node, 1), meta.shape)
    if conv.groups == conv.in_channels == conv.out_channels:
        an.elements.attach(name, "depthwise", in_ids)
        an.note_gate(name, node, 1)
        return Tracked(cd, in_ids, meta.shape)
    reason = f"grouped conv {name} (groups={conv.groups}, {conv.in_channels} -> {conv.out_channels} channels)"
    an.elements.attach(name, "in", in_ids)
    an.elements.block(in_ids, reason)
    out_ids = an.produce(name, conv.out_channels, node, 1)
    an.elements.block(out_ids, reason)
    return Tracked(cd, out_ids, meta.shape)


def _layernorm(an: Analyzer, node, name, norm, x, meta):
    """LayerNorm/RMSNorm over the last len(normalized_shape) dims. Channels on the
    last dim are members (their mean/var change when channels go: not exact)."""
    nd, last = len(norm.normalized_shape), len(x.shape) - 1
    if isinstance(x, Tracked) and x.dim < len(x.shape) - nd:
        # normalizes other dims; a zeroed channel becomes the bias, not zero
        an.elements.mark_inexact(x.ids, f"{name} normalizes a zeroed channel to its bias")
        own = an.elements.new(x.shape[last], blocked=f"{name} normalizes dims that carry no prunable channels")
        an.elements.attach(name, "norm", own)
        return an.tracked_like(meta, x.dim, x.ids)
    if isinstance(x, Tracked) and x.dim != last:
        reason = f"{name} normalizes the channels together with the dims after them"
        an.elements.block(x.ids, reason)
        an.elements.attach(name, "norm", an.elements.new(x.shape[last], blocked=reason))
        return an.tracked_like(meta, x.dim, x.ids)
    ids = an.channels_in(x, last, name)
    an.elements.attach(name, "norm", ids)
    an.elements.mark_inexact(ids, f"{type(norm).__name__} {name} normalizes over the channels")
    return an.tracked_like(meta, last, ids)


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
    if isinstance(module, nn.PReLU):
        if module.num_parameters != 1:
            el.block(x.ids, f"PReLU {name} has per-channel weights (not supported)")
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
