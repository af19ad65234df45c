"""torchvision's Swin window attention, with heads that can be removed.

torchvision's ``ShiftedWindowAttention`` (Swin v1: ``swin_t``, ``swin_s``,
``swin_b``) hands its weights to the function ``shifted_window_attention``,
which takes the head width as ``C // num_heads`` from the width ``C`` of the
stream it reads, and computes the q/k/v and output projections as functions. So
a module that lost a head (or whose stream lost width) computes something else,
or fails, and no Taylor gate can observe a head where it enters ``proj``.
:class:`ShiftedWindowAttention` is the same module (a subclass: same parameters,
buffers and state-dict keys, so torchvision checkpoints load) with ``head_dim``
fixed when it is built or converted, whose forward computes what torchvision's
computes, lets ``num_heads * head_dim`` differ from the stream width, and calls
``self.qkv`` and ``self.proj`` as modules.

This module imports torchvision; ``pyprune_ext.nn.ShiftedWindowAttention``
loads it on first use. ``ShiftedWindowAttentionV2`` (Swin v2: a per-head
``logit_scale`` and a ``cpb_mlp`` computing the bias) is not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import swin_transformer as tv_swin

from .attention import checked_head_dim

__all__ = ["ShiftedWindowAttention", "unsupported"]


class ShiftedWindowAttention(tv_swin.ShiftedWindowAttention):
    """Window attention (shifted or not) with ``num_heads`` heads of ``head_dim``
    on an (N, H, W, dim) input; ``head_dim`` defaults to ``dim // num_heads``,
    torchvision's."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0, head_dim: int | None = None):
        super().__init__(dim, window_size, shift_size, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                         attention_dropout=attention_dropout, dropout=dropout)
        self.head_dim = head_dim = checked_head_dim(dim, num_heads, head_dim, "dim")
        if head_dim * num_heads != dim:  # the projections around heads that do not fill the stream
            self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
            self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)

    @classmethod
    def from_torchvision(cls, module: tv_swin.ShiftedWindowAttention) -> "ShiftedWindowAttention":
        """The same attention as a new module, sharing ``module``'s parameters,
        buffers, children and training mode (``module`` is left as it is)."""
        problem = unsupported(module)
        if problem:
            raise ValueError(f"ShiftedWindowAttention.from_torchvision: {problem}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("window_size", "shift_size", "num_heads", "attention_dropout", "dropout"):
            setattr(new, attr, getattr(module, attr))
        for name, tensor in module._parameters.items():
            new.register_parameter(name, tensor)
        for name, tensor in module._buffers.items():
            new.register_buffer(name, tensor, persistent=name not in module._non_persistent_buffers_set)
        for name, child in module._modules.items():
            new.add_module(name, child)
        new.head_dim = torchvision_head_dim(module)
        new.train(module.training)
        return new

    @classmethod
    def convert_in_place(cls, module: tv_swin.ShiftedWindowAttention) -> None:
        """Turns torchvision's ``module`` into this class (same object, parameters and
        outputs), fixing ``head_dim`` at torchvision's ``dim // num_heads``."""
        problem = unsupported(module)
        if problem:
            raise ValueError(f"ShiftedWindowAttention.convert_in_place: {problem}")
        module.head_dim = torchvision_head_dim(module)
        module.__class__ = cls

    @property
    def inner_dim(self) -> int:
        """Width of the heads together: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        """torchvision's ``shifted_window_attention`` step by step (same ops in the same
        order: float64-equal), with ``head_dim`` for the head width, the heads'
        width (``inner_dim``) between the projections, and ``proj``'s output width
        after them."""
        batch, height, width, _ = x.shape
        window, shift = self.window_size, list(self.shift_size)
        # pad feature maps to multiples of the window
        pad_r = (window[1] - width % window[1]) % window[1]
        pad_b = (window[0] - height % window[0]) % window[0]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, pad_h, pad_w, channels = x.shape
        if window[0] >= pad_h:  # a window as large as the map: no shift
            shift[0] = 0
        if window[1] >= pad_w:
            shift[1] = 0
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        # partition windows: (B * nW, Wh * Ww, C)
        num_windows = (pad_h // window[0]) * (pad_w // window[1])
        x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * num_windows, window[0] * window[1], channels)
        windows, tokens = x.size(0), x.size(1)

        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.head_dim ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
        attn = attn + self.get_relative_position_bias()
        if shifted:
            mask = _shift_mask(x, pad_h, pad_w, window, shift, num_windows)
            attn = attn.view(windows // num_windows, num_windows, self.num_heads, tokens, tokens)
            attn = attn + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = F.softmax(attn, dim=-1)
        attn = F.dropout(attn, p=self.attention_dropout, training=self.training)

        # a head's Taylor gate is a pre-hook on proj: its input holds the heads side by side
        x = self.proj(attn.matmul(v).transpose(1, 2).reshape(windows, tokens, self.inner_dim))
        x = F.dropout(x, p=self.dropout, training=self.training)
        out = x.size(-1)
        # reverse windows, the shift and the padding
        x = x.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], out)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, out)
        if shifted:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


def _shift_mask(x: Tensor, pad_h: int, pad_w: int, window, shift, num_windows: int) -> Tensor:
    """torchvision's attention mask of shifted windows: -100 between tokens that came
    from different regions of the rolled map, (nW, Wh * Ww, Wh * Ww)."""
    mask = x.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


def torchvision_head_dim(module: tv_swin.ShiftedWindowAttention) -> int:
    """The head width torchvision's forward uses: the stream width over the head count."""
    return module.qkv.in_features // module.num_heads


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot become a :class:`ShiftedWindowAttention` (None when it can)."""
    if isinstance(module, tv_swin.ShiftedWindowAttentionV2):
        return (f"{type(module).__name__} (Swin v2) is not supported: its per-head logit_scale and the "
                "cpb_mlp computing its position bias would have to lose heads too, and torchvision's forward "
                "takes the head width from the width it reads; Swin v1's ShiftedWindowAttention (swin_t/s/b) "
                "is supported")
    if isinstance(module, ShiftedWindowAttention):
        return None
    dim, heads = module.qkv.in_features, module.num_heads
    if dim % heads or module.qkv.out_features != 3 * dim or module.proj.in_features != dim:
        return (f"torchvision's ShiftedWindowAttention needs qkv {dim} -> {3 * dim} and proj {dim} -> ... "
                f"with {heads} heads dividing {dim}; got qkv {dim} -> {module.qkv.out_features}, "
                f"proj {module.proj.in_features} -> {module.proj.out_features}")
    return None
