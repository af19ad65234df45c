"""The Taylor-statistics ops: typed wrappers, fake kernels and autograd.

The kernels live in csrc/ (CPU and CUDA); this module makes them first-class
PyTorch ops: traceable by torch.compile(fullgraph=True) through the fake kernels
below, and differentiable where that has a meaning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the statistics for inputs of ``dtype``: float64 stays float64,
    everything else accumulates and returns float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Public wrappers


def taylor_channel_stats(a: Tensor, g: Tensor, channel_dim: int = 1) -> tuple[Tensor, Tensor]:
    """Per-channel Taylor statistics of an activation and its gradient, in one pass.

    With ``s[n, c]`` the sum over every dim other than the batch dim 0 and
    ``channel_dim`` of ``a * g``:

    * ``first[c] = sum_n s[n, c]``: the gradient of the loss w.r.t. a gate on
      channel ``c``; the Taylor-FO-BN importance is ``first ** 2``.
    * ``second[c] = sum_n s[n, c] ** 2``: the per-example ("FG") score and the
      empirical-Fisher diagonal used by the second-order estimate.

    Args:
        a: activation, e.g. (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W) in
           any memory layout (channels-last included), or (N, L, C) with
           ``channel_dim=-1``. float32, float16, bfloat16 or float64.
        g: gradient of the loss w.r.t. ``a``: same shape, dtype and device.
        channel_dim: the channel dim (not 0, the batch dim). Negative counts from the end.

    Returns:
        ``(first, second)``, each of shape (C,), float32 (float64 for float64 inputs).
        An empty batch gives zeros. Results are bit-identical on repeated calls.
    """
    return torch.ops.pyprune.taylor_channel_stats.default(a, g, channel_dim)


def taylor_channel_stats_(a: Tensor, g: Tensor, first: Tensor, second: Tensor,
                          channel_dim: int = 1) -> None:
    """In-place form of :func:`taylor_channel_stats`: adds this minibatch's
    ``first`` and ``second`` into the given buffers (shape (C,), dtype
    ``stats_dtype(a.dtype)``, same device as ``a``), so statistics can be summed
    over many minibatches without allocating outputs."""
    torch.ops.pyprune.taylor_channel_stats_.default(a, g, first, second, channel_dim)


def taylor_weight_stats(w: Tensor, g_w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel Taylor statistics of a weight and its gradient.

    For each slice ``w[c]`` (dim 0, e.g. one conv filter or one Linear row):
    ``first[c] = sum(w[c] * g_w[c])`` (its square is the group Taylor-FO weight
    score) and ``second[c] = sum((w[c] * g_w[c]) ** 2)``.
    Returns float32 (float64 for float64 inputs) tensors of shape (C_out,).
    """
    return torch.ops.pyprune.taylor_weight_stats.default(w, g_w)


# ---------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, with the same argument checks as C++.


def _check_pair(op: str, a: Tensor, g: Tensor, a_name: str, g_name: str) -> None:
    for t, name in ((a, a_name), (g, g_name)):
        torch._check(t.layout == torch.strided,
                     lambda: f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
        torch._check(t.dtype in _SUPPORTED_DTYPES,
                     lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    torch._check(a.shape == g.shape,
                 lambda: f"{op}: {a_name} and {g_name} must have the same shape, got {list(a.shape)} and {list(g.shape)}")
    torch._check(a.dtype == g.dtype,
                 lambda: f"{op}: {a_name} and {g_name} must have the same dtype, got {a.dtype} and {g.dtype}")
    torch._check(a.device == g.device,
                 lambda: f"{op}: {a_name} and {g_name} must be on the same device, got {a.device} and {g.device}")


def _channel_count(op: str, a: Tensor, g: Tensor, channel_dim: int) -> int:
    _check_pair(op, a, g, "a", "g")
    torch._check(a.dim() >= 2, lambda: f"{op}: a must have a batch dim and a channel dim, got shape {list(a.shape)}")
    torch._check(-a.dim() <= channel_dim < a.dim(),
                 lambda: f"{op}: channel_dim={channel_dim} is out of range for a {a.dim()}-d input")
    torch._check(channel_dim % a.dim() != 0,
                 lambda: f"{op}: channel_dim must not be 0, the batch dim (got channel_dim={channel_dim})")
    return a.shape[channel_dim]


@torch.library.register_fake("pyprune::taylor_channel_stats")
def _taylor_channel_stats_fake(a, g, channel_dim=1):
    channels = _channel_count("taylor_channel_stats", a, g, channel_dim)
    dtype = stats_dtype(a.dtype)
    return a.new_empty((channels,), dtype=dtype), a.new_empty((channels,), dtype=dtype)


@torch.library.register_fake("pyprune::taylor_channel_stats_")
def _taylor_channel_stats_inplace_fake(a, g, first, second, channel_dim=1):
    op = "taylor_channel_stats_"
    channels = _channel_count(op, a, g, channel_dim)
    for buf, name in ((first, "first"), (second, "second")):
        torch._check(buf.device == a.device,
                     lambda: f"{op}: {name} must be on the same device as a ({a.device}), got {buf.device}")
        torch._check(buf.shape == (channels,),
                     lambda: f"{op}: {name} must have shape [{channels}] (one entry per channel), got {list(buf.shape)}")
        torch._check(buf.dtype == stats_dtype(a.dtype),
                     lambda: f"{op}: {name} must be {stats_dtype(a.dtype)} for {a.dtype} inputs, got {buf.dtype}")
    return None


@torch.library.register_fake("pyprune::taylor_weight_stats")
def _taylor_weight_stats_fake(w, g_w):
    _check_pair("taylor_weight_stats", w, g_w, "w", "g_w")
    torch._check(w.dim() >= 1, lambda: "taylor_weight_stats: w must have an output-channel dim 0, got a 0-d tensor")
    dtype = stats_dtype(w.dtype)
    return w.new_empty((w.shape[0],), dtype=dtype), w.new_empty((w.shape[0],), dtype=dtype)


# ---------------------------------------------------------------------------
# Autograd. The statistics are polynomials in a and g:
#   d first[c]  / d a[n, c, ...] = g[n, c, ...]
#   d second[c] / d a[n, c, ...] = 2 s[n, c] g[n, c, ...]
# and symmetrically for g. Scores are normally computed under no_grad; these
# formulas make the ops safe to use inside differentiable code too.


def _zeros_if_none(grad, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _channel_stats_setup(ctx, inputs, output):
    a, g, channel_dim = inputs
    ctx.save_for_backward(a, g)
    ctx.channel_dim = channel_dim


def _channel_stats_backward(ctx, grad_first, grad_second):
    a, g = ctx.saved_tensors
    first_like = a.new_empty((a.shape[ctx.channel_dim],), dtype=stats_dtype(a.dtype))
    grad_first = _zeros_if_none(grad_first, first_like)
    grad_second = _zeros_if_none(grad_second, first_like)
    a_c = a.movedim(ctx.channel_dim, 1).to(first_like.dtype)
    g_c = g.movedim(ctx.channel_dim, 1).to(first_like.dtype)
    per_example = (a_c * g_c).reshape(a_c.shape[0], a_c.shape[1], math.prod(a_c.shape[2:])).sum(-1)  # s[n, c]
    coef = grad_first + 2 * grad_second * per_example  # (N, C)
    coef = coef.reshape(coef.shape + (1,) * (a_c.dim() - 2))
    grad_a = (coef * g_c).movedim(1, ctx.channel_dim).to(a.dtype)
    grad_g = (coef * a_c).movedim(1, ctx.channel_dim).to(g.dtype)
    return grad_a, grad_g, None


def _weight_stats_setup(ctx, inputs, output):
    w, g_w = inputs
    ctx.save_for_backward(w, g_w)


def _weight_stats_backward(ctx, grad_first, grad_second):
    w, g_w = ctx.saved_tensors
    first_like = w.new_empty((w.shape[0],), dtype=stats_dtype(w.dtype))
    grad_first = _zeros_if_none(grad_first, first_like)
    grad_second = _zeros_if_none(grad_second, first_like)
    shape = (-1,) + (1,) * (w.dim() - 1)
    w_acc, g_acc = w.to(first_like.dtype), g_w.to(first_like.dtype)
    coef = grad_first.reshape(shape) + 2 * grad_second.reshape(shape) * w_acc * g_acc
    return (coef * g_acc).to(w.dtype), (coef * w_acc).to(g_w.dtype)


torch.library.register_autograd("pyprune::taylor_channel_stats", _channel_stats_backward,
                                setup_context=_channel_stats_setup)
torch.library.register_autograd("pyprune::taylor_weight_stats", _weight_stats_backward,
                                setup_context=_weight_stats_setup)
