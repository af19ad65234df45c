"""Op rules: how the channels of a traced op's inputs reach its output.

One table for functions, Tensor methods and modules: ``OP_RULES`` maps
canonical op names (``optable.canonical``) to :class:`OpRule` objects, and
``module_rules.MODULE_RULES`` maps torch.nn module classes to the same rules
(with the module's settings as arguments: ``nn.Softmax(dim=1)`` is
``softmax(x, 1)``). :func:`register_op_rule` declares a user's op (a custom
``torch.ops.mylib.*`` op, a Python function, a module class): an op nobody
declared is never guessed, its channels are blocked by name.

A rule's ``apply(an, call)`` couples, blocks or marks inexact the channel
elements of the call's inputs (``an``: the running
:class:`~pyprune_ext.graph.analysis.Analyzer`) and returns the output's layout.
"""

from __future__ import annotations

import operator
import types

import numpy as np
import torch
from torch import fx

from . import attention as A
from . import optable as T
from .analysis import Analyzer
from .layouts import TensorMeta, Tracked, Untracked, is_tensor_layout, iter_layouts
from .optable import describe_at, get_arg
from .recording import VALUE
from .sizes import declared_size

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


_what = describe_at


def _elementwise(an, node, zero_preserving: bool, args, kwargs, meta):
    """An element-wise op: one tensor input passes its channels through; several
    (a user's fused op) are coupled position by position, with broadcasting."""
    tensors = [v for v in iter_layouts((args, kwargs))]
    if len(tensors) > 1 and isinstance(meta, TensorMeta):
        out, _ = an.couple_elementwise(tensors, meta.shape, _what(node))
        an.carry(tensors, out)
    else:
        out = an.follow(tensors[0], meta)
    if not zero_preserving:
        an.soil(out, f"{_what(node)} maps 0 to a non-zero value")
    return out


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
    out = an.follow(x, meta)
    if not zero_kept:
        an.soil(out, f"{_what(node)} maps 0 to a non-zero value")
    return out


def _like(an, node, fills_zero: bool, args, kwargs, meta):
    """zeros_like(x) and friends: shaped like x, so they shrink with it."""
    x = args[0] if args else kwargs.get("input")
    out = an.passthrough(x, meta)
    an.absorb(x)  # only its shape is read
    if not fills_zero:
        an.soil(out, f"{_what(node)} fills the channels with non-zero values")
    return out


def _constructor(an, node, name, swapped, args, kwargs, meta):
    an.absorb((args, kwargs))  # only shapes, dtypes and devices are read
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
    # a sum of two different channel sets is a residual join (q * cos + rotate_half(q) * sin is not)
    joins = len({tuple(an.elements.find(int(e)) for e in v.ids) for v in operands if isinstance(v, Tracked)}) > 1
    out, kinds = an.couple_elementwise(operands, meta.shape, what)
    if isinstance(out, Tracked):
        if not _binary_exact(name, operands, kinds):
            an.soil(out, f"{what} can turn zeroed channels non-zero")
        if name in T.ADD_LIKE and kinds.count("full") >= 2 and joins:
            an.elements.mark_residual(out.ids)
    clean_factor = name == "mul" and any(k == "full" and isinstance(v, Tracked) and not an.dirt(v)
                                         for v, k in zip(operands, kinds))
    if clean_factor:  # pruned channels are zero in one factor, so in the product (a gate, a GLU)
        an.absorb(operands)
    else:
        an.carry(operands, out)
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


def reshape_via_probe(an: Analyzer, node, name, x: Tracked, args, kwargs, meta, module=None, literals=None,
                      selecting: bool | None = None):
    """Follows a reshaping/selecting op by running it on an index probe.
    ``selecting`` (default: whether ``name`` is a selecting op): a result that
    does not hold every channel exactly once blocks them."""
    if selecting is None:
        selecting = name in T.SELECT_OPS
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
        if x.size != 1 or selecting:
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
                if d is None and o.ndim == len(x.shape) and selecting:
                    d = x.dim  # one selected channel, still on its dim
                if d is None:
                    spread.append(o)
                    return None
                index = [0] * o.ndim
                index[d] = slice(None)
                found = ("tracked", d, o[tuple(index)].clone())
            if found is None:
                units = an.locate_units(o)
                if units is None:
                    spread.append(o)
                    return None
                dim, starts, width = units  # the channels split into (units, width): heads
                selections.append((starts[:, None] + torch.arange(width)).reshape(-1))
                ids = x.ids[starts.numpy()]
                for start in starts.tolist():
                    an.elements.union_arrays(np.full(width - 1, x.ids[start]), x.ids[start + 1:start + width])
                return Tracked(dim, ids, tuple(o.shape))
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
    if spread and selecting:  # e.g. x[:, 3]: understood, and not prunable
        an.elements.block(x.ids, selected)
        return an.untracked_like(meta, f"comes from {what}, a fixed selection of channels")
    if spread:
        return an.unknown(node, x, meta, f"{what} spreads the channels over several dims or mixes them")
    if selecting:
        everything = torch.arange(x.size)
        if not (len(selections) == 1 and torch.equal(selections[0], everything)):
            an.elements.block(x.ids, selected)
    if name in SIZE_TAKING:
        fixed = [v for v in _written_channel_counts(node, name, x, result, literals) if not _declared_size(an, node, v)]
        if fixed:
            an.elements.block(x.ids, f"{what} has the channel count ({fixed[0]}) written in its arguments "
                                     "(pruning would break it; compute it from the tensor, or write -1)")
    an.carry(x, result)
    return result


def _size_arguments(node, name) -> list | None:
    """The sizes a view / reshape / expand / broadcast_to call gives, one per output
    dim (an int literal, or None for a computed size), or None when not of that form."""
    if name not in ("view", "reshape", "expand", "broadcast_to"):
        return None
    sizes = node.args[1:]  # x.view(2, 3), Tensor.view(x, 2, 3) or torch.reshape(x, (2, 3))
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    sizes = sizes or node.kwargs.get("size") or node.kwargs.get("shape") or ()
    if not isinstance(sizes, (list, tuple)):
        return None
    return [v if isinstance(v, int) and not isinstance(v, bool) else None for v in sizes]


def _written_channel_counts(node, name, x: Tracked, result, literals) -> list[int]:
    """Channel counts written as literals in a size-taking op's arguments: the op
    would not follow a pruned tensor. Where each size maps to an output dim, only
    the sizes of the dims that carry channels count (``view(B, L, -1, 64)`` splits
    the channels into heads of 64 and follows a pruned head count)."""
    tracked = [v for v in iter_layouts(result) if isinstance(v, Tracked)]
    per_dim = _size_arguments(node, name) if literals is None and len(tracked) == 1 else None
    if per_dim is not None and len(per_dim) == len(tracked[0].shape):
        written = per_dim[tracked[0].dim]
        return [written] if written is not None and written > 1 else []
    sizes = {x.size} | {v.size for v in tracked}
    written = literals if literals is not None else _literal_ints((node.args, node.kwargs))
    return [v for v in written if v > 1 and v in sizes]


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
    out = an.tracked_like(meta, new_dim, x.ids)
    an.carry(x, out)
    if name == "logsumexp":
        an.soil(out, f"{what} maps zeros to a non-zero value")
    return out


def _softmax(an, node, name, swapped, args, kwargs, meta):
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tracked):
        return an.unknown(node, (args, kwargs), meta)
    nd = len(x.shape)
    dim = get_arg(args, kwargs, 1, ("dim",))
    if dim is None:  # legacy implicit dim, as torch picks it
        dim = 0 if nd in (0, 1, 3) else 1
    out = an.passthrough(x, meta)
    if dim % nd == x.dim:
        an.elements.block(x.ids, f"{_what(node)} normalizes over the channels")
    else:
        an.carry(x, out)
        an.soil(out, f"{_what(node)} maps 0 to a non-zero value")
    return out


def _cat(an, node, name, swapped, args, kwargs, meta):
    tensors = get_arg(args, kwargs, 0, ("tensors",))
    dim = get_arg(args, kwargs, 1, ("dim", "axis"), 0)
    what, out_nd = _what(node), len(meta.shape)
    if not isinstance(tensors, (list, tuple)) or not all(is_tensor_layout(t) for t in tensors):
        return an.unknown(node, (args, kwargs), meta)
    an.absorb([t for t in tensors if t.shape == (0,)])
    tensors = [t for t in tensors if t.shape != (0,)]  # torch.cat skips empty 1-D tensors (an empty KV cache)
    cat_dim = dim % out_nd
    if name == "cat" and any(isinstance(t, Tracked) and t.dim == cat_dim for t in tensors):
        # concatenation along the channels: each input's channels at its offset
        parts = [an.channels_in(t, cat_dim, what) for t in tensors]
        out = Tracked(cat_dim, np.concatenate(parts), meta.shape)
        an.carry(tensors, out)  # all of the output, though only some inputs may be dirty: conservative
        return out
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
    out = Tracked(channel_dim, ref, meta.shape)
    an.carry(tensors, out)
    return out


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
    out = an.follow(x, meta)
    if mode == "constant" and value not in (None, 0):
        an.soil(out, f"{_what(node)} pads with {value}")
    return out


def _spatial(an, node, dims: int | None, args, kwargs, meta):
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tracked):
        return an.unknown(node, (args, kwargs), meta)
    nd = len(x.shape)
    k = dims if dims is not None else nd - 2
    if x.dim >= nd - k:
        return an.unknown(node, x, meta, f"{_what(node)} pools or resizes over the channel dim")
    return an.follow(x, meta)


# -- splitting along the channels -------------------------------------------------------------------
def _split(an, node, name, swapped, args, kwargs, meta):
    """split / chunk / tensor_split (and hsplit...) into pieces. Along the
    channels, the pieces stay prunable when their sizes follow the channel
    count (chunk(x, n), tensor_split(x, n), split(x, x.size(1) // n)): all
    pieces are pruned alike (position i of every piece goes together), so they
    keep equal sizes. Sizes or cut points written in the code are fixed: they
    would cut the pruned tensor at the wrong place, so those channels are blocked."""
    tracked = [v for v in iter_layouts((args, kwargs)) if isinstance(v, Tracked)]
    x = tracked[0]
    result = reshape_via_probe(an, node, name, x, args, kwargs, meta, selecting=False)
    pieces = result if isinstance(result, (list, tuple)) else None
    if not pieces or not all(isinstance(p, Tracked) for p in pieces):
        return result  # unknown() already blocked what it could not follow
    if all(p.dim == x.dim and np.array_equal(p.ids, x.ids) for p in pieces):
        return result  # split along another dim: every piece has all the channels
    what = _what(node)
    ordered = (all(p.dim == x.dim for p in pieces)
               and np.array_equal(np.concatenate([p.ids for p in pieces]), x.ids))
    if not ordered:
        an.elements.block(x.ids, f"{what} takes a fixed part of the channels")
        return result
    sizes = {p.size for p in pieces}
    fixed = _cuts_are_written(node, name) and not (len(sizes) == 1 and name == "split"
                                                   and _declared_size(an, node, pieces[0].size))
    if len(sizes) > 1 or fixed or name not in _SPLITS_BY_COUNT | _SIZED_SPLITS:
        an.elements.block(x.ids, f"{what} cuts the channels into pieces of fixed sizes "
                                 f"({', '.join(str(p.size) for p in pieces)}); pruning would move the cuts "
                                 "(use torch.chunk, compute the sizes from the tensor's size, or declare the "
                                 "module attribute holding the size with pyprune_ext.graph.register_size_attribute)")
        return result
    for piece in pieces[1:]:
        an.elements.union_arrays(pieces[0].ids, piece.ids)
    return result


def _declared_size(an, node, size: int) -> str | None:
    """The declared size attribute (``graph.sizes``) that a split or reshape of a
    module's output at a written ``size`` reads (GPT-2's ``attn.split_size``,
    torchvision ViT's ``hidden_dim``); None if undeclared."""
    source = node.args[0] if node.args else None
    if not (isinstance(source, fx.Node) and source.op == "call_module"):
        return None
    return declared_size(an.model, source.target, size)


def _cuts_are_written(node, name) -> bool:
    """Whether the piece sizes (split) or cut points (tensor_split with a list)
    are literals in the code rather than computed from the tensor."""
    names = ("split_size_or_sections", "split_size", "split_sizes", "indices_or_sections", "sections", "indices")
    given = node.args[1] if len(node.args) > 1 else next((node.kwargs[k] for k in names if k in node.kwargs), None)
    if name in _SIZED_SPLITS:
        return any(v > 1 for v in _literal_ints(given))
    return isinstance(given, (list, tuple))  # cut points, not a count


# splits whose arguments count pieces (the sizes follow the tensor) / give sizes or cut points
_SPLITS_BY_COUNT = {"chunk", "tensor_split", "hsplit", "vsplit", "dsplit"}
_SIZED_SPLITS = {"split", "split_with_sizes"}


# -- rule objects -----------------------------------------------------------------------------------------
class OpCall:
    """One traced call as a rule sees it: ``node`` (the fx node), ``name`` (its
    canonical op name, or None for a user's op), ``swapped`` (a reflected
    operator: ``2 - x``), ``args`` / ``kwargs`` with each tensor replaced by its
    layout (``Tracked``: carries prunable channels on ``dim``; ``Untracked``),
    ``meta`` (the recorded output: ``TensorMeta`` or plain values)."""

    __slots__ = ("node", "name", "swapped", "args", "kwargs", "meta")

    def __init__(self, node, name, swapped, args, kwargs, meta):
        self.node, self.name, self.swapped = node, name, swapped
        self.args, self.kwargs, self.meta = args, kwargs, meta

    @property
    def what(self) -> str:
        """The op and node, for reasons: "torch.roll at node 'roll'"."""
        return _what(self.node)

    def tensors(self) -> list:
        """The layouts of every tensor argument."""
        return list(iter_layouts((self.args, self.kwargs)))


class OpRule:
    """How one op moves channels. Subclasses implement ``apply(an, call)``,
    returning the output's layout (see the module docs); the built-in ones
    below cover the usual kinds of op and can be registered for a user's op
    with :func:`register_op_rule`."""

    def apply(self, an: Analyzer, call: OpCall):
        raise NotImplementedError(f"{type(self).__name__}.apply is not implemented")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class _ByName(OpRule):
    """A built-in rule whose behaviour depends on the canonical op name (the
    argument conventions of clamp vs. hardtanh, which reductions are exact, ...)."""

    function = None

    def __init__(self, kind: str | None = None):
        self.kind = kind

    def apply(self, an, call):
        name = self.kind or call.name
        return type(self).function(an, call.node, name, call.swapped, call.args, call.kwargs, call.meta)


class ElementWise(OpRule):
    """Element-wise: the output has the input's channels (several tensor inputs
    are coupled position by position). ``zero_preserving``: f(0) == 0, so a
    zeroed channel stays zero and masking equals removal."""

    def __init__(self, zero_preserving: bool = True):
        self.zero_preserving = zero_preserving

    def apply(self, an, call):
        return _elementwise(an, call.node, self.zero_preserving, call.args, call.kwargs, call.meta)


class Like(OpRule):
    """A new tensor shaped like the input (zeros_like, ones_like, ...): it shrinks
    with the input; ``fills_zero`` says whether its pruned channels would be zero."""

    def __init__(self, fills_zero: bool):
        self.fills_zero = fills_zero

    def apply(self, an, call):
        return _like(an, call.node, self.fills_zero, call.args, call.kwargs, call.meta)


class Constructor(OpRule):
    """A new tensor that does not depend on the input's channels."""

    def apply(self, an, call):
        return _constructor(an, call.node, call.name, call.swapped, call.args, call.kwargs, call.meta)


class Spatial(OpRule):
    """Pooling or resizing over the last ``dims`` dims (None: every dim after
    dim 1): channels pass through, unless they are on a pooled dim."""

    def __init__(self, dims: int | None):
        self.dims = dims

    def apply(self, an, call):
        return _spatial(an, call.node, self.dims, call.args, call.kwargs, call.meta)


class Reshape(OpRule):
    """view / reshape / permute / flatten / ...: followed by running the op on an
    index probe (an int64 tensor holding each position's channel), so any op
    that only moves elements is understood; channel counts written in the
    arguments block the channels."""

    def apply(self, an, call):
        tracked = [v for v in call.tensors() if isinstance(v, Tracked)]
        return reshape_via_probe(an, call.node, call.name or "", tracked[0], call.args, call.kwargs, call.meta)


class Select(Reshape):
    """Indexing / narrow / select: fine when it takes every channel, in order;
    a fixed part of the channels blocks them."""

    def apply(self, an, call):
        tracked = [v for v in call.tensors() if isinstance(v, Tracked)]
        return reshape_via_probe(an, call.node, call.name or "", tracked[0], call.args, call.kwargs, call.meta,
                                 selecting=True)


class Opaque(OpRule):
    """An op whose channels cannot be followed (it mixes them): they are blocked
    with ``reason`` and no warning (the op is known, just not prunable through)."""

    def __init__(self, reason: str = "mixes the channels"):
        self.reason = reason

    def apply(self, an, call):
        what = f"{call.what} {self.reason}"
        for layout in call.tensors():
            if isinstance(layout, Tracked):
                an.elements.block(layout.ids, what)
        return an.untracked_like(call.meta, f"comes from {what}")


class Clamp(_ByName):
    """clamp / clamp_min / clamp_max / hardtanh / threshold: zero-preserving when 0 lies within the bounds."""
    function = staticmethod(_clamp)


class Binary(_ByName):
    """add / sub / mul / div / pow / maximum / comparisons / where: operands coupled with broadcasting."""
    function = staticmethod(_binary)


class Reduction(_ByName):
    """sum / mean / amax / norm / argmax / ...: over the channels they leave the
    group (sum keeps masking exact, argmax blocks); over other dims channels pass."""
    function = staticmethod(_reduction)


class Softmax(_ByName):
    """softmax / log_softmax: over the channels blocks them; over another dim they pass (not exact)."""
    function = staticmethod(_softmax)


class Concat(_ByName):
    """cat / stack: along the channels each input's channels sit at their offset;
    along another dim the inputs' channels are coupled."""
    function = staticmethod(_cat)


class Pad(_ByName):
    """F.pad: fine unless the channel dim is padded; a non-zero constant is not exact."""
    function = staticmethod(_pad)


class MatMul(_ByName):
    """matmul / bmm / ``@``: channels on a batch dim (attention heads) couple both
    factors; a contraction over the channels blocks them (see ``attention``)."""
    function = staticmethod(A.matmul)


class Attention(_ByName):
    """F.scaled_dot_product_attention: q/k/v heads coupled, GQA-aware (see ``attention``)."""
    function = staticmethod(A.scaled_dot_product_attention)


class MaskedFill(_ByName):
    """masked_fill: a broadcast mask, the value written into pruned channels too."""
    function = staticmethod(A.masked_fill)


class Split(_ByName):
    """split / chunk / tensor_split: pieces pruned alike when their sizes follow
    the tensor (see ``_split``)."""
    function = staticmethod(_split)


def _built_in_rules() -> dict[str, OpRule]:
    table: dict[str, OpRule] = {}
    zero, not_zero = ElementWise(True), ElementWise(False)
    for names, rule in ((T.ZERO_PRESERVING, zero), (T.NOT_ZERO_PRESERVING, not_zero), (T.CLAMPS, Clamp()),
                        (T.CONSTRUCTORS, Constructor()), (T.BINARY, Binary()), (T.SHAPE_OPS, Reshape()),
                        (T.SELECT_OPS, Select()), (_SPLITS_BY_COUNT | _SIZED_SPLITS, Split()),
                        (T.REDUCTIONS, Reduction()), (T.SOFTMAX, Softmax()), (T.CAT, Concat()), (T.PAD, Pad())):
        table.update(dict.fromkeys(names, rule))
    table.update({name: Like(fills_zero) for name, fills_zero in T.LIKE.items()})
    table.update(dict.fromkeys(T.MATMUL, MatMul()))
    table.update({"scaled_dot_product_attention": Attention(), "masked_fill": MaskedFill()})
    table.update({name: Spatial(dims) for name, dims in T.SPATIAL.items()})
    return table


# canonical op name -> rule (the built-ins; a user's names are added by register_op_rule)
OP_RULES: dict[str, OpRule] = _built_in_rules()
# a user's ops by identity: a function, a torch.ops packet or overload, a module class
_USER_OPS: dict[object, OpRule] = {}


def register_op_rule(op, rule: OpRule, *, replace: bool = False) -> None:
    """Declares how ``op`` moves channels, for the dependency analysis.

    ``op``: a custom op (``torch.ops.mylib.my_op``, or one overload of it), a
    Python function the model calls, a module class the model uses as a leaf
    (it is then not traced into: the rule sees its inputs and output), or a
    canonical op name (``"gelu"``) to replace a built-in rule. ``rule``: an
    :class:`OpRule`, e.g. ``ElementWise(zero_preserving=True)``, ``Reshape()``,
    ``Opaque("mixes the channels")`` or a subclass of your own. An op already
    declared needs ``replace=True``."""
    if not isinstance(rule, OpRule):
        raise TypeError(f"register_op_rule: the rule must be an OpRule instance (ElementWise(), Reshape(), "
                        f"...), got {type(rule).__name__}")
    if isinstance(op, str):
        if op in OP_RULES and not replace:
            raise ValueError(f"register_op_rule: '{op}' already has a rule ({OP_RULES[op]!r}); "
                             "pass replace=True to replace it")
        OP_RULES[op] = rule
        return
    if not callable(op):
        raise TypeError(f"register_op_rule: expected a custom op, a function, a module class or an op name, "
                        f"got {type(op).__name__}")
    if op in _USER_OPS and not replace:
        raise ValueError(f"register_op_rule: {op!r} already has a rule ({_USER_OPS[op]!r}); "
                         "pass replace=True to replace it")
    _USER_OPS[op] = rule


def unregister_op_rule(op) -> OpRule:
    """Removes a rule :func:`register_op_rule` added (or a built-in one, by name) and returns it."""
    table = OP_RULES if isinstance(op, str) else _USER_OPS
    if op not in table:
        raise KeyError(f"unregister_op_rule: {op!r} has no rule")
    return table.pop(op)


def user_rule_for(target) -> OpRule | None:
    """The rule registered for a call target (an op overload also finds its packet's rule)."""
    try:
        rule = _USER_OPS.get(target)
    except TypeError:  # unhashable target
        return None
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = _USER_OPS.get(target.overloadpacket)
    return rule


def user_functions() -> tuple:
    """The plain Python functions with a registered rule: torch.fx must call them
    as one node (``autowrap_functions``) instead of tracing into them."""
    return tuple(op for op in _USER_OPS if isinstance(op, types.FunctionType))


def module_class_rule(module) -> OpRule | None:
    """The rule registered for the module's class (or a base class)."""
    for base in type(module).__mro__:
        rule = _USER_OPS.get(base)
        if rule is not None:
            return rule
    return None


def rule_for_name(name: str | None) -> OpRule | None:
    return OP_RULES.get(name) if name is not None else None
