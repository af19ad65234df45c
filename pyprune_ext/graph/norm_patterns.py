"""Recognizing an RMSNorm module written by hand.

Most transformer code (Hugging Face's models among them, and most hand-written
GPTs) defines its own RMSNorm class instead of using ``nn.RMSNorm``::

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(x.dtype)

Traced op by op, the mean over the channels makes the residual width
inexact to mask, so TaylorPruner would leave it alone. Such a module computes
exactly what ``nn.RMSNorm`` computes; once recognized it is analysed as one, and
masking takes its statistics over the kept channels (``taylor.norm_masks``).

:func:`match_rms_norm` traces the module's forward alone with torch.fx and
matches the graph against the pattern (dtype casts skipped; ``x * rsqrt(v +
eps)`` or ``x / sqrt(v + eps)``; ``x.pow(2)``, ``x ** 2``, ``x * x`` or
``x.square()``); the match is then confirmed numerically in float64 against
``F.rms_norm``, so a near miss (another reduction dim, a ``1 + weight``
scale, a bias) is never taken for an RMSNorm. Verdicts are kept per class:
the forward is the class's code, eps is read from each instance. Inside
another fx trace nothing is recognized (the trace would capture the probe):
the dependency analysis asks before it traces.
"""

from __future__ import annotations

import copy
import operator
import weakref
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import is_fx_tracing
from torch.nn import functional as F

__all__ = ["RMSNormPattern", "match_rms_norm"]

# methods and functions that change a tensor's dtype (or nothing), not its values' meaning
_CASTS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous"}
_MUL = {operator.mul, torch.mul}
_ADD = {operator.add, torch.add}


@dataclass(frozen=True)
class RMSNormPattern:
    """A recognized RMSNorm: its eps is the float attribute ``eps_attribute`` of
    each instance, or the constant ``eps_value`` written in its forward."""

    eps_attribute: str | None
    eps_value: float

    def eps(self, module: nn.Module) -> float:
        return float(getattr(module, self.eps_attribute)) if self.eps_attribute else self.eps_value


_VERDICTS: "weakref.WeakKeyDictionary[type, RMSNormPattern | None]" = weakref.WeakKeyDictionary()


def match_rms_norm(module: nn.Module) -> RMSNormPattern | None:
    """The RMSNorm pattern of ``module``'s forward, or None when it is not
    ``weight * x * rsqrt(mean(x ** 2, -1) + eps)`` over its one (C,) weight."""
    if not _shaped_like_rms_norm(module):
        return None
    cls = type(module)
    if cls not in _VERDICTS:
        if is_fx_tracing():
            return None
        _VERDICTS[cls] = _recognize(module)
    return _VERDICTS[cls]


def _shaped_like_rms_norm(module: nn.Module) -> bool:
    """The cheap precondition: no children, one parameter, a 1-D ``weight``."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    return (len(params) == 1 and weight is not None and weight.dim() == 1
            and next(module.children(), None) is None and type(module).forward is not nn.Module.forward)


def _recognize(module: nn.Module) -> RMSNormPattern | None:
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - a forward fx cannot trace is simply not recognized
        return None
    eps = _eps_of_graph(graph)
    if eps is None or not _computes_rms_norm(module, eps):
        return None
    names = [n for n, v in vars(module).items() if isinstance(v, float) and not isinstance(v, bool) and v == eps]
    return RMSNormPattern(names[0] if len(names) == 1 else None, eps)


def _strip(node):
    """``node`` without the dtype casts applied to it."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS:
        node = node.args[0]
    return node


def _is_call(node, methods: set[str], functions: set) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in methods)
        or (node.op == "call_function" and node.target in functions))


def _operands(node) -> tuple:
    return tuple(_strip(a) for a in node.args[:2])


def _eps_of_graph(graph: fx.Graph) -> float | None:
    """The eps of ``weight * normalized(x)`` when the graph is that, else None."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    if len(inputs) != 1 or not isinstance(output.args[0], fx.Node):
        return None
    x, out = inputs[0], _strip(output.args[0])
    if not _is_call(out, {"mul"}, _MUL):
        return None
    a, b = _operands(out)
    is_weight = lambda n: isinstance(n, fx.Node) and n.op == "get_attr" and n.target == "weight"  # noqa: E731
    normalized = b if is_weight(a) else a if is_weight(b) else None
    return _eps_of_normalized(normalized, x) if normalized is not None else None


def _eps_of_normalized(node, x: fx.Node) -> float | None:
    """``x * rsqrt(s)``, ``rsqrt(s) * x`` or ``x / sqrt(s)`` with ``s = mean(x ** 2, -1) + eps``."""
    node = _strip(node)
    if _is_call(node, {"mul"}, _MUL):
        a, b = _operands(node)
        scale = b if a is x else a if b is x else None
        if not _is_call(scale, {"rsqrt"}, {torch.rsqrt}):
            return None
        return _eps_of_sum(_strip(scale.args[0]), x)
    if _is_call(node, {"div"}, {operator.truediv, torch.div}):
        a, b = _operands(node)
        if a is not x or not _is_call(b, {"sqrt"}, {torch.sqrt}):
            return None
        return _eps_of_sum(_strip(b.args[0]), x)
    return None


def _eps_of_sum(node, x: fx.Node) -> float | None:
    if not _is_call(node, {"add"}, _ADD):
        return None
    a, b = _operands(node)
    mean, eps = (a, b) if isinstance(b, (int, float)) else (b, a)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not _is_mean_of_squares(mean, x):
        return None
    return float(eps)


def _is_mean_of_squares(node, x: fx.Node) -> bool:
    """``mean(x ** 2, -1, keepdim=True)`` (any of the usual spellings of the square)."""
    if not _is_call(node, {"mean"}, {torch.mean}):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim not in (-1, (-1,), [-1]) or not node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2]):
        return False
    square = _strip(node.args[0])
    if _is_call(square, {"pow"}, {torch.pow, operator.pow}):
        return _strip(square.args[0]) is x and square.args[1] == 2
    if _is_call(square, {"mul"}, _MUL):
        return _operands(square) == (x, x)
    return _is_call(square, {"square"}, {torch.square}) and _strip(square.args[0]) is x


def _computes_rms_norm(module: nn.Module, eps: float) -> bool:
    """The structural match confirmed on random float64 inputs (to float32's
    precision: Hugging Face's computes in float32 whatever the input's dtype)."""
    try:
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
        width = probe.weight.shape[0]
        x = torch.randn(2, 3, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = type(probe).forward(probe, x)  # no hooks: a norm being masked is still an RMSNorm
            want = F.rms_norm(x, (width,), probe.weight, eps)
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - a module that cannot run this probe is not recognized
        return False
