"""LayerNorm / RMSNorm statistics over the kept channels, while channels are masked.

Removing a channel from a LayerNorm's input changes the mean and variance of
the others; zeroing it does not (the zero still counts). So for a group coupled
to a norm over its channels (``ChannelGroup.masked_norms``: a transformer's
residual stream), masking computes what removal computes only if the norm takes
its statistics over the kept channels. :class:`NormMasks` does that with a
forward hook per norm that recomputes the output from the input and the kept
channels (the norm runs twice; a norm with nothing masked is left alone). The
masked channels' weight and bias are zero already, so their output is zero.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..graph.specs import spec_for

__all__ = ["NormMasks", "masked_norm"]


def masked_norm(module: nn.Module, x: Tensor, keep: Tensor, dim: int = -1) -> Tensor:
    """``module`` (LayerNorm, or an RMSNorm: torch's or another library's) applied
    to ``x`` over its channels on ``dim`` as if the channels where ``keep`` is False
    were not there (they come out zero)."""
    if dim % x.dim() != x.dim() - 1:  # (N, C, H, W) for a channels-first LayerNorm
        return masked_norm(module, x.movedim(dim, -1), keep).movedim(-1, dim)
    m = keep.to(device=x.device, dtype=x.dtype)
    count = m.sum()
    if isinstance(module, nn.LayerNorm):
        mean = (x * m).sum(-1, keepdim=True) / count
        centred = (x - mean) * m
        y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / count + module.eps)
    else:  # nn.RMSNorm, an RMSNorm module of another library or one written by hand
        eps = spec_for(module).epsilon(module)
        eps = eps if eps is not None else torch.finfo(x.dtype).eps
        y = x * m * torch.rsqrt((x * x * m).sum(-1, keepdim=True) / count + eps)
    if module.weight is not None:
        y = y * module.weight
    if getattr(module, "bias", None) is not None:
        y = y + module.bias * m
    return y


class NormMasks:
    """Kept-channel masks of norm modules, applied by forward hooks until
    :meth:`remove` (the hooks hold the masks, not this object)."""

    def __init__(self, model: nn.Module, norms: Sequence[str]):
        modules = dict(model.named_modules())
        self.keep: dict[str, Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(norms):
            module = modules[name]
            spec = spec_for(module)
            shape = spec.normalized_shape(module)
            if len(shape) != 1:
                raise ValueError(f"NormMasks: {name} normalizes more than its channels")
            keep = torch.ones(shape[0], dtype=torch.bool)
            self.keep[name] = keep
            self._handles.append(module.register_forward_hook(_hook(keep, spec.channel_dim)))

    def mask(self, name: str, positions: Tensor) -> None:
        """The channels ``positions`` of norm ``name`` are masked from now on."""
        self.keep[name][positions] = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _hook(keep: Tensor, dim: int):
    def hook(module, inputs, output):
        if bool(keep.all()):
            return None
        return masked_norm(module, inputs[0], keep, dim)
    return hook
