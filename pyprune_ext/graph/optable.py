"""What the analysis knows about torch functions and Tensor methods.

A node's op is reduced to a canonical name ("add", "flatten", "cat", ...) from
either tracer's form: fx's ``call_function(operator.add)`` /
``call_method("view")``, or the execution tracer's ``Tensor.add`` /
``Tensor.__getitem__``. Only functions that come from torch, ``operator`` or
``builtins`` get a canonical name: a user function that happens to be called
``add`` stays unknown. Anything not listed here is unknown, and the channels
that flow through it become unprunable (with a warning).
"""

from __future__ import annotations

import builtins
import operator
import sys

import torch
from torch import fx
from torch.nn import functional as F

# in-place and operator spellings -> canonical name
ALIASES = {
    "iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "truediv": "div", "divide": "div",
    "ifloordiv": "floordiv", "multiply": "mul", "subtract": "sub", "concat": "cat", "concatenate": "cat",
    "clip": "clamp", "swapaxes": "transpose", "swapdims": "transpose", "moveaxis": "movedim",
    "absolute": "abs", "negative": "neg", "greater": "gt", "greater_equal": "ge", "less": "lt",
    "less_equal": "le", "not_equal": "ne", "ipow": "pow", "true_divide": "div",
}
# reflected operators (other OP self): canonical name, operands swapped
REFLECTED = {"radd": "add", "rsub": "sub", "rmul": "mul", "rtruediv": "div", "rdiv": "div",
             "rfloordiv": "floordiv", "rpow": "pow", "rmatmul": "matmul"}

# f(0) == 0: a zeroed channel stays zero
ZERO_PRESERVING = {
    "relu", "relu6", "leaky_relu", "gelu", "silu", "mish", "hardswish", "elu", "selu", "celu", "tanh",
    "neg", "abs", "sin", "sqrt", "square", "erf", "tanhshrink", "softshrink", "hardshrink", "softsign",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as",
    "cpu", "cuda", "requires_grad", "sign", "trunc", "round", "floor", "ceil", "expm1", "log1p",
    "sinh", "asinh", "atan", "tan", "data", "nan_to_num", "positive",
}
# element-wise, but f(0) != 0: masking is not exact
NOT_ZERO_PRESERVING = {
    "sigmoid", "hardsigmoid", "exp", "cos", "cosh", "softplus", "log", "logsigmoid", "log_sigmoid",
    "reciprocal", "rsqrt", "erfc", "exp2", "logit", "bitwise_not", "logical_not",
}
# element-wise with a threshold argument: zero-preserving depending on it
CLAMPS = {"clamp", "clamp_min", "clamp_max", "hardtanh", "threshold"}
# new tensors shaped like the input: pruning the input shrinks them
LIKE = {"zeros_like": True, "ones_like": False, "full_like": False, "empty_like": False,
        "rand_like": False, "randn_like": False, "randint_like": False}
# new tensors that do not depend on the input's channels
CONSTRUCTORS = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim", "numel"}

ADD_LIKE = {"add", "sub"}
BINARY = ADD_LIKE | {"mul", "div", "floordiv", "maximum", "minimum", "fmax", "fmin", "pow",
                     "eq", "ne", "lt", "le", "gt", "ge", "where"}

# reshaping ops, followed by running them on an index probe
SHAPE_OPS = {"flatten", "view", "reshape", "permute", "transpose", "movedim", "unsqueeze", "squeeze",
             "t", "expand", "unflatten", "view_as", "reshape_as", "expand_as", "repeat", "tile", "T", "mT",
             "ravel", "broadcast_to", "adjoint", "repeat_interleave"}
# batched matrix products (attention's q @ k^T and weights @ v)
MATMUL = {"matmul", "bmm"}
# ops that take a fixed subset of the channels (fine only when they take them all)
SELECT_OPS = {"getitem", "narrow", "select", "split", "chunk", "tensor_split", "unbind", "split_with_sizes",
              "hsplit", "vsplit", "dsplit"}
# reductions: over the channels, "sum" keeps masking exact, argmax/argmin block
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod",
              "nansum", "nanmean", "all", "any", "argmax", "argmin", "count_nonzero", "median"}
EXACT_REDUCTIONS = {"sum", "nansum", "count_nonzero", "all", "any"}
INDEX_REDUCTIONS = {"argmax", "argmin", "median"}
SOFTMAX = {"softmax", "log_softmax"}
CAT = {"cat", "stack"}
PAD = {"pad"}
# ops over trailing spatial dims: name -> number of spatial dims (None: all dims after 1)
SPATIAL = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3,
    "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3,
    "adaptive_max_pool2d_with_indices": 2, "lp_pool1d": 1, "lp_pool2d": 2, "lp_pool3d": 3,
    "interpolate": None, "upsample": None, "upsample_nearest": None, "upsample_bilinear": None,
}
# attributes of a tensor that are tensors
TENSOR_ATTRS = {"T": "T", "mT": "mT", "data": "data", "H": "T", "mH": "mT"}


def _library_function(func) -> str | None:
    """Canonical names for functions outside torch that models commonly call.
    torchvision's stochastic_depth is the identity in eval mode and multiplies
    by a per-sample 0/(1-p) factor in training: element-wise and zero-preserving.
    Looked up only if the user already imported it."""
    module = sys.modules.get("torchvision.ops.stochastic_depth")
    if module is not None and func is getattr(module, "stochastic_depth", None):
        return "dropout"
    return None


def _trusted(func) -> bool:
    """A function from torch, operator or builtins (not a user function)."""
    module = getattr(func, "__module__", None) or ""
    if module.split(".")[0] in ("torch", "_operator", "operator", "builtins"):
        return True
    name = getattr(func, "__name__", None)
    return name is not None and getattr(torch.Tensor, name, None) is func


def _strip(name: str) -> str:
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variant
    return name


def canonical(node: fx.Node) -> tuple[str | None, bool]:
    """(canonical op name or None when unknown, whether the first two operands are swapped)."""
    if node.op == "call_method":
        name = _strip(node.target)
    elif node.op == "call_function":
        func = node.target
        if func is builtins.getattr:
            attr = node.args[1] if len(node.args) > 1 else None
            return ("getattr", False) if isinstance(attr, str) else (None, False)
        if getattr(func, "__name__", None) == "__get__" and hasattr(func, "__self__"):
            # a Tensor property read by the execution tracer (x.T, x.data)
            attr = getattr(func.__self__, "__name__", "")
            return (("attr:" + attr), False) if attr in TENSOR_ATTRS else (None, False)
        known = _library_function(func)
        if known is not None:
            return known, False
        if not _trusted(func):
            return None, False
        name = _strip(getattr(func, "__name__", ""))
    else:
        return None, False
    if name in REFLECTED:
        return REFLECTED[name], True
    return ALIASES.get(name, name), False


def describe_at(node: fx.Node) -> str:
    """The op and its node, for reasons: "torch.roll at node 'roll'"."""
    return f"{describe(node)} at node '{node.name}'"


def describe(node: fx.Node) -> str:
    """A readable op name for messages: torch.roll, Tensor.view, operator.add, module 'fc'."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        func = node.target
        name = getattr(func, "__name__", repr(func))
        if name == "__get__" and hasattr(func, "__self__"):
            return f"Tensor.{getattr(func.__self__, '__name__', '?')}"
        for prefix, namespace in (("torch", torch), ("torch.nn.functional", F), ("operator", operator),
                                  ("Tensor", torch.Tensor)):
            if getattr(namespace, name, None) is func:
                return f"{prefix}.{name}"
        module = getattr(func, "__module__", None)
        return f"{module}.{name}" if module else name
    return str(node.target)


def get_arg(args: tuple, kwargs: dict, position: int, names: tuple[str, ...], default=None):
    """An argument given by position or by one of its keyword names."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    if position < len(args):
        return args[position]
    return default
