"""MaskedLinear and MaskedConv2d: drop-in replacements for nn.Linear / nn.Conv2d
whose pruned weights stay exactly zero through training.

How zeros are kept (two mechanisms, both needed):

* The forward pass uses the masked ops, so the gradient of every pruned weight
  is exactly zero.
* Zero gradients are not enough: momentum, Adam moments or weight decay carried
  over from before pruning (or a user writing to the weights) would move pruned
  weights. So every masked module's weight is held by a
  :class:`pyprune_ext.masking.ZeroKeeper`: re-zeroed right after each optimizer
  step (one in-place pass, ``ops.apply_mask_``), and the optimizer's state
  tensors of that weight (momentum buffers, Adam moments) zeroed at pruned
  positions once per mask change and optimizer (``grads_masked``: with zero
  gradients and zeroed weights they then stay zero by themselves; the per-step
  weight re-zeroing covers the rest). The keeper lives as long as the module.

The parameter stays ``weight`` (no ``weight_orig`` / ``weight_mask`` pair) and
the mask is a bool buffer ``mask``: ``state_dict`` keys are ``weight``,
``bias`` and ``mask``.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops
from ..masking import ZeroKeeper
from . import semi_structured

# Density at or below which MaskedLinear uses the sparse path, per device type,
# when it trains (autograd records the call: forward + backward) and in
# inference (forward only), chosen by timing both paths on the 2-core CPU
# (forward and forward+backward of 10x100, 64x128, 100x300 and 300x784 at batch
# 60, 1024x1024 at 64 and 256, 4096x4096 at 64; densities 5-50%). Since the
# sparse kernels work on batch tiles (no whole-matrix transposes), forward+
# backward breaks even at 30-40% density and the forward alone at 40-50%,
# whatever the layer size (even 10x100): no minimum size.
# On CUDA the tiled sparse kernels (csrc/cuda/sparse_masked_linear.cu) have
# not been timed against cuBLAS yet (the GPU check's masked benchmark does), so
# they run only when asked for (module.sparse_threshold = 1.0 forces the sparse
# path, 0.0 forbids it); the CUDA entries are to be set from that measurement.
SPARSE_DENSITY_THRESHOLD = {"cpu": 0.3, "cuda": 0.0}
SPARSE_DENSITY_THRESHOLD_INFERENCE = {"cpu": 0.4, "cuda": 0.0}

# The same for MaskedConv2d, one value for training and inference: the sparse
# backward's break-even on 64->64 3x3 at 56x56 (masked benchmark: 1.6x faster
# at 20%, 0.7x at 50%) is close to the forward's. Forward timings of 64->64 3x3
# on 56x56 (batch 32), 16->16 on 32x32 (64), 3->64 and 64->128 3x3 (60), a 1x1
# 256->64 on 14x14 (32) and 64->64 on 7x7 at batch 1 put it at 20-50% (sparse
# at 30%: 1.3-2.5x faster, except the 7x7 batch-1 layer: 0.8x). 25%, not 20%:
# masks drawn at "20%" land just above 0.2 as often as below, and the sparse
# path is 2x faster there. Strided convolutions (stride-phase split input; the
# backward is torch's on weight * mask) measured forward 1.2-2.9x faster than
# dense-masked at 10-25% on 3x3 stride-2 64->128 (56x56, batch 32), 128->256
# (28x28, 32), 16->32 (32x32, 64) and a 1x1 stride-2 64->128, and forward +
# backward 1.0-1.6x on the 3x3 ones (the 1x1: 1.3x with a real gradient).
# On CUDA the tiled sparse convolution (csrc/cuda/sparse_masked_conv2d.cu) has
# not been timed against cuDNN yet (the GPU check's masked benchmark does): it
# runs only when asked for (sparse_threshold = 1.0), as the CUDA sparse linear.
SPARSE_CONV_DENSITY_THRESHOLD = {"cpu": 0.25, "cuda": 0.0}

_MASKED_LINEAR = torch.ops.pyprune.masked_linear.default
_MASKED_LINEAR_PREZEROED = torch.ops.pyprune.masked_linear_prezeroed.default

# masked module -> the keeper holding its weight's pruned entries at zero. Kept
# beside the module, not in it: the module's lifetime is the keeper's (a dropped
# module's weight, still used by a plain layer after unmask_model, is no longer
# masked), and copies and pickles of the module make their own keeper.
_KEEPERS: "weakref.WeakKeyDictionary[_MaskedMixin, ZeroKeeper]" = weakref.WeakKeyDictionary()


def _refresh_after_load(module, incompatible_keys) -> None:
    module._mask_changed()


class _MaskedMixin:
    """Mask handling shared by the masked layers."""

    weight: nn.Parameter
    mask: Tensor

    def _init_mask(self, mask: Optional[Tensor]) -> None:
        if mask is None:
            mask = torch.ones_like(self.weight, dtype=torch.bool)
        self.register_buffer("mask", self._checked_mask(mask))
        self._sparse_threshold_override: Optional[float] = None
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self._mask_changed()

    def _mask_changed(self) -> None:
        """Zeroes newly pruned weights and refreshes what is derived from the mask:
        the packed form and the path choice (plain Python values, so
        torch.compile needs no data-dependent branch)."""
        self._packed = None
        # (from_dense first builds the module on the meta device: no values yet)
        self._cached_density = 1.0 if self.mask.is_meta else self.density
        self._hold_pruned_at_zero()
        self._choose_path()

    def _hold_pruned_at_zero(self) -> None:
        """Zeroes the pruned weights now and after every optimizer step (see the
        module docs); the mask is shared with the keeper, not copied."""
        keeper = _KEEPERS.get(self)
        if keeper is None:
            keeper = _KEEPERS[self] = ZeroKeeper(grads_masked=True)
        keeper.clear()  # the weight may be another Parameter than last time
        if not self.weight.is_meta:
            keeper.set_mask(self.weight, self.mask, copy=False)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .double(): the mask buffer is replaced
        keeper = _KEEPERS.get(self)
        if keeper is not None:  # its weak reference to the weight would stop torch.utils.swap_tensors
            keeper.clear()
        result = super()._apply(fn, recurse)
        self._hold_pruned_at_zero()
        self._choose_path()
        return result

    @property
    def sparse_threshold(self) -> Optional[float]:
        """Density at or below which the sparse path runs; None (default): the
        measured per-device table; 0 disables it, 1 forces it."""
        return self._sparse_threshold_override

    @sparse_threshold.setter
    def sparse_threshold(self, value: Optional[float]) -> None:
        self._sparse_threshold_override = value
        self._choose_path()

    def _sparse_allowed(self) -> bool:
        """Whether a sparse kernel exists for the weight's device and dtype."""
        device = self.weight.device.type
        if device == "cpu":
            return self.weight.dtype in (torch.float32, torch.float64)  # the CPU kernels' dtypes
        return device in self._SPARSE_DEVICES

    def _choose_path(self) -> None:
        """Decides the path once per mask, device, dtype or threshold change, not per
        call: the decision read per call (device type, dtype, thresholds) cost
        ~5-10 us on a LeNet-size layer, as much as the prune way's extra multiply.
        ``_sparse_path`` holds the choice (training, inference): training when
        autograd records the call. Packs the mask now if either may be sparse, not
        in the first forward: torch.compile cannot trace mask_pack (its output
        sizes depend on the data)."""
        if self.mask.is_meta or not self._sparse_allowed():
            self._sparse_path = (False, False)
            return
        device = self.weight.device.type
        override = self.sparse_threshold
        limits = [override if override is not None else self._threshold_table(training).get(device, 0.0)
                  for training in (True, False)]
        self._sparse_path = tuple(self._cached_density <= limit for limit in limits)
        if any(self._sparse_path):
            self.packed()

    def _checked_mask(self, mask: Tensor) -> Tensor:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{type(self).__name__}: mask must be a tensor, got {type(mask).__name__}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"{type(self).__name__}: mask must have the weight's shape "
                             f"{list(self.weight.shape)}, got {list(mask.shape)}")
        if mask.dtype != torch.bool:
            uniques = torch.unique(mask)
            if not bool(((uniques == 0) | (uniques == 1)).all()):
                raise ValueError(f"{type(self).__name__}: mask must be bool or 0/1, got values {uniques.tolist()[:5]}")
        return mask.to(device=self.weight.device, dtype=torch.bool).clone()

    def set_mask(self, mask: Tensor) -> None:
        """Replaces the mask (e.g. after a pruning level) and zeroes the newly pruned weights."""
        self.mask = self._checked_mask(mask)
        self._mask_changed()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zeroes the pruned weights in place."""
        keeper = _KEEPERS.get(self)
        if keeper is not None and self.weight in keeper:  # it holds exactly this mask (shared)
            keeper.zero_now()  # the same pass, and the keeper then knows the weight is clean
        else:
            ops.apply_mask_(self.weight, self.mask)

    @property
    def density(self) -> float:
        """Fraction of weights kept."""
        return float(self.mask.sum()) / max(self.mask.numel(), 1)

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned."""
        return 1.0 - self.density

    def _weight_zeroed(self) -> bool:
        """Whether the weight is still zero at every pruned position since the
        keeper last zeroed it (after set_mask, apply_mask_ and every optimizer
        step), by version counters: then the dense-masked path can multiply by
        the weight itself, with no masked copy. Not under torch.compile (a
        version counter is not known at trace time)."""
        if torch.compiler.is_compiling():
            return False
        keeper = _KEEPERS.get(self)
        return keeper is not None and keeper.zeroed(self.weight)

    def _use_sparse(self, x: Tensor) -> bool:
        training, inference = self._sparse_path
        if training == inference:  # the usual case: one attribute read per call
            return training
        return training if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad) else inference

    def packed(self) -> ops.PackedMask:
        """The packed mask, built once per mask change (and device move)."""
        if torch.compiler.is_compiling() and self._packed is not None:
            # Built eagerly by set_mask / .to(); a tensor's _version cannot be
            # compared at trace time (it is an unbacked symbol there).
            return self._packed[2]
        if self._packed is None or self._packed[0] is not self.mask or self._packed[1] != self.mask._version:
            self._packed = (self.mask, self.mask._version, ops.mask_pack(self.mask))
        return self._packed[2]

    def _adopt(self, dense: nn.Module, mask: Optional[Tensor]) -> "_MaskedMixin":
        """Takes over a plain layer's Parameter objects (so an optimizer built on
        them keeps working) and its training mode, then applies the mask."""
        self.weight = dense.weight
        self.bias = dense.bias
        self.set_mask(torch.ones_like(dense.weight, dtype=torch.bool) if mask is None else mask)
        self.train(dense.training)
        return self

    def _lend_to(self, plain: nn.Module) -> nn.Module:
        """Gives a plain layer built on the meta device this module's Parameters,
        zeroed at pruned positions first."""
        self.apply_mask_()
        plain.weight, plain.bias = self.weight, self.bias
        plain.train(self.training)
        return plain

    def __setstate__(self, state):  # copy.deepcopy and pickle: keep the new copy re-zeroed too
        super().__setstate__(state)
        if "_sparse_path" not in self.__dict__:  # pickled by a version that chose the path per call
            self._choose_path()
        self._hold_pruned_at_zero()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density:.4f}"


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear computing ``x @ (weight * mask)^T + bias``.

    At or below ``sparse_threshold`` density (default None: the device's entry
    in ``SPARSE_DENSITY_THRESHOLD`` when autograd records the call, in
    ``SPARSE_DENSITY_THRESHOLD_INFERENCE`` when it does not; 0 disables, 1
    forces) it runs the sparse kernels. A 2:4 mask on a GPU with sparse tensor
    cores (float16 / bfloat16) runs the semi-structured path (see
    ``semi_structured``). Otherwise the dense-masked path: torch's own GEMM on
    the weight itself while the weight is known to be zero at its pruned
    positions (since the last zeroing: ``set_mask``, ``apply_mask_``, every
    optimizer step; tracked by version counters, so in-place writes through
    ``weight.data`` are not seen, as autograd does not see them), the
    masking op otherwise.
    """

    _SPARSE_DEVICES = ("cpu", "cuda")
    # Class defaults: modules pickled before the 2:4 path existed load with it off
    # until their next path choice.
    _semi_structured_setting: Optional[bool] = None
    _semi_structured = False
    _compressed = None

    @staticmethod
    def _threshold_table(training: bool) -> Dict[str, float]:
        return SPARSE_DENSITY_THRESHOLD if training else SPARSE_DENSITY_THRESHOLD_INFERENCE

    @property
    def semi_structured(self) -> Optional[bool]:
        """The 2:4 sparse-tensor-core path (:mod:`pyprune_ext.nn.semi_structured`):
        None (default) takes it when the mask is 2:4 and the layer is on a GPU
        that runs it, False never, True requires it (ValueError naming why not)."""
        return self._semi_structured_setting

    @semi_structured.setter
    def semi_structured(self, value: Optional[bool]) -> None:
        if value not in (None, True, False):
            raise ValueError(f"semi_structured must be None, True or False, got {value!r}")
        self._semi_structured_setting = value
        self._choose_path()

    def _choose_path(self) -> None:
        super()._choose_path()
        self._semi_structured, self._compressed = False, None
        setting = self._semi_structured_setting
        if setting is False or self.mask.is_meta:
            return
        reason = semi_structured.unsupported_reason(self.weight, self.mask)
        if reason is None and setting is None and any(self._sparse_path):
            reason = "the sparse path was chosen for this density"
        if reason is None:
            try:  # PyTorch's own shape limits, found by compressing once now
                self._compressed_weight(self._weight_zeroed())
            except (RuntimeError, ValueError) as err:
                reason = f"PyTorch cannot make a semi-structured tensor of it: {err}"
        if reason is not None and setting:
            raise ValueError(f"MaskedLinear({self.in_features}, {self.out_features}): semi_structured=True, "
                             f"but {reason}")
        self._semi_structured = reason is None

    def __getstate__(self):  # copies and pickles compress again when first used
        state = self.__dict__.copy()
        state["_compressed"] = None
        return state

    def _compressed_weight(self, zeroed: bool) -> Tensor:
        """The semi-structured masked weight, compressed again only when the weight
        (or its mask) changed since the last time (version counters)."""
        key = (self.weight._version, self.mask._version, zeroed)
        cached = self._compressed
        if cached is None or cached[0] is not self.weight or cached[1] != key:
            weight = self.weight if zeroed else ops.apply_mask(self.weight.detach(), self.mask)
            cached = self._compressed = (self.weight, key, semi_structured.compress(weight))
        return cached[2]

    def _semi_structured_forward(self, x: Tensor) -> Tensor:
        zeroed = self._weight_zeroed()
        compressed = self._compressed_weight(zeroed)
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return semi_structured.SemiStructuredLinear.apply(x, self.weight, self.mask, self.bias, compressed,
                                                               zeroed)
        return F.linear(x, compressed, self.bias)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mask: Optional[Tensor] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask(mask)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None) -> "MaskedLinear":
        """Wraps an existing nn.Linear, sharing its Parameter objects (an optimizer
        built on the original keeps working) and zeroing its pruned weights."""
        shell = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        return shell._adopt(linear, mask)

    def forward(self, x: Tensor) -> Tensor:
        if self._sparse_path != (False, False) and self._use_sparse(x):
            return ops.sparse_masked_linear(x, self.weight, self.packed(), self.bias)
        if self._semi_structured and not torch.compiler.is_compiling():
            return self._semi_structured_forward(x)
        # The ops themselves, not the ops wrappers: one Python call less per step.
        if self._weight_zeroed():
            return _MASKED_LINEAR_PREZEROED(x, self.weight, self.mask, self.bias)
        return _MASKED_LINEAR(x, self.weight, self.mask, self.bias)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with zeros at pruned positions, sharing this module's
        Parameters (zeroed in place first)."""
        return self._lend_to(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                       device="meta"))


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """nn.Conv2d computing ``conv2d(x, weight * mask, bias, ...)`` (grouped and
    depthwise included).

    At or below ``sparse_threshold`` density (default None: the device's entry
    in ``SPARSE_CONV_DENSITY_THRESHOLD``; 0 disables, 1 forces) it runs the
    sparse convolution (CPU float32/float64, CUDA); otherwise the dense-masked op.
    """

    _SPARSE_DEVICES = ("cpu", "cuda")

    @staticmethod
    def _threshold_table(training: bool) -> Dict[str, float]:
        return SPARSE_CONV_DENSITY_THRESHOLD  # one table for training and inference (see its comment)

    def __init__(self, *args, mask: Optional[Tensor] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask(mask)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[Tensor] = None) -> "MaskedConv2d":
        """Wraps an existing nn.Conv2d, sharing its Parameter objects."""
        shell = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        return shell._adopt(conv, mask)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d does: pad explicitly, then no padding
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        elif isinstance(padding, str):  # 'same' / 'valid': nn.Conv2d worked out the amount per side
            left_w, right_w, top, bottom = self._reversed_padding_repeated_twice
            if left_w == right_w and top == bottom:
                padding = (top, left_w)
            else:  # 'same' with an odd total (kernel 4: 1 + 2): the extra one right / bottom, as torch does
                x = F.pad(x, self._reversed_padding_repeated_twice)
                padding = (0, 0)
        if self._use_sparse(x):
            batched = x if x.dim() == 4 else x.unsqueeze(0)
            y = ops.sparse_masked_conv2d(batched, self.weight, self.packed(), self.bias, self.stride, padding,
                                         self.dilation, self.groups)
            return y if x.dim() == 4 else y.squeeze(0)
        return ops.masked_conv2d(x, self.weight, self.mask, self.bias, self.stride, padding,
                                 self.dilation, self.groups)

    def to_dense(self) -> nn.Conv2d:
        """A plain nn.Conv2d with zeros at pruned positions, sharing this module's Parameters."""
        return self._lend_to(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                       padding=self.padding, dilation=self.dilation, groups=self.groups,
                                       bias=self.bias is not None, padding_mode=self.padding_mode,
                                       device="meta"))


_MASKED_FOR = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def mask_model(model: nn.Module, masks: Dict[str, Tensor]) -> nn.Module:
    """Replaces the named nn.Linear / nn.Conv2d submodules by masked ones, in place.

    ``masks`` maps a submodule name (as in ``model.named_modules()``) to a bool
    mask of its weight's shape. Parameters are shared, not copied, so existing
    optimizers keep working. Already-masked modules get their mask replaced.
    Returns ``model``.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"mask_model: the model has no submodule named {name!r}")
        module = modules[name]
        if isinstance(module, _MaskedMixin):
            module.set_mask(mask)
            continue
        masked_cls = _MASKED_FOR.get(type(module))
        if masked_cls is None:
            raise TypeError(f"mask_model: {name!r} is a {type(module).__name__}; only nn.Linear and "
                            f"nn.Conv2d can be masked")
        _set_submodule(model, name, masked_cls.from_dense(module, mask))
    return model


def unmask_model(model: nn.Module) -> nn.Module:
    """Replaces every masked submodule by its plain equivalent (zeros in place), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _MaskedMixin) and name:
            _set_submodule(model, name, module.to_dense())
    return model


def masked_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The masked submodules of a model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _MaskedMixin)}
