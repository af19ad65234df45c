"""Multi-head attention whose heads can be removed.

``torch.nn.MultiheadAttention`` ties the width of its heads (``num_heads *
head_dim``) to the width of its input and output (``embed_dim``), so it cannot
lose a head without the whole residual stream losing the same width.
:class:`MultiheadAttention` is a drop-in subclass that keeps the two apart:
``embed_dim`` stays the stream's width and ``num_heads`` heads of ``head_dim``
remain. It computes what torch's module computes with the same parameters (same
names, so state dicts load either way), through ``F.scaled_dot_product_attention``
and a call of ``self.out_proj`` as a module, which is where a head's Taylor gate
observes it. :meth:`MultiheadAttention.from_torch` converts a torch module,
sharing its parameters (an optimizer built on them still applies).

:func:`convert` switches a model's attention modules to their head-aware versions
in place, from one registry of conversions: torch's MultiheadAttention here, and
torchvision's Swin window attention (``pyprune_ext.nn.swin``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._library import register_imported

__all__ = ["MultiheadAttention", "convert"]


def checked_head_dim(width: int, num_heads: int, head_dim: int | None, width_name: str) -> int:
    """``head_dim``, or ``width // num_heads`` when it is None (the torch layout);
    ValueError for a width the heads do not divide or an empty head."""
    if head_dim is None:
        if width % num_heads:
            raise ValueError(f"{width_name} {width} is not divisible by num_heads {num_heads}; give head_dim")
        head_dim = width // num_heads
    if num_heads < 1 or head_dim < 1:
        raise ValueError(f"need at least one head of at least one dim, got {num_heads} x {head_dim}")
    return head_dim


class MultiheadAttention(nn.MultiheadAttention):
    """Self- or cross-attention with ``num_heads`` heads of ``head_dim`` on inputs of
    width ``embed_dim`` (packed q/k/v projection, as torch's with equal
    ``kdim``/``vdim``; no ``bias_k``/``bias_v``/``add_zero_attn``)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, head_dim: int | None = None, device=None, dtype=None):
        nn.Module.__init__(self)
        head_dim = checked_head_dim(embed_dim, num_heads, head_dim, "embed_dim")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.kdim, self.vdim, self._qkv_same_embed_dim = embed_dim, embed_dim, embed_dim, True
        self.num_heads, self.head_dim, self.dropout, self.batch_first = num_heads, head_dim, dropout, batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **factory))
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(inner, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """The same attention, sharing ``module``'s parameters and training mode."""
        problem = unsupported(module)
        if problem:
            raise ValueError(f"MultiheadAttention.from_torch: {problem}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "head_dim", "dropout",
                     "batch_first", "bias_k", "bias_v", "add_zero_attn"):
            setattr(new, attr, getattr(module, attr))
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            new.register_parameter(name, module._parameters.get(name))
        new.out_proj = module.out_proj
        new.train(module.training)
        return new

    @property
    def inner_dim(self) -> int:
        """Width of the heads together: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def uses_torch_forward(self) -> bool:
        """Whether a call now runs torch's own forward (its fused inference kernels, the
        output projection as a function): when the heads fill ``embed_dim`` and no
        gradient is recorded, so no gate needs to observe ``out_proj``."""
        return self.inner_dim == self.embed_dim and not torch.is_grad_enabled()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if self.uses_torch_forward():
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batched = query.dim() == 3
        self_attention = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (L, N, E) from here on, as torch's functional form
        length, batch, _ = query.shape
        if self_attention:  # one GEMM for q, k and v
            q, k, v = (self._heads(t) for t in F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1))
        else:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q, k, v = self._heads(F.linear(query, w_q, b_q)), self._heads(F.linear(key, w_k, b_k)), \
                self._heads(F.linear(value, w_v, b_v))  # (N, H, L, D)
        mask = self._mask(attn_mask, key_padding_mask, batch, length, k.shape[2], q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        # batch first into out_proj whatever the layout: a head's gate there sees examples on dim 0
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.inner_dim))
        if not (self.batch_first and batched):
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if weights is not None and not batched:
            weights = weights.squeeze(0)
        return out, weights

    def _heads(self, x: Tensor) -> Tensor:
        """(L, N, H * D) -> (N, H, L, D)."""
        length, batch, _ = x.shape
        return x.view(length, batch, -1, self.head_dim).permute(1, 2, 0, 3)

    def _mask(self, attn_mask, key_padding_mask, batch: int, length: int, source: int, dtype):
        """attn_mask ((L, S) or (N * H, L, S)) and key_padding_mask ((N, S)), True or
        -inf where attention is not allowed, as one additive (N, H, L, S) mask."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            mask = mask.view(batch, self.num_heads, length, source) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


def convert(model: nn.Module) -> list[str]:
    """Switches every attention module of ``model`` that has a head-aware version
    (torch.nn.MultiheadAttention -> :class:`MultiheadAttention`, torchvision's Swin
    ``ShiftedWindowAttention`` -> :class:`pyprune_ext.nn.ShiftedWindowAttention`) to
    it, in place (same object, parameters and outputs), so its heads can be observed
    and removed; returns their names. Modules it does not support are left alone."""
    names = []
    for name, module in model.named_modules():
        conversion = conversion_for(type(module))
        if conversion is not None and conversion(module):
            names.append(name)
    return names


def _convert_torch(module: nn.MultiheadAttention) -> bool:
    if unsupported(module) is not None:
        return False
    module.__class__ = MultiheadAttention
    return True


def _convert_swin(module) -> bool:
    from .swin import ShiftedWindowAttention, unsupported as swin_unsupported  # imports torchvision
    if swin_unsupported(module) is not None:
        return False
    ShiftedWindowAttention.convert_in_place(module)
    return True


# The one registry of conversions: exact class -> conversion (module -> whether it was converted).
# Exact classes, not subclasses: a subclass (torchvision's ShiftedWindowAttentionV2) may compute
# something else. Classes of other libraries are keyed by (module, class name) and registered once
# the user has imported that library (pyprune_ext never imports it itself).
_CONVERSIONS: dict[type, Callable[[nn.Module], bool]] = {nn.MultiheadAttention: _convert_torch}
_LIBRARY_CONVERSIONS: dict[tuple[str, str], Callable[[], Callable[[nn.Module], bool]]] = {
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): lambda: _convert_swin,
}


def conversion_for(cls: type) -> Callable[[nn.Module], bool] | None:
    """The conversion registered for modules of exactly class ``cls``, or None."""
    if _LIBRARY_CONVERSIONS:
        register_imported(_LIBRARY_CONVERSIONS, _CONVERSIONS)
    return _CONVERSIONS.get(cls)


def _additive(mask: Tensor, dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def unsupported(module: nn.MultiheadAttention) -> str | None:
    """Why heads of ``module`` cannot be pruned (None when they can)."""
    if not module._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v weights) are not supported"
    if module.bias_k is not None or module.add_zero_attn:
        return "bias_k/bias_v and add_zero_attn are not supported"
    return None
