"""Tracing a model into a torch.fx graph whose nodes carry the values of one run.

The analysis needs the graph (which op feeds which) and the shapes of one
concrete run (flatten sizes, view arguments). ``torch.fx.symbolic_trace`` gives
the graph; a ``torch.fx.Interpreter`` run on the example input records each
node's value in ``node.meta["pyprune_value"]`` (tensors as ``TensorMeta``, other
values as they are: ints, sizes, tuples). When fx cannot trace the model
(data-dependent control flow), ``fallback.trace_by_execution`` builds the same
kind of graph by running the model.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from .fallback import trace_by_execution
from .recording import VALUE, summarize
from .rules import module_class_rule, user_functions
from .specs import spec_for
from .structs import GraphAnalysisWarning

# Modules fx must not trace into: besides the layers with a spec (a MaskedConv2d's
# forward calls custom ops, a BatchNorm's calls F.batch_norm), these reshape or
# pass channels through.
OPAQUE_OK = (nn.Flatten, nn.Unflatten, nn.Identity)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


@dataclass
class Traced:
    """A traced graph (each node's recorded value in ``node.meta[VALUE]``) and
    how it was obtained."""

    graph: fx.Graph
    by_execution: bool


def leaf_predicate(model: nn.Module, ignored: set[int]):
    """Whether a module is traced as one opaque node: ignored modules, the layers
    the analysis knows, and torch.nn's own modules (fx's default rule). Which
    modules are known is decided before tracing: recognizing a hand-written
    layer (``norm_patterns``) runs its forward, which must not happen inside
    the model's trace."""
    default = fx.Tracer()
    known = {id(m) for m in model.modules() if spec_for(m) is not None or module_class_rule(m) is not None}

    def is_leaf(module: nn.Module, qualname: str = "") -> bool:
        if id(module) in ignored or id(module) in known or isinstance(module, OPAQUE_OK):
            return True
        if isinstance(module, CONTAINERS) or type(module) is nn.Module:
            return False  # containers (a bare nn.Module used as a namespace too): look inside
        return default.is_leaf_module(module, qualname)

    return is_leaf


class _LeafTracer(fx.Tracer):
    def __init__(self, is_leaf):
        # functions a user declared a rule for are one node each, not traced into
        super().__init__(autowrap_functions=user_functions())
        self._is_leaf = is_leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self._is_leaf(m, module_qualified_name)


class _Recorder(fx.Interpreter):
    """Runs the graph once and stores every node's (summarized) value."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        n.meta[VALUE] = summarize(result)
        return result


def positional_inputs(model: nn.Module, example_inputs) -> tuple:
    """``example_inputs`` as positional arguments of ``model.forward``: a tensor,
    a tuple/list of arguments, or a dict of keyword arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, dict):
        signature = inspect.signature(model.forward)
        bound = signature.bind(**example_inputs)
        bound.apply_defaults()
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        extra = [name for name, value in bound.arguments.items()
                 if signature.parameters[name].kind not in positional and value not in ({}, ())]
        if extra:
            raise TypeError(f"example_inputs: {', '.join(extra)} cannot be passed by position to "
                            f"{type(model).__name__}.forward; give only its positional parameters")
        return tuple(value for name, value in bound.arguments.items()
                     if signature.parameters[name].kind in positional)
    raise TypeError("example_inputs must be a tensor, a tuple/list of forward arguments or a dict of "
                    f"keyword arguments, got {type(example_inputs).__name__}")


@contextlib.contextmanager
def analysis_mode(model: nn.Module):
    """Eval mode and no autograd while tracing: the example run must not update
    BatchNorm running statistics; every module's training flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in flags:
            m.training = training


def trace_with_fx(model: nn.Module, args: tuple, is_leaf) -> fx.Graph:
    """symbolic_trace with our leaf rule, then one recorded run."""
    tracer = _LeafTracer(is_leaf)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    _Recorder(gm).run(*args)
    return gm.graph


def trace_model(model: nn.Module, example_inputs, ignored: set[int]) -> Traced:
    """The model's graph with recorded values: torch.fx first, execution tracing
    (with a warning) when fx fails."""
    args = positional_inputs(model, example_inputs)
    is_leaf = leaf_predicate(model, ignored)
    with analysis_mode(model):
        try:
            return Traced(trace_with_fx(model, args, is_leaf), by_execution=False)
        except Exception as fx_error:  # noqa: BLE001 - any fx failure means: try the fallback
            reason = f"{type(fx_error).__name__}: {str(fx_error).splitlines()[0] if str(fx_error) else ''}"
        try:
            if isinstance(example_inputs, dict):  # as the user calls it: by keyword
                graph = trace_by_execution(model, (), is_leaf, kwargs=dict(example_inputs))
            else:
                graph = trace_by_execution(model, args, is_leaf)
        except Exception as run_error:
            raise RuntimeError(f"dependency_groups: torch.fx could not trace {type(model).__name__} ({reason}) "
                               f"and running it on the example input failed too: {run_error}") from run_error
    warnings.warn(
        f"dependency_groups: torch.fx could not trace {type(model).__name__} ({reason}); used the fallback "
        "that traces by running the example input (forward hooks + TorchFunctionMode). Only the code path "
        "this input takes is analysed.", GraphAnalysisWarning, stacklevel=3)
    return Traced(graph, by_execution=True)
