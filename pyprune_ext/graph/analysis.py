"""The state of one analysis pass and the helpers every rule uses.

The walk (``walk.analyse``) keeps, for every node, the layout of its value
(``Tracked``, ``Untracked`` or a plain value) and applies one rule per op:
layer specs and module rules in ``module_rules``, op rules (``rules``) for
functions and methods via ``function_rules``. This file holds the shared
helpers those rules use: taking a tensor's channels on a given dim,
element-wise coupling with broadcasting, running reshaping ops on an index
probe, and the unknown-op rule (block + warn).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import fx, nn

from .attention import KEPT_KV_HEAD_READ, KEPT_KV_HEADS
from .layouts import Elements, TensorMeta, Tracked, Untracked, is_tensor_layout, iter_layouts
from .optable import ADD_LIKE, canonical, describe
from .specs import spec_for
from .structs import GraphAnalysisWarning
from .recording import VALUE


# ops a tensor attribute may meet the channels in and still lose them with them
ELEMENTWISE_BINARY = ADD_LIKE | {"mul", "div"}


# ops that pass a tensor attribute on as the same tensor, seen otherwise: a class token expanded
# over the batch, a position embedding sliced to the sequence (the channels stay on their dim)
ATTRIBUTE_VIEWS = {"expand", "broadcast_to", "getitem", "contiguous"}
CONCATENATIONS = {"cat", "concat", "concatenate"}


def _basic_slices(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, slice) or p is Ellipsis for p in parts)


def is_attribute_view(node: fx.Node) -> bool:
    """Whether ``node`` passes its first input on as a view of the same tensor with
    its dims in place (``expand`` with -1 or 1, basic slicing, ``contiguous``)."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return False
    name = canonical(node)[0]
    if name not in ATTRIBUTE_VIEWS or (name == "getitem" and not _basic_slices(node.args[1])):
        return False
    source, out = node.args[0], node.meta.get(VALUE)
    before = source.meta.get(VALUE) if isinstance(source, fx.Node) else None
    return (isinstance(before, TensorMeta) and isinstance(out, TensorMeta)
            and len(before.shape) == len(out.shape))


def first_tensor_argument(args):
    return next(iter_layouts(args[:1]), None) if args else None


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "ipow", "iand", "ior", "ixor"}


def mutates_input(node: fx.Node, model: nn.Module) -> bool:
    """Whether the node writes its result into its first argument (x.sigmoid_(),
    x += y, F.hardsigmoid(x, inplace=True), nn.Hardsigmoid(inplace=True))."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(model.get_submodule(node.target), "inplace", False) is True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not isinstance(name, str):
        return False
    return name in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))


class Analyzer:
    """The state of one pass over a graph (``walk.analyse`` drives it); results in
    ``elements``, ``gate_of``, ``first_seen``."""

    def __init__(self, model: nn.Module, graph: fx.Graph, ignored: set[str], gqa: str = "kv"):
        self.model = model
        self.graph = graph
        self.ignored = ignored
        self.gqa = gqa  # what a KV head shared by several query heads is pruned with (attention.GQA_MODES)
        # gqa="query": (query head elements, the KV head element each reads), per attention op
        self.kv_reads: list[tuple[np.ndarray, np.ndarray]] = []
        self.elements = Elements()
        self.values: dict[fx.Node, object] = {}
        self._materialized: dict[tuple[int, int], np.ndarray] = {}
        self.producer_ids: dict[str, np.ndarray] = {}
        self.calls: dict[str, int] = {}
        self.first_seen: dict[str, int] = {}
        self.gate_of: dict[str, tuple[str, int]] = {}   # producer -> (gate module, channel dim)
        self.input_dim: dict[str, int] = {}             # consumer -> the dim of its input it reads channels on
        self.tensor_dims: dict[str, int] = {}           # tensor attribute -> the dim carrying channels
        self._tensor_problems: dict[str, str | None] = {}
        self.attr_reads: list[tuple[str, str]] = []     # (get_attr target, node name)
        self._warned: set[str] = set()
        # values whose pruned channels may be non-zero once masked: id -> (layout, reasons)
        self._dirt: dict[int, tuple[Tracked, dict[str, None]]] = {}
        self._settled: set[int] = set()  # dirty inputs the current node's rule carried or absorbed

    def resolve(self, arg):
        """Node references replaced by their layouts/values."""
        return fx.node.map_aggregate(arg, lambda a: self.values[a] if isinstance(a, fx.Node) else a)

    # -- layouts from recorded values -------------------------------------------------
    def untracked_like(self, meta, source: str):
        """``meta`` with every tensor replaced by an Untracked of the same shape."""
        if isinstance(meta, TensorMeta):
            return Untracked(source, meta.shape)
        if isinstance(meta, (list, tuple)) and not isinstance(meta, torch.Size):
            items = [self.untracked_like(m, source) for m in meta]
            return items if isinstance(meta, list) else tuple(items)
        if isinstance(meta, dict):
            return {k: self.untracked_like(v, source) for k, v in meta.items()}
        return meta

    def tracked_like(self, meta, dim: int, ids: np.ndarray):
        """``meta`` with every tensor replaced by a Tracked (dim, ids) of its shape."""
        if isinstance(meta, TensorMeta):
            if dim >= len(meta.shape) or meta.shape[dim] != len(ids):
                raise AssertionError(f"internal error: {len(ids)} channels on dim {dim} of {meta.shape}")
            return Tracked(dim, ids, meta.shape)
        if isinstance(meta, (list, tuple)) and not isinstance(meta, torch.Size):
            items = [self.tracked_like(m, dim, ids) for m in meta]
            return items if isinstance(meta, list) else tuple(items)
        return meta

    def passthrough(self, x, meta):
        """The output carries the input's channels on the same dim (activations, pooling, ...)."""
        if isinstance(x, Tracked):
            return self.tracked_like(meta, x.dim, x.ids)
        return self.untracked_like(meta, x.source if isinstance(x, Untracked) else "has no prunable channels")

    def follow(self, x, meta):
        """An op computing its output channel by channel from ``x``'s (an activation,
        pooling, padding): the output has ``x``'s channels, and its dirt."""
        out = self.passthrough(x, meta)
        self.carry(x, out)
        return out

    # -- masked values: where zeroed channels do not stay zero ----------------------------
    # Masking zeroes a group's producers. An op with f(0) != 0 (sigmoid, + 1, ...)
    # makes those channels non-zero in its output: the value is "dirty". That is
    # harmless while the value only flows through ops that keep channels apart
    # and is multiplied by a clean value (a squeeze-and-excitation gate, a GLU);
    # anywhere else it is consumed (a layer's input, a reduction over the
    # channels) and masking no longer computes what removal computes. Rules say
    # what they do with dirty inputs (``carry``, ``absorb``); the walk marks the
    # rest inexact (``settle``), so a rule that says nothing stays conservative.
    def dirt(self, layout) -> dict[str, None] | None:
        """Why ``layout``'s pruned channels may be non-zero once masked (None: they are zero)."""
        entry = self._dirt.get(id(layout)) if isinstance(layout, Tracked) else None
        return entry[1] if entry is not None and entry[0] is layout else None

    def soil(self, value, reasons) -> None:
        """The pruned channels of every Tracked in ``value`` are non-zero once masked, for ``reasons``."""
        reasons = {reasons: None} if isinstance(reasons, str) else reasons
        for layout in iter_layouts(value):
            if isinstance(layout, Tracked) and reasons:
                entry = self._dirt.setdefault(id(layout), (layout, {}))
                entry[1].update(reasons)

    def carry(self, sources, value) -> None:
        """``value`` is computed from ``sources`` channel by channel: it inherits their dirt."""
        if not any(isinstance(v, Tracked) for v in iter_layouts(value)):
            return  # the channels stop here: a dirty source is consumed (see settle)
        for layout in iter_layouts(sources):
            reasons = self.dirt(layout)
            if reasons:
                self.soil(value, reasons)
                self._settled.add(id(layout))

    def absorb(self, sources) -> None:
        """The op does not let the values of ``sources``' pruned channels reach anything
        (a product with a clean operand, zeros_like, a container it only indexes)."""
        for layout in iter_layouts(sources):
            self._settled.add(id(layout))

    def dirty_inputs(self, node: fx.Node) -> list[Tracked]:
        """The node's dirty inputs; starts the node's bookkeeping."""
        self._settled = set()
        return [v for v in iter_layouts(self.resolve((node.args, node.kwargs))) if self.dirt(v)]

    def settle(self, node: fx.Node, dirty: list[Tracked], value) -> None:
        """Dirty inputs the node's rule neither carried nor absorbed are consumed:
        masking their channels is not removing them. An in-place op's dirt also
        lands on the tensor it wrote into."""
        outputs = {id(v) for v in iter_layouts(value)}
        for layout in dirty:
            if id(layout) not in self._settled and id(layout) not in outputs:
                reasons = self.dirt(layout)
                if KEPT_KV_HEAD_READ in reasons and self._is_layer_input(node, layout):
                    # a layer's input columns: masking zeroes them too, whatever the masked values
                    self.elements.mark_zeroes_inputs(layout.ids)
                    continue
                for reason in reasons:
                    self.elements.mark_inexact(layout.ids, reason)
        produced = [reasons for v in iter_layouts(value) if (reasons := self.dirt(v))]
        if produced and mutates_input(node, self.model):
            target = first_tensor_argument(self.resolve(node.args))
            if isinstance(target, Tracked):
                for reasons in produced:
                    self.soil(target, reasons)

    def _is_layer_input(self, node: fx.Node, layout: Tracked) -> bool:
        """Whether the layer called at ``node`` took ``layout``'s channels, all of
        them, as its "in" axis (its input columns, which removal drops)."""
        if node.op != "call_module" or spec_for(self.model.get_submodule(node.target)) is None:
            return False
        find, members = self.elements.find, self.elements.members
        in_axis = [e for (name, role, _), e in members.items() if name == node.target and role == "in"]
        return (len(in_axis) == len(layout.ids)
                and all(find(members[(node.target, "in", p)]) == find(int(e)) for p, e in enumerate(layout.ids)))

    # -- grouped-query attention ----------------------------------------------------------
    def read_shared_kv(self, query: np.ndarray, kv: np.ndarray) -> None:
        """gqa="query": query head ``p`` (element ``query[p]``) reads KV head ``kv[p]``,
        which several query heads share. The KV heads are kept (their k/v rows
        are blocked), the query heads are not coupled to them; ``groups.bundle``
        turns the reads into the query group's blocks."""
        self.kv_reads.append((np.asarray(query), np.asarray(kv)))
        self.elements.block(kv, KEPT_KV_HEADS)

    # -- channels -----------------------------------------------------------------------
    def channels_in(self, x, dim: int, consumer: str) -> np.ndarray:
        """The elements of ``x`` along ``dim``, as a layer consuming them sees them.
        Untracked tensors get fresh blocked elements (the same ones for every
        consumer of that tensor); channels tracked on another dim get blocked."""
        nd = len(x.shape) if is_tensor_layout(x) else 0
        self.input_dim.setdefault(consumer, dim if dim == 1 else dim - nd)  # (N, C, ...) or (..., C)
        if isinstance(x, Tracked) and x.dim == dim:
            return x.ids
        if isinstance(x, Untracked):
            return self.materialize(x, dim)
        if isinstance(x, Tracked):
            reason = (f"{consumer} uses dim {dim} as channels but the prunable channels are on dim {x.dim}")
            self.elements.block(x.ids, reason)
            return self.elements.new(x.shape[dim], blocked=reason)
        raise TypeError(f"{consumer}: expected a tensor input, got {type(x).__name__}")

    def materialize(self, x: Untracked, dim: int) -> np.ndarray:
        key = (id(x), dim)
        if key not in self._materialized:
            ids = self._tensor_member(x, dim) if x.attribute is not None else None
            if ids is None:
                problem = self.tensor_problem(x.attribute) if x.attribute is not None else None
                ids = self.elements.new(x.shape[dim], blocked=f"{x.source} ({problem})" if problem else x.source)
            self._materialized[key] = ids
        return self._materialized[key]

    # -- parameters and buffers the model reads directly ------------------------------------
    def _tensor_member(self, x: Untracked, dim: int) -> np.ndarray | None:
        """Elements for dim ``dim`` of the tensor attribute ``x`` (a ``layer_scale``
        multiplied in, a position embedding added), attached as the member
        (attribute, "tensor") so surgery slices it; None when it cannot follow."""
        name = x.attribute
        if self.tensor_problem(name) is not None:
            return None
        known = self.tensor_dims.setdefault(name, dim)
        ids = self.elements.new(x.shape[dim])
        if known != dim:
            self.elements.block(ids, f"{name} meets the channels on dims {known} and {dim}")
        owner, _, attr = name.rpartition(".")
        tensor = self.model.get_submodule(owner)._parameters.get(attr)
        tensor = tensor if tensor is not None else self.model.get_submodule(owner)._buffers.get(attr)
        if tensor.shape[dim] != x.shape[dim]:  # expanded or sliced along the channels
            self.elements.block(ids, f"{name} (size {tensor.shape[dim]} on dim {dim}) is expanded or sliced "
                                     f"to the {x.shape[dim]} channels it meets")
        self.elements.attach(name, "tensor", ids)
        return ids

    def tensor_problem(self, name: str) -> str | None:
        """Why the tensor attribute ``name`` cannot lose channels with the values it
        meets (None when it can): it must only be combined element-wise, belong to a
        module without a layer spec and not be shared."""
        if name not in self._tensor_problems:
            self._tensor_problems[name] = self._find_tensor_problem(name)
        return self._tensor_problems[name]

    def _find_tensor_problem(self, name: str) -> str | None:
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = self.model.get_submodule(owner_name)
        except AttributeError:
            return f"{name} is not a tensor of the model"
        tensor = owner._parameters.get(attr, owner._buffers.get(attr))
        if tensor is None:
            return f"{name} is not a parameter or buffer"
        if owner_name in self.ignored or spec_for(owner) is not None:
            return f"{name} belongs to {owner_name or 'the model'}, which is ignored or a known layer"
        aliases = [n for n, t in list(self.model.named_parameters(remove_duplicate=False))
                   + list(self.model.named_buffers(remove_duplicate=False)) if t is tensor]
        if len(aliases) > 1:
            return f"{name} is shared ({', '.join(aliases)})"
        for node in self.graph.nodes:
            if node.op == "get_attr" and str(node.target) == name:
                problem = self._attribute_use_problem(name, node)
                if problem is not None:
                    return problem
        return None

    @staticmethod
    def _attribute_use_problem(name: str, node: fx.Node) -> str | None:
        """Why a use of the tensor attribute (read at ``node``, directly or through
        views of it) cannot follow the channels: each must combine it element-wise
        or concatenate it with the channels on another dim."""
        for user in node.users:
            op = canonical(user)[0] if user.op in ("call_function", "call_method") else None
            if op in ELEMENTWISE_BINARY or op in CONCATENATIONS:
                continue
            if op is not None and is_attribute_view(user) and user.args[0] is node:
                problem = Analyzer._attribute_use_problem(name, user)
                if problem is not None:
                    return problem
                continue
            return f"{name} is used by {describe(user)} at node '{user.name}', not element-wise"
        return None

    def produce(self, name: str, count: int, node: fx.Node, channel_dim: int) -> np.ndarray:
        """The output channel elements of producer ``name`` (the same ones on every call)."""
        if name not in self.producer_ids:
            ids = self.elements.new(count)
            self.elements.attach(name, "out", ids)
            self.producer_ids[name] = ids
        self.note_gate(name, node, channel_dim)
        return self.producer_ids[name]

    def note_gate(self, name: str, node: fx.Node, channel_dim: int) -> None:
        """Where a producer's channels are observed: the normalisation (a layer
        whose spec has ``gate_after``: BatchNorm, GroupNorm) that directly and
        exclusively follows it (the paper's gate sits after BN), else its own output."""
        users = list(node.users)
        gate = (name, channel_dim)
        if self.calls.get(name, 0) == 1 and len(users) == 1 and users[0].op == "call_module":
            follower = users[0]
            module = self.model.get_submodule(follower.target)
            spec = spec_for(module)
            if (spec is not None and spec.gate_after and follower.args
                    and follower.args[0] is node and follower.target not in self.ignored):
                gate = (follower.target, 1)
        self.gate_of[name] = gate

    # -- element-wise ops ---------------------------------------------------------------
    def couple_elementwise(self, operands: list, out_shape: tuple[int, ...], what: str):
        """Broadcasting element-wise op over ``operands`` (layouts or scalars).

        Returns (output layout, kinds): kinds[i] is "full" (operand i carries the
        output's channels), "broadcast" (a tensor of size 1 there) or "scalar".
        All full operands are coupled position by position.
        """
        out_nd = len(out_shape)
        od = None
        for v in operands:
            if isinstance(v, Tracked):
                d = v.dim + out_nd - len(v.shape)
                if v.shape[v.dim] == out_shape[d]:
                    od = d
                    break
        kinds, ref = [], None
        for v in operands:
            if not is_tensor_layout(v):
                kinds.append("scalar")
                continue
            bd = None if od is None else od - (out_nd - len(v.shape))
            if bd is None or bd < 0 or (v.shape[bd] == 1 and out_shape[od] != 1):
                if isinstance(v, Tracked):  # its channels are spread by broadcasting: cannot follow
                    self.elements.block(v.ids, f"{what} broadcasts its channels against another dim")
                kinds.append("broadcast")
                continue
            if isinstance(v, Tracked) and v.dim == bd:
                ids = v.ids
            else:
                ids = self.channels_in(v, bd, what)
            if ref is None:
                ref = ids
            else:
                self.elements.union_arrays(ref, ids)
            kinds.append("full")
        if ref is None:
            return Untracked(f"comes from {what}, whose channels could not be followed", out_shape), kinds
        return Tracked(od, ref, out_shape), kinds

    # -- reshaping ops on an index probe --------------------------------------------------
    def run_on_probe(self, node: fx.Node, x: Tracked, args, kwargs, module: nn.Module | None = None,
                     channels: int | None = None, call=None):
        """Runs the node's op (or ``call``) with ``x`` replaced by a tensor holding
        each position's channel index (other tensors hold -1) and returns its
        output(s). With ``channels``, the probe has that many channels instead of x's."""
        size = list(x.shape)
        if channels is not None:
            size[x.dim] = channels
        view = [1] * len(size)
        view[x.dim] = -1
        probe = torch.arange(size[x.dim], dtype=torch.int64).view(view).expand(size).contiguous()

        def substitute(a):
            if a is x:
                return probe
            if is_tensor_layout(a):
                return torch.full(a.shape, -1, dtype=torch.int64)
            return a

        call_args = fx.node.map_aggregate(args, substitute)
        call_kwargs = fx.node.map_aggregate(kwargs, substitute)
        if call is not None:
            return call(*call_args, **call_kwargs)
        if module is not None:
            return module(*call_args, **call_kwargs)
        if node.op == "call_method":
            return getattr(call_args[0], node.target)(*call_args[1:], **call_kwargs)
        return node.target(*call_args, **call_kwargs)

    @staticmethod
    def locate_channels(out: torch.Tensor):
        """Where a probe output keeps the channels: ("tracked", dim, channel index per
        position); ("constant",) when every position holds the same channel (one
        channel: its dim cannot be seen in the values); ("untracked",) when it
        holds no channel; None when the channels are spread over several dims or
        mixed with other values."""
        if out.numel() == 0:
            return ("untracked",)
        negative = out < 0
        if bool(negative.all()):
            return ("untracked",)
        if bool(negative.any()):
            return None
        if bool((out == out.reshape(-1)[0]).all()):
            return ("constant",)
        for d in range(out.ndim):
            index = [0] * out.ndim
            index[d] = slice(None)
            v = out[tuple(index)]
            view = [1] * out.ndim
            view[d] = -1
            if torch.equal(out, v.reshape(view).expand_as(out)):
                return ("tracked", d, v.clone())
        return None

    @staticmethod
    def locate_units(out: torch.Tensor):
        """Where a probe output splits the channels into units: (dim, first channel of
        each unit, unit width) when two adjacent dims ``(d, d + 1)`` hold channel
        ``start[i] + j`` at ``(i, j)`` with aligned units of ``width`` (a view into
        heads of ``head_dim``), and nothing else varies; None otherwise."""
        if out.numel() == 0 or bool((out < 0).any()):
            return None
        for d in range(out.ndim - 1):
            width = out.shape[d + 1]
            if width < 2:
                continue
            index = [0] * out.ndim
            index[d] = index[d + 1] = slice(None)
            table = out[tuple(index)]
            view = [1] * out.ndim
            view[d], view[d + 1] = table.shape
            starts = table[:, 0]
            if (torch.equal(out, table.reshape(view).expand_as(out))
                    and torch.equal(table, starts[:, None] + torch.arange(width))
                    and bool((starts % width == 0).all())):
                return d, starts.clone(), width
        return None

    # -- what we cannot follow ----------------------------------------------------------
    def unknown(self, node: fx.Node, inputs, meta, what: str | None = None):
        """Blocks the channels of every tracked input, warns once, and returns an
        untracked output: an op we do not understand is never treated as element-wise."""
        what = what or f"unknown op {describe(node)} at node '{node.name}'"
        for layout in iter_layouts(inputs):
            if isinstance(layout, Tracked):
                self.elements.block(layout.ids, what)
        if node.name not in self._warned:
            self._warned.add(node.name)
            warnings.warn(f"dependency_groups: {what}: the channels flowing through it are marked unprunable",
                          GraphAnalysisWarning, stacklevel=4)
        return self.untracked_like(meta, f"comes from the output of {what}")
