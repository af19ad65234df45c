"""Layer specs: everything the library knows about one layer type, in one place.

A :class:`LayerSpec` says, for the modules of one type,

* which **axes** can lose channels, under a *role* name, and which of the
  module's tensors each axis indexes (``axes``): the analysis attaches
  channels to these axes, surgery slices these tensors, masking zeroes the
  ``zeroed`` ones, the cost estimate shrinks them;
* how the module **couples channels** in the dependency analysis (``analyse``);
* how to **update its size attributes** after surgery (``resize``);
* its **cost** (``features``, ``macs``);
* how a Taylor gate hook **recomputes its output** (``recompute``) and how many
  output channels it has (``output_channels``).

Roles: ``"out"`` (channels the layer produces: a Conv's output channels),
``"in"`` (channels it consumes), ``"depthwise"`` (a depthwise conv: input and
output channels are the same channels), ``"norm"`` (a normalisation's
per-channel parameters and statistics) and ``"channel"`` (other per-channel
parameters that follow the channels, e.g. PReLU's). ``ROLES`` says what each
means to the rest of the library.

The registry maps module classes to specs. :func:`register_layer` adds a
user's layer (or replaces a built-in); :func:`spec_for` finds a module's spec
along its class's MRO. A subclass of a registered class that overrides
``forward`` (and is not from torch or pyprune_ext) is not covered by its
base's spec, since it may compute something else: the analysis traces into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .._library import register_imported
from .layouts import Tracked, Untracked
from .norm_patterns import RMSNormPattern, match_rms_norm
from .optable import get_arg

if TYPE_CHECKING:  # only for annotations: the analysis calls the specs, not the other way round
    from .analysis import Analyzer

__all__ = ["ROLES", "Axis", "Role", "LayerSpec", "ConvSpec", "ConvTransposeSpec", "LinearSpec",
           "TransposedLinearSpec", "MultiheadAttentionSpec", "ShiftedWindowAttentionSpec",
           "ShiftedWindowAttentionV2Spec", "ChannelsFirstLayerNormSpec", "WeightRMSNormSpec",
           "RecognizedRMSNormSpec",
           "TensorAttributeSpec", "member_layer",
           "BatchNormSpec", "LayerNormSpec", "GroupNormSpec", "EmbeddingSpec", "ChannelwiseSpec", "PReLUSpec",
           "register_layer", "unregister_layer", "spec_for", "registered_layers"]


@dataclass(frozen=True)
class Role:
    """What a role means outside the spec: ``produces`` (the layer computes these
    channels: a Taylor gate point, the group's name), ``zeroes`` (masking the
    channels zeroes this axis's tensors; consumers need no change since they
    only ever see zeros), ``order`` (members are listed in this order)."""

    produces: bool
    zeroes: bool
    order: int


ROLES: dict[str, Role] = {
    "out": Role(produces=True, zeroes=True, order=0),
    "heads": Role(produces=True, zeroes=True, order=1),  # attention heads inside a layer (q/k/v rows)
    "depthwise": Role(produces=True, zeroes=True, order=1),
    "norm": Role(produces=False, zeroes=True, order=2),
    "channel": Role(produces=False, zeroes=False, order=3),
    # a parameter or buffer the model reads directly (``Member.name`` is its qualified name)
    "tensor": Role(produces=False, zeroes=True, order=3),
    "in": Role(produces=False, zeroes=False, order=4),
}


@dataclass(frozen=True)
class Axis:
    """One axis of a layer that can lose channels: its ``length`` and the
    module tensors (parameters and buffers, by name) it indexes, with the dim.
    ``in_feature`` / ``out_feature``: whether removing positions here lowers the
    layer's input / output channel count in cost tables."""

    length: int
    tensors: Mapping[str, int] = field(default_factory=dict)
    in_feature: bool = False
    out_feature: bool = False
    # tensors holding several equal blocks of the axis along their dim (a packed q/k/v weight: 3)
    blocks: Mapping[str, int] = field(default_factory=dict)

    def index(self, tensor: str, positions: Tensor) -> Tensor:
        """Where ``positions`` of the axis sit along ``tensor``'s dim: in every block."""
        blocks = self.blocks.get(tensor, 1)
        if blocks == 1:
            return positions
        return torch.cat([positions + k * self.length for k in range(blocks)])


def _present(module: nn.Module, dims: Mapping[str, int]) -> dict[str, int]:
    """``dims`` restricted to the tensors the module really holds (no bias, no affine...)."""
    return {name: d for name, d in dims.items()
            if module._parameters.get(name) is not None or module._buffers.get(name) is not None}


class LayerSpec:
    """Base class of layer specs. Subclasses implement ``axes``, ``analyse`` and
    ``resize``; the rest has defaults that fit most layers.

    ``cost``: whether :func:`pyprune_ext.cost.count_cost` lists the layer (it
    then needs ``features`` and ``macs``). ``ticket_weights``: the parameters
    lottery-ticket pruning prunes by default. ``gate_after``: see below.
    """

    cost: bool = True
    ticket_weights: tuple[str, ...] = ()
    # masking zeroes the axis's buffers too (not a layer's running statistics, which are left alone)
    zeroes_buffers: bool = False
    # a per-channel affine normalisation on dim 1 (y = gamma * xhat + beta): directly after a
    # producer, its output is the Taylor gate, and gamma/beta gradients give the gate's (fo_bn)
    gate_after: bool = False
    # tensors of the module that no axis indexes and surgery keeps as they are (a table of
    # positions, independent of the channels)
    unchanged_tensors: tuple[str, ...] = ()

    # -- structure ----------------------------------------------------------------------
    def axes(self, module: nn.Module) -> dict[str, Axis]:
        raise NotImplementedError(f"{type(self).__name__}.axes is not implemented")

    def analyse(self, an: "Analyzer", node, name: str, module: nn.Module, x, meta):
        """Attaches the module's axes to channel elements (``an.elements.attach``),
        couples or blocks them, and returns the output's layout."""
        raise NotImplementedError(f"{type(self).__name__}.analyse is not implemented")

    def resize(self, module: nn.Module, lengths: Mapping[str, int]) -> None:
        """Updates the size attributes after surgery: ``lengths`` holds the new
        length of every axis that changed."""
        raise NotImplementedError(f"{type(self).__name__}.resize is not implemented")

    # -- state the generic surgery cannot shrink ----------------------------------------------
    def unsupported_state(self, name: str, module: nn.Module) -> str | None:
        """Why this module's tensors cannot be shrunk, or None. Tensors shaped
        like the weight (MaskedConv2d's mask) are sliced with it."""
        if parametrize.is_parametrized(module):
            return f"{name} is parametrized (torch.nn.utils.parametrize); its weight cannot be shrunk"
        known = ({t for axis in self.axes(module).values() for t in axis.tensors} | {"num_batches_tracked"}
                 | set(self.unchanged_tensors))
        weight = module._parameters.get("weight")
        shape = tuple(weight.shape) if weight is not None else None
        extras = [n for n, t in chain(module._parameters.items(), module._buffers.items())
                  if n not in known and t is not None and tuple(t.shape) != shape]
        if extras:
            return (f"{name} ({type(module).__name__}) holds tensors that cannot be shrunk with it: "
                    f"{', '.join(extras)}")
        return None

    def tensor_dims(self, module: nn.Module, role: str, tensor: str) -> int | None:
        """The dim of ``tensor`` that axis ``role`` indexes (weight-shaped extra
        tensors follow the weight), or None."""
        axis = self.axes(module).get(role)
        if axis is None:
            return None
        if tensor in axis.tensors:
            return axis.tensors[tensor]
        weight = module._parameters.get("weight")
        t = module._parameters.get(tensor, module._buffers.get(tensor))
        if weight is not None and t is not None and tensor != "weight" and t.shape == weight.shape:
            return axis.tensors.get("weight")
        return None

    def entries(self, module: nn.Module, role: str, positions: Tensor) -> list[tuple[str, Tensor, int, Tensor]]:
        """(name, tensor, dim, index) of every tensor axis ``role`` indexes: ``positions``
        of the axis are ``index`` along ``dim`` (several blocks: see ``Axis.blocks``)."""
        axis = self.axes(module)[role]
        out = []
        for name, dim in axis.tensors.items():
            t = module._parameters.get(name, module._buffers.get(name))
            if t is not None:
                out.append((name, t, dim, axis.index(name, positions)))
        return out

    # -- cost ---------------------------------------------------------------------------------
    def features(self, module: nn.Module) -> tuple[int, int]:
        """(input, output) channels for cost tables."""
        axes = self.axes(module)
        ins = [a.length for a in axes.values() if a.in_feature]
        outs = [a.length for a in axes.values() if a.out_feature]
        return (ins[0] if ins else 0), (outs[0] if outs else 0)

    # the tensor whose size the layer's MACs are proportional to (the cost estimate scales by it)
    macs_tensor: str = "weight"

    def macs(self, module: nn.Module, inp: Tensor, out: Tensor, norm_macs: bool) -> int:
        """Multiply-accumulates of one call over the whole batch."""
        return 0

    def child_macs(self, module: nn.Module, inp: Tensor, out: Tensor) -> dict[str, int]:
        """MACs the call did in a child layer's place (its weights used as a function):
        child name -> MACs, counted on the child's row."""
        return {}

    def shrunk_numel(self, module: nn.Module, tensor: str, removed: Mapping[str, int]) -> int:
        """Elements of ``tensor`` once ``removed[role]`` positions left each axis."""
        t = module._parameters.get(tensor, module._buffers.get(tensor))
        shape = list(t.shape)
        axes = self.axes(module)
        for role, count in removed.items():
            d = self.tensor_dims(module, role, tensor)
            if d is not None:
                shape[d] -= count * (axes[role].blocks.get(tensor, 1) if role in axes else 1)
        return math.prod(shape)

    # -- Taylor gates ---------------------------------------------------------------------------
    def output_channels(self, module: nn.Module) -> int:
        """Channels of the module's output (the length of its producing axis)."""
        for role, axis in self.axes(module).items():
            if ROLES[role].produces or role == "norm":
                return axis.length
        raise TypeError(f"{type(module).__name__} produces no channels")

    def recompute(self, module: nn.Module, inputs: tuple) -> Tensor:
        """The module's output again from its inputs, without changing its state."""
        return module(*inputs)


class TensorAttributeSpec(LayerSpec):
    """A parameter or buffer the model reads directly (``layer_scale * x``,
    ``x + position``), as a member: the tensor ``attr`` of its owner module,
    ``dim`` following the channels. Built per member by :func:`member_layer`;
    surgery replaces the tensor in place (the owner stays)."""

    cost = False
    zeroes_buffers = True  # a buffer added in (a fixed position encoding) is zeroed like a parameter

    def __init__(self, attr: str, dim: int):
        self.attr, self.dim = attr, dim

    def axes(self, module):
        tensor = module._parameters.get(self.attr, module._buffers.get(self.attr))
        return {"tensor": Axis(tensor.shape[self.dim], {self.attr: self.dim})}

    def resize(self, module, lengths):
        pass


def member_layer(modules, member) -> tuple[nn.Module, "LayerSpec"]:
    """(module, spec) that a group member's axis belongs to: the module and its
    registered spec, or for a ``"tensor"`` member its owner and a
    :class:`TensorAttributeSpec`. ``modules``: the model or a name -> module mapping."""
    get = modules.__getitem__ if isinstance(modules, Mapping) else modules.get_submodule
    if member.role == "tensor":
        owner, _, attr = member.name.rpartition(".")
        return get(owner), TensorAttributeSpec(attr, member.dim)
    module = get(member.name)
    return module, spec_for(module)


# -- the registry ---------------------------------------------------------------------------------
_REGISTRY: dict[type, LayerSpec] = {}


def register_layer(cls: type, spec: LayerSpec, *, replace: bool = False) -> None:
    """Declares what layer class ``cls`` is to the library (analysis, surgery,
    masking, costs, Taylor gates). Subclasses of ``cls`` are covered too unless
    they override ``forward``. A class already registered needs ``replace=True``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer: expected an nn.Module subclass, got {cls!r}")
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_layer: the spec must be a LayerSpec instance, got {type(spec).__name__}")
    if cls in _REGISTRY and not replace:
        raise ValueError(f"register_layer: {cls.__qualname__} is already registered "
                         f"({type(_REGISTRY[cls]).__name__}); pass replace=True to replace it")
    _REGISTRY[cls] = spec


def unregister_layer(cls: type) -> LayerSpec:
    """Removes ``cls`` from the registry (a user's layer, or a built-in to make the
    analysis treat that layer as unknown) and returns its spec."""
    if cls not in _REGISTRY:
        raise KeyError(f"unregister_layer: {getattr(cls, '__qualname__', cls)!r} is not registered")
    return _REGISTRY.pop(cls)


def registered_layers() -> dict[type, LayerSpec]:
    """A copy of the registry: layer class -> spec."""
    return dict(_REGISTRY)


def _trusted_subclass(module: nn.Module, base: type) -> bool:
    """Whether ``module`` computes what ``base`` computes: torch's own subclasses
    (SyncBatchNorm, lazy layers) and pyprune_ext's masked layers do; a user
    subclass that overrides forward (e.g. a LayerNorm2d permuting NCHW) may not."""
    cls = type(module)
    if cls is base or cls.__module__.startswith(("torch.", "pyprune_ext.")):
        return True
    return cls.forward is base.forward


# layers of other libraries: (module, class name) -> spec factory, registered once the user has
# imported that library (pyprune_ext never imports it)
_LIBRARY_LAYERS: dict[tuple[str, str], object] = {
    ("transformers.pytorch_utils", "Conv1D"): lambda: TransposedLinearSpec(),
    ("torchvision.models.convnext", "LayerNorm2d"): lambda: ChannelsFirstLayerNormSpec(),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): lambda: ShiftedWindowAttentionSpec(),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"): lambda: ShiftedWindowAttentionV2Spec(),
    **{(f"transformers.models.{family}.modeling_{family}", f"{prefix}RMSNorm"): lambda: WeightRMSNormSpec()
       for family, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"), ("qwen3", "Qwen3"))},
}


def spec_for(module: nn.Module, extra: Mapping[type, LayerSpec] | None = None, *,
             any_subclass: bool = False) -> LayerSpec | None:
    """The spec of ``module``'s class (``extra`` first, then the registry), or
    None. ``any_subclass``: also for subclasses that override ``forward``
    (enough for counting parameters and MACs, not for pruning). A module of no
    registered class whose forward is an RMSNorm (``graph.norm_patterns``) is
    one."""
    if _LIBRARY_LAYERS:
        register_imported(_LIBRARY_LAYERS, _REGISTRY)
    for base in type(module).__mro__:
        spec = (extra or {}).get(base) or _REGISTRY.get(base)
        if spec is not None:
            return spec if any_subclass or _trusted_subclass(module, base) else None
    pattern = match_rms_norm(module)
    return RecognizedRMSNormSpec(pattern) if pattern is not None else None


# -- shared analysis steps ------------------------------------------------------------------------
def _blocks(ids: np.ndarray, width: int) -> list[np.ndarray]:
    return [ids[k:k + width] for k in range(0, len(ids), width)]


def couple_blocks(an: "Analyzer", ids: np.ndarray, width: int) -> None:
    """Makes every aligned block of ``width`` channels one pruning unit."""
    if width > 1:
        for block in _blocks(ids, width):
            an.elements.union_arrays(np.full(len(block) - 1, block[0]), block[1:])


def couple_whole_groups(an: "Analyzer", in_ids: np.ndarray, out_ids: np.ndarray, groups: int) -> None:
    """A grouped layer loses whole groups: group j's input and output channels
    become one pruning unit."""
    for a, b in zip(_blocks(in_ids, len(in_ids) // groups), _blocks(out_ids, len(out_ids) // groups)):
        unit = np.concatenate([a, b])
        an.elements.union_arrays(np.full(len(unit) - 1, unit[0]), unit[1:])


def follow_channels(an: "Analyzer", name: str, role: str, x, meta, dim: int, inexact: str | None = None):
    """A layer that keeps its input's channels on ``dim``: its axis ``role`` carries
    them, the output has them on the same dim; ``inexact``: why masking them is
    not removal (a zeroed channel does not stay zero)."""
    ids = an.channels_in(x, dim, name)
    an.elements.attach(name, role, ids)
    if inexact:
        an.elements.mark_inexact(ids, inexact)
    return an.tracked_like(meta, dim, ids)


# -- convolutions ---------------------------------------------------------------------------------
class ConvSpec(LayerSpec):
    """Conv1d/2d/3d (and MaskedConv2d). groups == 1: output channels (weight dim
    0, bias) and input channels (weight dim 1). Depthwise (groups == in ==
    out): one axis, input and output channels together. Other grouped convs
    lose whole groups: group j's input and output channels are one unit
    (weight rows and bias; the per-group input width and ``groups`` follow)."""

    ticket_weights = ("weight",)
    # which weight dim holds the output / input channels (ConvTranspose swaps them)
    out_dim, in_dim = 0, 1

    @staticmethod
    def is_depthwise(module) -> bool:
        return module.groups > 1 and module.groups == module.in_channels == module.out_channels

    def axes(self, module):
        if self.is_depthwise(module):
            return {"depthwise": Axis(module.out_channels, _present(module, {"weight": 0, "bias": 0}),
                                      in_feature=True, out_feature=True)}
        grouped = module.groups > 1
        out = {"bias": 0} if grouped and self.out_dim else {"weight": self.out_dim, "bias": 0}
        inp = {} if grouped and self.in_dim == 1 else {"weight": self.in_dim}  # dim 1 holds in / groups
        return {"out": Axis(module.out_channels, _present(module, out), out_feature=True),
                "in": Axis(module.in_channels, _present(module, inp), in_feature=True)}

    def analyse(self, an, node, name, module, x, meta):
        cd = len(x.shape) - len(module.kernel_size) - 1  # 1 for batched input, 0 for unbatched
        in_ids = an.channels_in(x, cd, name)
        if self.is_depthwise(module):
            an.elements.attach(name, "depthwise", in_ids)
            an.note_gate(name, node, cd)
            return Tracked(cd, in_ids, meta.shape)
        an.elements.attach(name, "in", in_ids)
        out_ids = an.produce(name, module.out_channels, node, cd)
        if module.groups > 1:
            couple_whole_groups(an, in_ids, out_ids, module.groups)
        return Tracked(cd, out_ids, meta.shape)

    def resize(self, module, lengths):
        if "depthwise" in lengths:
            module.in_channels = module.out_channels = module.groups = lengths["depthwise"]
            return
        if module.groups > 1 and "in" in lengths:  # whole groups left
            module.groups = lengths["in"] // (module.in_channels // module.groups)
        module.out_channels = lengths.get("out", module.out_channels)
        module.in_channels = lengths.get("in", module.in_channels)

    def macs(self, module, inp, out, norm_macs):
        return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


class ConvTransposeSpec(ConvSpec):
    """ConvTranspose1d/2d/3d: the weight is (in, out / groups, ...)."""

    out_dim, in_dim = 1, 0

    def macs(self, module, inp, out, norm_macs):
        # each input element is scattered into a kernel window of every output channel of its group
        return inp.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)


# -- linear and embedding ---------------------------------------------------------------------------
class LinearSpec(LayerSpec):
    """nn.Linear (and MaskedLinear): output features (weight dim 0, bias), input
    features (weight dim 1), both on the input's last dim."""

    ticket_weights = ("weight",)
    # the size attributes and the weight dims of the output / input features
    out_attr, in_attr, out_dim, in_dim = "out_features", "in_features", 0, 1

    def axes(self, module):
        return {"out": Axis(getattr(module, self.out_attr), _present(module, {"weight": self.out_dim, "bias": 0}),
                            out_feature=True),
                "in": Axis(getattr(module, self.in_attr), {"weight": self.in_dim}, in_feature=True)}

    def analyse(self, an, node, name, module, x, meta):
        an.elements.attach(name, "in", an.channels_in(x, len(x.shape) - 1, name))
        out_ids = an.produce(name, getattr(module, self.out_attr), node, -1)
        return Tracked(len(meta.shape) - 1, out_ids, meta.shape)

    def resize(self, module, lengths):
        for role, attr in (("out", self.out_attr), ("in", self.in_attr)):
            setattr(module, attr, lengths.get(role, getattr(module, attr)))

    def macs(self, module, inp, out, norm_macs):
        return out.numel() * getattr(module, self.in_attr)


class TransposedLinearSpec(LinearSpec):
    """A linear layer storing its weight as (in, out): Hugging Face's ``Conv1D``
    (GPT-2), with ``nf`` output and ``nx`` input features."""

    out_attr, in_attr, out_dim, in_dim = "nf", "nx", 1, 0


class EmbeddingSpec(LayerSpec):
    """nn.Embedding: produces ``embedding_dim`` channels (weight dim 1) on its
    output's last dim; its input holds indices, not channels."""

    def axes(self, module):
        return {"out": Axis(module.embedding_dim, {"weight": 1}, out_feature=True)}

    def analyse(self, an, node, name, module, x, meta):
        if isinstance(x, Tracked):
            an.elements.block(x.ids, f"{name} (Embedding) takes them as indices")
        out_ids = an.produce(name, module.embedding_dim, node, -1)
        return Tracked(len(meta.shape) - 1, out_ids, meta.shape)

    def resize(self, module, lengths):
        module.embedding_dim = lengths.get("out", module.embedding_dim)

    def features(self, module):
        return module.num_embeddings, module.embedding_dim


class MultiheadAttentionSpec(LayerSpec):
    """nn.MultiheadAttention (and pyprune_ext.nn.MultiheadAttention), packed q/k/v:
    ``"in"``, the input width (``in_proj_weight`` dim 1), and ``"heads"``, its
    heads of ``head_dim`` (``in_proj_weight`` / ``in_proj_bias`` rows, in each of
    the q, k and v blocks). The output projection is its own Linear member
    (``<name>.out_proj``: the heads are its inputs, the output width its
    outputs). A module that loses heads becomes a pyprune_ext.nn.MultiheadAttention,
    whose heads need not fill ``embed_dim``; its forward calls ``out_proj`` as a
    module, where a head's Taylor gate observes it."""

    def axes(self, module):
        inner = module.in_proj_weight.shape[0] // 3
        return {"in": Axis(module.embed_dim, {"in_proj_weight": 1}, in_feature=True),
                "heads": Axis(inner, _present(module, {"in_proj_weight": 0, "in_proj_bias": 0}), out_feature=True,
                              blocks={"in_proj_weight": 3, "in_proj_bias": 3})}

    def unsupported_state(self, name, module):
        from ..nn.attention import unsupported
        problem = unsupported(module)
        return f"{name}: {problem}" if problem else super().unsupported_state(name, module)

    def analyse(self, an, node, name, module, x, meta):
        args, kwargs = an.resolve(node.args), an.resolve(node.kwargs)
        inputs = [get_arg(args, kwargs, i, (n,)) for i, n in enumerate(("query", "key", "value"))]
        for t in inputs:  # q, k and v are projected by the same columns: one input width
            if isinstance(t, (Tracked, Untracked)):
                an.elements.attach(name, "in", an.channels_in(t, len(t.shape) - 1, name))
        heads = an.elements.new(self.axes(module)["heads"].length)
        couple_blocks(an, heads, module.head_dim)
        out_proj = f"{name}.out_proj"
        an.first_seen.setdefault(out_proj, len(an.first_seen))
        an.elements.attach(name, "heads", heads)
        an.elements.attach(out_proj, "in", heads)
        an.elements.mark_attention(heads)
        an.input_dim.setdefault(out_proj, -1)
        self._check_heads(an, node, name, heads, args, kwargs)
        out_meta, weights_meta = meta
        out = Tracked(len(out_meta.shape) - 1, an.produce(out_proj, module.embed_dim, node, -1), out_meta.shape)
        return out, an.untracked_like(weights_meta, f"comes from the attention weights of {name}")

    @staticmethod
    def _check_heads(an, node, name, heads, args, kwargs):
        """A mask per head fixes the head count; attention weights read after the call
        are averaged over (or returned per) head: removing heads changes them."""
        mask = get_arg(args, kwargs, 5, ("attn_mask",))
        if isinstance(mask, (Tracked, Untracked)) and len(mask.shape) == 3:
            an.elements.block(heads, f"{name} has an attention mask with one slice per head")
        weights_read = any(user.args[1] == 1 and user.users for user in node.users
                           if user.op == "call_function" and len(user.args) > 1)
        if get_arg(args, kwargs, 4, ("need_weights",), True) and weights_read:
            if get_arg(args, kwargs, 6, ("average_attn_weights",), True):
                an.elements.mark_inexact(heads, f"{name}'s attention weights (averaged over heads) are used")
            else:
                an.elements.block(heads, f"{name} returns attention weights per head, and they are used")

    def resize(self, module, lengths):
        from ..nn.attention import MultiheadAttention
        module.embed_dim = module.kdim = module.vdim = lengths.get("in", module.embed_dim)
        if "heads" in lengths:
            module.num_heads = lengths["heads"] // module.head_dim
        # torch's class needs num_heads * head_dim == embed_dim: the copy becomes ours (same
        # attributes and parameters, a forward that does not need it)
        module.__class__ = MultiheadAttention

    macs_tensor = "in_proj_weight"

    def macs(self, module, inp, out, norm_macs):
        """The q/k/v projections, for self-attention (keys as many as queries); the
        attention products are not counted, as for hand-written attention."""
        tokens = inp.numel() // inp.shape[-1]
        return tokens * module.in_proj_weight.shape[0] * module.embed_dim

    def child_macs(self, module, inp, out):
        """torch's forward runs the output projection as a function: its MACs go on
        out_proj's row, where pyprune_ext's (which calls it as a module) has them too."""
        functional = (type(module).forward is nn.MultiheadAttention.forward
                      or getattr(module, "uses_torch_forward", lambda: False)())
        if not functional:
            return {}
        tokens = inp.numel() // inp.shape[-1]
        return {"out_proj": tokens * module.out_proj.in_features * module.out_proj.out_features}


class ShiftedWindowAttentionSpec(LayerSpec):
    """torchvision's Swin window attention (``ShiftedWindowAttention``, and
    pyprune_ext.nn.ShiftedWindowAttention): ``"in"``, the stream width it reads (no
    tensors of its own: ``qkv``'s columns are that member's), and ``"heads"``, one
    position per head, indexing the head's column of ``relative_position_bias_table``.

    A known layer the analysis does not trace into, as MultiheadAttentionSpec, rather
    than a forward it follows: the forward pads, rolls and masks the windows by
    Python decisions on the map's size (which torch.fx cannot trace symbolically),
    and its position bias gathers the table with an index tensor (which the rules
    for tensors read directly refuse). What the code does to a head is stated here,
    once: a head's q, k and v rows of ``qkv`` (packed as q | k | v, ``head_dim``
    rows each), its ``head_dim`` input columns of ``proj`` and its column of the
    bias table go together; ``qkv`` and ``proj`` are their own Linear members, and
    a head is gated where it enters ``proj``. Masking a head is exact: its scores
    are its bias (zeroed) plus the shift mask, and its zero V makes its output zero.

    torchvision's forward takes the head width as stream width // heads, so a module
    that loses heads or width becomes a pyprune_ext.nn.ShiftedWindowAttention
    (``head_dim`` fixed, projections called as modules)."""

    # the table's relative positions do not depend on the heads or the width
    unchanged_tensors = ("relative_position_index",)
    heads_tensors: Mapping[str, int] = {"relative_position_bias_table": 1}

    def axes(self, module):
        return {"in": Axis(module.qkv.in_features, {}, in_feature=True),
                "heads": Axis(module.num_heads, _present(module, self.heads_tensors), out_feature=True)}

    def unsupported_state(self, name, module):
        from ..nn.swin import unsupported
        problem = unsupported(module)
        return f"{name}: {problem}" if problem else super().unsupported_state(name, module)

    def analyse(self, an, node, name, module, x, meta):
        qkv, proj = f"{name}.qkv", f"{name}.proj"
        heads, head_dim = module.num_heads, module.qkv.out_features // (3 * module.num_heads)
        for child in (qkv, proj):
            an.first_seen.setdefault(child, len(an.first_seen))
        stream = an.channels_in(x, len(x.shape) - 1, qkv)
        an.elements.attach(name, "in", stream)
        an.elements.attach(qkv, "in", stream)
        rows = an.elements.new(3 * heads * head_dim)  # q | k | v
        an.elements.attach(qkv, "out", rows)
        q, k, v = np.split(rows, 3)
        an.elements.union_arrays(q, k)
        an.elements.union_arrays(q, v)
        couple_blocks(an, q, head_dim)
        table = an.elements.new(heads)
        an.elements.union_arrays(table, q[::head_dim])
        an.elements.attach(name, "heads", table)
        an.elements.attach(proj, "in", q)
        an.input_dim.setdefault(proj, -1)
        an.elements.mark_attention(q)
        return Tracked(len(meta.shape) - 1, an.produce(proj, module.proj.out_features, node, -1), meta.shape)

    def resize(self, module, lengths):
        from ..nn.swin import ShiftedWindowAttention, torchvision_head_dim
        if not isinstance(module, ShiftedWindowAttention):
            # torchvision's forward needs heads * head_dim == the stream width: the copy becomes
            # ours. remove_channels rebuilds a module before its children, so qkv is as torchvision
            # built it here and gives torchvision's head width.
            module.head_dim = torchvision_head_dim(module)
            module.__class__ = ShiftedWindowAttention
        module.num_heads = lengths.get("heads", module.num_heads)

    def macs(self, module, inp, out, norm_macs):
        return 0  # the attention products, not counted (as for hand-written attention)

    def child_macs(self, module, inp, out):
        """torchvision's forward runs qkv and proj as functions (on the padded map): their
        MACs go on their rows, where pyprune_ext's forward (which calls them) has them too."""
        from ..nn.swin import ShiftedWindowAttention
        if isinstance(module, ShiftedWindowAttention):
            return {}
        batch, height, width, _ = inp.shape
        wh, ww = module.window_size
        tokens = batch * -(-height // wh) * wh * -(-width // ww) * ww
        return {"qkv": tokens * module.qkv.in_features * module.qkv.out_features,
                "proj": tokens * module.proj.in_features * module.proj.out_features}


class ShiftedWindowAttentionV2Spec(ShiftedWindowAttentionSpec):
    """torchvision's ``ShiftedWindowAttentionV2`` (Swin v2), known so that its heads
    and the stream through it are refused by name (``unsupported_state``, from
    ``pyprune_ext.nn.swin.unsupported``): each head also owns an entry of
    ``logit_scale`` and an output of ``cpb_mlp`` (the network computing its position
    bias), which pyprune_ext does not remove, and torchvision's forward takes the head
    width from the stream width."""

    unchanged_tensors = ("relative_position_index", "relative_coords_table")
    heads_tensors = {"logit_scale": 0}

    def resize(self, module, lengths):  # never reached: unsupported_state blocks every axis
        raise ValueError(self.unsupported_state(type(module).__name__, module))


# -- normalisations ------------------------------------------------------------------------------------
class _NormSpec(LayerSpec):
    def macs(self, module, inp, out, norm_macs):
        return out.numel() if norm_macs else 0


class BatchNormSpec(_NormSpec):
    """BatchNorm1d/2d/3d (SyncBatchNorm): per-channel affine parameters and
    running statistics on dim 1 (dim 0 unbatched). Without affine parameters
    a zeroed channel becomes -mean/std, not zero: masking is not exact."""

    gate_after = True

    def axes(self, module):
        dims = _present(module, {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0})
        return {"norm": Axis(module.num_features, dims, in_feature=True, out_feature=True)}

    def analyse(self, an, node, name, module, x, meta):
        return follow_channels(an, name, "norm", x, meta, 1 if len(x.shape) > 1 else 0,
                               None if module.affine else f"{name} has no affine weight/bias to zero")

    def resize(self, module, lengths):
        module.num_features = lengths["norm"]

    def recompute(self, module, inputs):
        # in training mode a BatchNorm normalises with the batch's statistics and would update its running ones
        use_batch_stats = module.training or module.running_mean is None
        return F.batch_norm(inputs[0], None if use_batch_stats else module.running_mean,
                            None if use_batch_stats else module.running_var,
                            module.weight, module.bias, use_batch_stats, 0.0, module.eps)


class LayerNormSpec(_NormSpec):
    """LayerNorm / RMSNorm over the last ``len(normalized_shape)`` dims; the
    channels are the last dim. Removing channels changes the statistics of the
    others, so zeroing them is not removing them; over the channels alone
    (``normalized_shape`` of one dim) the group lists the norm in
    ``masked_norms``: statistics that skip the masked channels make masking exact
    (``pyprune_ext.taylor.norm_masks``)."""

    channel_dim = -1  # the dim of the input the statistics run over (pyprune_ext.taylor.norm_masks)

    @staticmethod
    def normalized_shape(module) -> tuple[int, ...]:
        return tuple(module.normalized_shape)

    def axes(self, module):
        shape = self.normalized_shape(module)
        return {"norm": Axis(shape[-1], _present(module, {"weight": len(shape) - 1, "bias": len(shape) - 1}),
                             in_feature=True, out_feature=True)}

    def features(self, module):
        size = math.prod(self.normalized_shape(module))
        return size, size

    def analyse(self, an, node, name, module, x, meta):
        nd, last = len(self.normalized_shape(module)), len(x.shape) - 1
        if isinstance(x, Tracked) and x.dim < len(x.shape) - nd:
            # normalizes other dims; a zeroed channel becomes the bias, not zero
            an.elements.mark_inexact(x.ids, f"{name} normalizes a zeroed channel to its bias")
            own = an.elements.new(x.shape[last], blocked=f"{name} normalizes dims that carry no prunable channels")
            an.elements.attach(name, "norm", own)
            return an.tracked_like(meta, x.dim, x.ids)
        if isinstance(x, Tracked) and x.dim != last:
            reason = f"{name} normalizes the channels together with the dims after them"
            an.elements.block(x.ids, reason)
            an.elements.attach(name, "norm", an.elements.new(x.shape[last], blocked=reason))
            return an.tracked_like(meta, x.dim, x.ids)
        ids = an.channels_in(x, last, name)
        an.elements.attach(name, "norm", ids)
        reason = f"{type(module).__name__} {name} normalizes over the channels"
        if nd == 1:  # statistics over the channels alone: exact once they skip the masked ones
            an.elements.mark_renorm(ids, name, reason)
        else:
            an.elements.mark_inexact(ids, reason)
        return an.tracked_like(meta, last, ids)

    def resize(self, module, lengths):
        module.normalized_shape = tuple(module.normalized_shape[:-1]) + (lengths["norm"],)

    def epsilon(self, module) -> float | None:
        """The eps added to the variance (None: the dtype's, as nn.RMSNorm's default)."""
        return module.eps


class ChannelsFirstLayerNormSpec(LayerNormSpec):
    """A LayerNorm over the channels of (N, C, ...) inputs, on dim 1 (torchvision's
    ConvNeXt ``LayerNorm2d``: permute, ``F.layer_norm``, permute back)."""

    channel_dim = 1

    def analyse(self, an, node, name, module, x, meta):
        ids = an.channels_in(x, 1, name)
        an.elements.attach(name, "norm", ids)
        an.elements.mark_renorm(ids, name, f"{type(module).__name__} {name} normalizes over the channels")
        return an.tracked_like(meta, 1, ids)


class WeightRMSNormSpec(LayerNormSpec):
    """An RMSNorm module written as ``weight * x * rsqrt(mean(x ** 2) + eps)``
    over the last dim, with a (C,) ``weight`` and no size attribute (Hugging
    Face's LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm)."""

    @staticmethod
    def normalized_shape(module) -> tuple[int, ...]:
        return tuple(module.weight.shape)

    def resize(self, module, lengths):
        pass  # the weight's shape is its size

    def epsilon(self, module) -> float | None:
        return getattr(module, "variance_epsilon", getattr(module, "eps", None))


class RecognizedRMSNormSpec(WeightRMSNormSpec):
    """A module of no registered class recognized as an RMSNorm by its forward
    (``graph.norm_patterns.match_rms_norm``); eps as the pattern found it."""

    def __init__(self, pattern: RMSNormPattern):
        self.pattern = pattern

    def epsilon(self, module) -> float | None:
        return self.pattern.eps(module)


class GroupNormSpec(_NormSpec):
    """GroupNorm: statistics per group of ``num_channels / num_groups`` channels
    on dim 1, so it loses whole groups: each group's channels are one unit. A
    zeroed group normalises to zero (and its affine entries are zeroed), the
    other groups' statistics do not change: masking is exact."""

    gate_after = True

    def axes(self, module):
        return {"norm": Axis(module.num_channels, _present(module, {"weight": 0, "bias": 0}),
                             in_feature=True, out_feature=True)}

    def analyse(self, an, node, name, module, x, meta):
        if isinstance(x, Tracked) and x.dim != 1:
            reason = f"GroupNorm {name} normalizes dim 1, but the prunable channels are on dim {x.dim}"
            an.elements.block(x.ids, reason)
            an.elements.attach(name, "norm", an.elements.new(module.num_channels, blocked=reason))
            return an.tracked_like(meta, x.dim, x.ids)
        ids = an.channels_in(x, 1, name)
        couple_blocks(an, ids, module.num_channels // module.num_groups)
        an.elements.attach(name, "norm", ids)
        return an.tracked_like(meta, 1, ids)

    def resize(self, module, lengths):
        width = module.num_channels // module.num_groups
        module.num_channels = lengths["norm"]
        module.num_groups = lengths["norm"] // width


class ChannelwiseSpec(LayerSpec):
    """A layer that maps channels to the same channels with per-channel
    parameters (``params``: name -> dim of the channel in that tensor), on dim
    ``channel_dim`` of its input (negative: from the end). ``zero_preserving``:
    f(0) == 0 for every channel, so removal equals masking. PReLU is one; a
    user's per-channel scale layer can be registered with it::

        register_layer(Scale, ChannelwiseSpec({"gamma": 0}, channel_dim=1))

    ``size_attr``: the attribute holding the channel count, updated by surgery.
    Cost tables list the layer with its parameters and no MACs."""

    def __init__(self, params: Mapping[str, int], channel_dim: int = 1, *, zero_preserving: bool = True,
                 size_attr: str | None = None, unbatched_channel_dim: int | None = 0):
        self.params, self.channel_dim, self.zero_preserving = dict(params), channel_dim, zero_preserving
        self.size_attr, self.unbatched_channel_dim = size_attr, unbatched_channel_dim

    def _length(self, module) -> int:
        name, dim = next(iter(self.params.items()))
        return getattr(module, name).shape[dim]

    def axes(self, module):
        return {"channel": Axis(self._length(module), _present(module, self.params),
                                in_feature=True, out_feature=True)}

    def analyse(self, an, node, name, module, x, meta):
        nd = len(x.shape)
        cd = self.channel_dim % nd if nd > 1 or self.unbatched_channel_dim is None else self.unbatched_channel_dim
        return follow_channels(an, name, "channel", x, meta, cd, None if self.zero_preserving else
                               f"{name} ({type(module).__name__}) maps 0 to a non-zero value")

    def resize(self, module, lengths):
        if self.size_attr:
            setattr(module, self.size_attr, lengths["channel"])


class PReLUSpec(ChannelwiseSpec):
    """PReLU: one weight per channel (dim 1), or a single shared one (then it is
    a plain zero-preserving activation)."""

    def __init__(self):
        super().__init__({"weight": 0}, channel_dim=1, size_attr="num_parameters")

    def axes(self, module):
        return super().axes(module) if module.num_parameters > 1 else {}

    def analyse(self, an, node, name, module, x, meta):
        if module.num_parameters > 1:
            return super().analyse(an, node, name, module, x, meta)
        return an.passthrough(x, meta)


def _register_builtins() -> None:
    from ..nn.masked import MaskedConv2d, MaskedLinear  # the masked layers compute what their bases do

    conv, conv_t, norm = ConvSpec(), ConvTransposeSpec(), BatchNormSpec()
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, MaskedConv2d):
        register_layer(cls, conv)
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_layer(cls, conv_t)
    register_layer(nn.Linear, LinearSpec())
    register_layer(MaskedLinear, _REGISTRY[nn.Linear])
    register_layer(_BatchNorm, norm)
    register_layer(nn.LayerNorm, LayerNormSpec())
    if hasattr(nn, "RMSNorm"):
        register_layer(nn.RMSNorm, _REGISTRY[nn.LayerNorm])
    register_layer(nn.GroupNorm, GroupNormSpec())
    register_layer(nn.Embedding, EmbeddingSpec())
    register_layer(nn.PReLU, PReLUSpec())
    register_layer(nn.MultiheadAttention, MultiheadAttentionSpec())


_register_builtins()
