"""Tracing by execution, for models torch.fx cannot trace symbolically.

The model runs once on the example input. Forward hooks on the leaf modules
record each module call; a ``TorchFunctionMode`` records every torch function
and Tensor method applied outside leaf modules (add, cat, flatten, view, ...).
Tensors are matched to the node that produced them by identity, and the result
is an ordinary ``torch.fx.Graph`` with the recorded values in node metadata, so
the analysis cannot tell the two tracers apart. Only the branches the example
input takes are seen.
"""

from __future__ import annotations

import inspect
import operator

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .recording import VALUE, summarize


class _Recorder(TorchFunctionMode):
    """Builds the graph while the model runs."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        super().__init__()
        self.graph = graph
        self.node_of: dict[int, fx.Node] = {}  # id(tensor) -> node that produced it
        self.alive: list[torch.Tensor] = []    # keeps ids unique while tracing
        self.depth = 0                          # > 0 inside a leaf module
        self.pending: list[tuple] = []          # inputs of the leaf calls in progress
        self.attrs = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + \
                list(model.named_buffers(remove_duplicate=False)):
            self.attrs.setdefault(id(t), name)
        self.unknown = 0

    # -- tensors <-> nodes ------------------------------------------------------------
    def register(self, value, node: fx.Node) -> None:
        """Maps every tensor inside ``value`` to ``node`` (or a getitem of it)."""
        node.meta[VALUE] = summarize(value)
        if isinstance(value, torch.Tensor):
            self.node_of[id(value)] = node
            self.alive.append(value)
        elif isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor) or isinstance(item, (tuple, list)):
                    self.register(item, self.graph.call_function(operator.getitem, (node, i)))

    def as_arg(self, value):
        """A call argument for the graph: tensors become nodes."""
        if isinstance(value, torch.Tensor):
            node = self.node_of.get(id(value))
            if node is None:  # a parameter, buffer or tensor made outside any recorded op
                name = self.attrs.get(id(value))
                if name is None:
                    self.unknown += 1
                    name = f"<tensor made outside the traced ops #{self.unknown}>"
                node = self.graph.get_attr(name)
                self.register(value, node)
            return node
        if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
            return type(value)(self.as_arg(v) for v in value) if isinstance(value, list) else \
                tuple(self.as_arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self.as_arg(v) for k, v in value.items()}
        return value

    # -- functions ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off inside this method: no recursion
        # __setitem__ returns None but writes into its tensor: the analysis must see it
        if self.depth == 0 and (_has_tensor(out) or getattr(func, "__name__", "") == "__setitem__"):
            node = self.graph.call_function(func, self.as_arg(args), self.as_arg(kwargs))
            self.register(out, node)
        return out

    # -- leaf modules -----------------------------------------------------------------
    def pre_hook(self, name):
        def hook(module, args, kwargs):
            if self.depth == 0:
                self.pending.append((self.as_arg(args), self.as_arg(kwargs)))
            self.depth += 1
        return hook

    def post_hook(self, name):
        def hook(module, args, kwargs, output):
            self.depth -= 1
            if self.depth == 0:
                node_args, node_kwargs = self.pending.pop()
                node = self.graph.call_module(name, node_args, node_kwargs)
                self.register(output, node)
        return hook


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return any(_has_tensor(v) for v in value)
    return False


def _outermost_leaves(model: nn.Module, is_leaf) -> list[tuple[str, nn.Module]]:
    leaves, seen = [], set()

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in seen:
                continue
            seen.add(id(child))
            if is_leaf(child, name):
                leaves.append((name, child))
            else:
                visit(name, child)

    visit("", model)
    return leaves


def _argument_names(model: nn.Module, count: int) -> list[str]:
    """forward's parameter names (as fx names placeholders), for messages."""
    try:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return [names[i] if i < len(names) else f"input_{i}" for i in range(count)]


def trace_by_execution(model: nn.Module, args: tuple, is_leaf, kwargs: dict | None = None) -> fx.Graph:
    """Runs ``model(*args, **kwargs)`` once and returns the graph of what ran."""
    graph = fx.Graph()
    recorder = _Recorder(model, graph)
    kwargs = kwargs or {}
    for name, value in zip(_argument_names(model, len(args)), args):
        recorder.register(value, graph.placeholder(name))
    for name, value in kwargs.items():
        recorder.register(value, graph.placeholder(name))
    handles = []
    try:
        for name, leaf in _outermost_leaves(model, is_leaf):
            handles.append(leaf.register_forward_pre_hook(recorder.pre_hook(name), with_kwargs=True))
            handles.append(leaf.register_forward_hook(recorder.post_hook(name), with_kwargs=True))
        with recorder:
            output = model(*args, **kwargs)
        graph.output(recorder.as_arg(output))
    finally:
        for handle in handles:
            handle.remove()
    return graph
