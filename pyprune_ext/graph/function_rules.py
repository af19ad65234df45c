"""Rules for ``call_function`` / ``call_method`` nodes (see ``optable`` for the names)."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from . import optable as T
from .analysis import Analyzer
from .layouts import TensorMeta, Tracked, Untracked, is_tensor_layout, iter_layouts
from .optable import describe, get_arg
from .trace import VALUE

# shape ops whose arguments are sizes: a size equal to the channel count is hard-coded
SIZE_TAKING = {"view", "reshape", "expand", "unflatten", "broadcast_to"}
# shape ops that may take a second tensor (only its shape is used)
SHAPE_FROM_OTHER = {"view_as", "reshape_as", "expand_as"}


def _has_tensor(meta) -> bool:
    if isinstance(meta, TensorMeta):
        return True
    if isinstance(meta, (list, tuple)) and not isinstance(meta, torch.Size):
        return any(_has_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(m) for m in meta.values())
    return False


def _what(node: fx.Node) -> str:
    return f"{describe(node)} at node '{node.name}'"


def visit_function(an: Analyzer, node: fx.Node):
    meta = node.meta.get(VALUE)
    args, kwargs = an.resolve(node.args), an.resolve(node.kwargs)
    name, swapped = T.canonical(node)
    first = args[0] if args else None
    # plain Python containers (split outputs, max's (values, indices), sizes)
    if name == "getitem" and isinstance(first, (list, tuple, dict)):
        return first[args[1]]
    if name == "getattr" and isinstance(first, (list, tuple)) and args[1] in ("values", "indices"):
        return first[0 if args[1] == "values" else 1]
    if name == "setitem" and any(isinstance(v, Tracked) for v in iter_layouts(args)):
        return _setitem(an, node, first, args, meta)  # returns None, but writes into a tensor
    if not _has_tensor(meta):
        return meta
    if not any(isinstance(v, Tracked) for v in iter_layouts((args, kwargs))):
        # keep the first input's origin (a model input, a parameter read directly): it names the cause
        sources = [v.source for v in iter_layouts((args, kwargs)) if isinstance(v, Untracked)]
        return an.untracked_like(meta, sources[0] if sources else
                                 f"comes from {_what(node)}, which has no prunable channels as input")
    if name == "getattr" or (name or "").startswith("attr:"):
        attr = args[1] if name == "getattr" else name[5:]
        if attr == "data":
            return an.passthrough(first, meta)
        if attr in T.TENSOR_ATTRS:
            return reshape_via_probe(an, node, attr, first, args, kwargs, meta)
        return an.unknown(node, (args, kwargs), meta)
    rule = _rule_for(name)
    if rule is None:
        return an.unknown(node, (args, kwargs), meta)
    return rule(an, node, name, swapped, args, kwargs, meta)


def _rule_for(name):
    if name is None:
        return None
    for names, rule in ((T.ZERO_PRESERVING, _unary), (T.NOT_ZERO_PRESERVING, _unary), (T.CLAMPS, _clamp),
                        (T.LIKE, _like), (T.CONSTRUCTORS, _constructor), (T.BINARY, _binary),
                        (T.SHAPE_OPS | T.SELECT_OPS, _reshape), (T.REDUCTIONS, _reduction),
                        (T.SOFTMAX, _softmax), (T.CAT, _cat), (T.PAD, _pad), (T.SPATIAL, _spatial)):
        if name in names:
            return rule
    return None


# -- element-wise ---------------------------------------------------------------------------
def _unary(an, node, name, swapped, args, kwargs, meta):
    x = args[0] if args else get_arg(args, kwargs, 0, ("input", "self"))
    if isinstance(x, Tracked) and name in T.NOT_ZERO_PRESERVING:
        an.elements.mark_inexact(x.ids, f"{_what(node)} maps 0 to a non-zero value")
    return an.passthrough(x, meta)


def _clamp(an, node, name, swapped, args, kwargs, meta):
    """clamp/hardtanh/threshold keep zeros at zero when 0 lies within their bounds."""
    x = args[0]
    if name == "threshold":
        threshold, value = get_arg(args, kwargs, 1, ("threshold",)), get_arg(args, kwargs, 2, ("value",))
        bounds = (threshold, value)
    else:
        bounds = {
            "clamp": lambda: (get_arg(args, kwargs, 1, ("min",)), get_arg(args, kwargs, 2, ("max",))),
            "clamp_min": lambda: (get_arg(args, kwargs, 1, ("min",)), None),
            "clamp_max": lambda: (None, get_arg(args, kwargs, 1, ("max",))),
            "hardtanh": lambda: (get_arg(args, kwargs, 1, ("min_val",), -1.0),
                                 get_arg(args, kwargs, 2, ("max_val",), 1.0)),
        }[name]()
    if any(is_tensor_layout(b) for b in bounds):
        return an.unknown(node, (args, kwargs), meta)  # tensor bounds: not followed
    if name == "threshold":
        zero_kept = bounds[0] < 0 or bounds[1] == 0
    else:
        lo, hi = bounds
        zero_kept = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    if not zero_kept and isinstance(x, Tracked):
        an.elements.mark_inexact(x.ids, f"{_what(node)} maps 0 to a non-zero value")
    return an.passthrough(x, meta)


def _like(an, node, name, swapped, args, kwargs, meta):
    """zeros_like(x) and friends: shaped like x, so they shrink with it."""
    x = args[0] if args else kwargs.get("input")
    if isinstance(x, Tracked) and not T.LIKE[name]:
        an.elements.mark_inexact(x.ids, f"{_what(node)} fills the channels with non-zero values")
    return an.passthrough(x, meta)


def _constructor(an, node, name, swapped, args, kwargs, meta):
    return an.untracked_like(meta, f"comes from {_what(node)} (a new tensor)")


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and v == 0


def _binary(an, node, name, swapped, args, kwargs, meta):
    if not isinstance(meta, TensorMeta):
        return an.unknown(node, (args, kwargs), meta)
    if name == "where":
        operands = [get_arg(args, kwargs, i, (n,)) for i, n in enumerate(("condition", "input", "other"))]
    else:
        a = args[0] if args else get_arg(args, kwargs, 0, ("input", "self"))
        b = get_arg(args, kwargs, 1, ("other", "exponent"))
        operands = [b, a] if swapped else [a, b]
    what = _what(node)
    out, kinds = an.couple_elementwise(operands, meta.shape, what)
    if isinstance(out, Tracked):
        if not _binary_exact(name, operands, kinds):
            an.elements.mark_inexact(out.ids, f"{what} can turn zeroed channels non-zero")
        if name in T.ADD_LIKE and kinds.count("full") >= 2:
            an.elements.mark_residual(out.ids)
    return out


def _binary_exact(name, operands, kinds) -> bool:
    """Whether zeroed channels (zero in every full operand) stay zero."""
    zero_or_full = all(k == "full" or (k == "scalar" and _is_zero(v)) for v, k in zip(operands, kinds))
    if name in T.ADD_LIKE or name in ("maximum", "minimum", "fmax", "fmin"):
        return zero_or_full
    if name == "mul":
        return True
    if name in ("div", "floordiv"):  # 0 / c; 0 / 0 is not
        return kinds[0] == "full" and all(k != "full" for k in kinds[1:])
    if name == "pow":
        exponent = operands[1]
        return kinds[0] == "full" and isinstance(exponent, (int, float)) and exponent > 0
    return False


# -- reshaping and selecting ----------------------------------------------------------------
def _reshape(an, node, name, swapped, args, kwargs, meta):
    tracked = [v for v in iter_layouts((args, kwargs)) if isinstance(v, Tracked)]
    return reshape_via_probe(an, node, name, tracked[0], args, kwargs, meta)


def _literal_ints(value) -> list[int]:
    """Integers written in a node's arguments (not computed by other nodes)."""
    if isinstance(value, bool) or isinstance(value, fx.Node):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _literal_ints(v)]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _literal_ints(v)]
    return []


def reshape_via_probe(an: Analyzer, node, name, x: Tracked, args, kwargs, meta, module=None, literals=None):
    """Follows a reshaping/selecting op by running it on an index probe."""
    what = _what(node)
    layouts = list(iter_layouts((args, kwargs)))
    others = [v for v in layouts if v is not x]
    if any(isinstance(v, Tracked) for v in others) or (others and name not in SHAPE_FROM_OTHER):
        return an.unknown(node, (args, kwargs), meta)  # e.g. indexing with a tensor
    try:
        out = an.run_on_probe(node, x, args, kwargs, module)
    except Exception as error:  # noqa: BLE001 - whatever fails here, we cannot follow the op
        return an.unknown(node, (args, kwargs), meta, f"{what} could not be followed ({error})")
    doubled = []  # the op run on a 2-channel probe, to see where a single channel goes

    def single_channel_dim(o, path):
        if x.size != 1 or name in T.SELECT_OPS:
            return None
        if not doubled:
            try:
                doubled.append(an.run_on_probe(node, x, args, kwargs, module, channels=2))
            except Exception:  # noqa: BLE001 - the op fixes the size: cannot tell
                doubled.append(None)
        o2 = doubled[0]
        for i in path:
            o2 = o2[i] if isinstance(o2, (list, tuple)) else None
        if not isinstance(o2, torch.Tensor) or o2.ndim != o.ndim:
            return None
        found = an.locate_channels(o2)
        if found is None or found[0] != "tracked":
            return None
        d = found[1]
        same = all(a == b for i, (a, b) in enumerate(zip(o.shape, o2.shape)) if i != d)
        return d if same and o2.shape[d] == 2 * o.shape[d] else None

    selections, spread = [], []

    def convert(o, path=()):
        if isinstance(o, torch.Tensor):
            found = an.locate_channels(o)
            if found is not None and found[0] == "constant":
                d = single_channel_dim(o, path)
                if d is None and o.ndim == len(x.shape) and name in T.SELECT_OPS:
                    d = x.dim  # one selected channel, still on its dim
                if d is None:
                    spread.append(o)
                    return None
                index = [0] * o.ndim
                index[d] = slice(None)
                found = ("tracked", d, o[tuple(index)].clone())
            if found is None:
                spread.append(o)
                return None
            if found[0] == "untracked":
                return Untracked(f"comes from {what}, which takes no prunable channels", tuple(o.shape))
            _, dim, positions = found
            selections.append(positions)
            return Tracked(dim, x.ids[positions.numpy()], tuple(o.shape))
        if isinstance(o, (list, tuple)) and not isinstance(o, torch.Size):
            items = [convert(v, path + (i,)) for i, v in enumerate(o)]
            return items if isinstance(o, list) else tuple(items)
        return o

    result = convert(out)
    selected = f"{what} takes a fixed part of the channels (pruning would change which channels it takes)"
    if spread and name in T.SELECT_OPS:  # e.g. x[:, 3]: understood, and not prunable
        an.elements.block(x.ids, selected)
        return an.untracked_like(meta, f"comes from {what}, a fixed selection of channels")
    if spread:
        return an.unknown(node, x, meta, f"{what} spreads the channels over several dims or mixes them")
    if name in T.SELECT_OPS:
        everything = torch.arange(x.size)
        if not (len(selections) == 1 and torch.equal(selections[0], everything)):
            an.elements.block(x.ids, selected)
    if name in SIZE_TAKING:
        sizes = {x.size} | {v.size for v in iter_layouts(result) if isinstance(v, Tracked)}
        written = literals if literals is not None else _literal_ints((node.args, node.kwargs))
        fixed = [v for v in written if v > 1 and v in sizes]
        if fixed:
            an.elements.block(x.ids, f"{what} has the channel count ({fixed[0]}) written in its arguments "
                                     "(pruning would break it)")
    return result


def _setitem(an, node, x, args, meta):
    """``x[index] = value``: fine when it writes the same places of every channel
    (a zero keeps masking exact); writing into chosen channels is not."""
    index, value = args[1], args[2]
    what = _what(node)
    if not isinstance(x, Tracked) or is_tensor_layout(value) or any(is_tensor_layout(v) for v in iter_layouts(index)):
        return an.unknown(node, args, meta, f"{what} writes a tensor into the channels")
    try:
        taken = an.locate_channels(an.run_on_probe(node, x, (x, index), {}, module=None, call=operator.getitem))
    except Exception:  # noqa: BLE001
        taken = None
    if not (taken and taken[0] == "tracked" and torch.equal(taken[2], torch.arange(x.size))):
        an.elements.block(x.ids, f"{what} writes into a fixed part of the channels")
    elif not _is_zero(value):
        an.elements.mark_inexact(x.ids, f"{what} writes {value!r} into zeroed channels")
    return meta


# -- reductions, softmax, concatenation, padding, pooling -------------------------------------
def _reduction(an, node, name, swapped, args, kwargs, meta):
    x = args[0] if args else kwargs.get("input")
    if name in ("max", "min") and is_tensor_layout(get_arg(args, kwargs, 1, ("other",))):
        return _binary(an, node, "maximum" if name == "max" else "minimum", False, args, kwargs, meta)
    if not isinstance(x, Tracked):
        return an.unknown(node, (args, kwargs), meta)
    dim = get_arg(args, kwargs, 2 if name == "norm" else 1, ("dim", "axis"))
    if isinstance(dim, bool) or not isinstance(dim, (int, list, tuple)) or dim in ([], ()):
        dim = None  # all dims (std/var's second positional may be `unbiased`)
    nd, what = len(x.shape), _what(node)
    dims = None if dim is None else {d % nd for d in (dim if isinstance(dim, (list, tuple)) else (dim,))}
    if dims is None or x.dim in dims:
        if name in T.INDEX_REDUCTIONS:
            an.elements.block(x.ids, f"{what} returns positions along the channels")
        elif name not in T.EXACT_REDUCTIONS:
            an.elements.mark_inexact(x.ids, f"{what} reduces over the channels")
        return an.untracked_like(meta, f"comes from a reduction over the channels ({what})")
    first = next(m for m in (meta if isinstance(meta, (list, tuple)) else (meta,)) if isinstance(m, TensorMeta))
    new_dim = x.dim if len(first.shape) == nd else x.dim - sum(1 for d in dims if d < x.dim)
    if name == "logsumexp":
        an.elements.mark_inexact(x.ids, f"{what} maps zeros to a non-zero value")
    return an.tracked_like(meta, new_dim, x.ids)


def _softmax(an, node, name, swapped, args, kwargs, meta):
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tracked):
        return an.unknown(node, (args, kwargs), meta)
    nd = len(x.shape)
    dim = get_arg(args, kwargs, 1, ("dim",))
    if dim is None:  # legacy implicit dim, as torch picks it
        dim = 0 if nd in (0, 1, 3) else 1
    if dim % nd == x.dim:
        an.elements.block(x.ids, f"{_what(node)} normalizes over the channels")
    else:
        an.elements.mark_inexact(x.ids, f"{_what(node)} maps 0 to a non-zero value")
    return an.passthrough(x, meta)


def _cat(an, node, name, swapped, args, kwargs, meta):
    tensors = get_arg(args, kwargs, 0, ("tensors",))
    dim = get_arg(args, kwargs, 1, ("dim", "axis"), 0)
    what, out_nd = _what(node), len(meta.shape)
    if not isinstance(tensors, (list, tuple)) or not all(is_tensor_layout(t) for t in tensors):
        return an.unknown(node, (args, kwargs), meta)
    cat_dim = dim % out_nd
    if name == "cat" and any(isinstance(t, Tracked) and t.dim == cat_dim for t in tensors):
        # concatenation along the channels: each input's channels at its offset
        parts = [an.channels_in(t, cat_dim, what) for t in tensors]
        return Tracked(cat_dim, np.concatenate(parts), meta.shape)
    # along another dim (or stacked): every input carries the same channels
    channel_dim = next(t.dim for t in tensors if isinstance(t, Tracked))
    ref = None
    for t in tensors:
        ids = an.channels_in(t, channel_dim, what)
        if ref is None:
            ref = ids
        else:
            an.elements.union_arrays(ref, ids)
    if name == "stack" and cat_dim <= channel_dim:
        channel_dim += 1
    return Tracked(channel_dim, ref, meta.shape)


def _pad(an, node, name, swapped, args, kwargs, meta):
    x = args[0] if args else kwargs.get("input")
    pad = get_arg(args, kwargs, 1, ("pad",))
    mode = get_arg(args, kwargs, 2, ("mode",), "constant")
    value = get_arg(args, kwargs, 3, ("value",), None)
    if not isinstance(x, Tracked) or not isinstance(pad, (list, tuple)):
        return an.unknown(node, (args, kwargs), meta)
    nd = len(x.shape)
    padded = {nd - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
    if x.dim in padded:
        return an.unknown(node, x, meta, f"{_what(node)} pads the channel dim")
    if mode == "constant" and value not in (None, 0):
        an.elements.mark_inexact(x.ids, f"{_what(node)} pads with {value}")
    return an.passthrough(x, meta)


def _spatial(an, node, name, swapped, args, kwargs, meta):
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tracked):
        return an.unknown(node, (args, kwargs), meta)
    nd = len(x.shape)
    k = T.SPATIAL[name] if T.SPATIAL[name] is not None else nd - 2
    if x.dim >= nd - k:
        return an.unknown(node, x, meta, f"{_what(node)} pools or resizes over the channel dim")
    return an.passthrough(x, meta)
