"""Physical channel removal (``remove_channels``) and its masked equivalent
(``zero_channels``) for the groups ``dependency_groups`` returns."""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Mapping

import torch
from torch import Tensor, nn

from .sizes import refresh_sizes
from .groups import member_length
from .specs import ROLES, LayerSpec, member_layer, spec_for
from .structs import ChannelGroup, Member


# -- checking a plan --------------------------------------------------------------------------
def _channel_index(value, group: ChannelGroup, what: str, allow_empty: bool) -> Tensor:
    """``value`` as a sorted 1-D LongTensor of distinct channels of ``group``."""
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what} must hold integer channel indices, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D tensor of channel indices, got shape {list(t.shape)}")
    t = t.detach().to("cpu", torch.int64)
    if t.numel() == 0:
        if allow_empty:
            return t
        raise ValueError(f"{what} keeps no channel: removing every channel of group '{group.name}' "
                         "would leave its layers empty (keep at least one)")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= group.size:
        bad = low if low < 0 else high
        raise ValueError(f"{what} has channel {bad}, outside 0..{group.size - 1} "
                         f"(group '{group.name}' has {group.size} channels)")
    t = torch.sort(t).values
    repeated = t[1:][t[1:] == t[:-1]]
    if repeated.numel():
        raise ValueError(f"{what} lists channel {int(repeated[0])} more than once")
    return t


def _check_members(model: nn.Module, group: ChannelGroup, label: str) -> None:
    """The group still matches the model: modules exist, have the supported type
    and the axis lengths the analysis saw."""
    for j, m in enumerate(group.members):
        try:
            module, spec = member_layer(model, m)
            axes = spec.axes(module) if spec is not None else {}
        except AttributeError:
            raise ValueError(f"{label}: the model has no submodule or tensor '{m.name}' (groups from another "
                             "model?)") from None
        if m.role not in axes:
            raise ValueError(f"{label}: member {m} is not a supported layer/role ({type(module).__name__})")
        length = axes[m.role].length
        expected = group.extents[j] if j < len(group.extents) else length
        if length != expected or (m.offset + group.size) * m.span > length:
            raise ValueError(
                f"{label} is stale: {m.name} ({m.role}) has {length} channels but the analysis saw {expected}; "
                "call dependency_groups again after remove_channels")


def _checked_plan(model, groups, keep) -> list[tuple[int, ChannelGroup, Tensor]]:
    if not isinstance(keep, Mapping):
        raise ValueError(f"keep must map group indices to kept channels, got {type(keep).__name__}")
    plan = []
    for i, kept in keep.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(groups):
            raise ValueError(f"keep has group index {i!r}, but there are {len(groups)} groups (0..{len(groups) - 1})")
        group = groups[i]
        label = f"group {i} ('{group.name}')"
        if not group.prunable:
            raise ValueError(f"{label} is not prunable: {group.reason}")
        index = _channel_index(kept, group, f"keep[{i}]", allow_empty=False)
        _check_blocks(index, group, label)
        _check_members(model, group, label)
        plan.append((i, group, index))
    return plan


def _check_blocks(kept: Tensor, group: ChannelGroup, label: str) -> None:
    """A group of several blocks (query heads per KV head) must keep as many channels in each."""
    if group.blocks == 1:
        return
    counts = torch.bincount(kept // (group.size // group.blocks), minlength=group.blocks).tolist()
    if len(set(counts)) > 1:
        raise ValueError(f"{label} has {group.blocks} blocks of {group.size // group.blocks} channels (query heads "
                         f"per key/value head) and each must keep as many, but the kept channels leave "
                         f"{', '.join(map(str, counts))} in them")


def member_positions(m: Member, channels: Tensor) -> Tensor:
    """Module positions of group channels ``channels`` along member ``m``'s axis."""
    base = (m.offset + channels) * m.span
    return (base[:, None] + torch.arange(m.span)[None, :]).reshape(-1)


def _axis_keeps(model, plan) -> dict[str, dict[str, Tensor]]:
    """module name -> role -> bool mask of the kept positions; rejects groups that overlap."""
    keeps: dict[str, dict[str, Tensor]] = defaultdict(dict)
    owner: dict[tuple[str, str], Tensor] = {}
    for i, group, kept in plan:
        everything = torch.arange(group.size)
        dropped = everything[~torch.isin(everything, kept)]
        for m in group.members:
            length = member_length(model, m)
            owned = owner.setdefault((m.name, m.role), torch.full((length,), -1, dtype=torch.int64))
            covered = member_positions(m, everything)
            clash = owned[covered]
            if bool(((clash >= 0) & (clash != i)).any()):
                other = int(clash[(clash >= 0) & (clash != i)][0])
                raise ValueError(f"groups {other} and {i} both contain channels of {m.name} ({m.role}); "
                                 "use the groups of a single dependency_groups call")
            owned[covered] = i
            if dropped.numel():
                mask = keeps[m.name].setdefault(m.role, torch.ones(length, dtype=torch.bool))
                mask[member_positions(m, dropped)] = False
    return keeps


# -- rebuilding modules -------------------------------------------------------------------------
def _clone(module: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter/buffer tables (hooks and other
    attributes are shared with the original, which is dropped from the model)."""
    new = copy.copy(module)
    new.__dict__["_parameters"] = type(module._parameters)(module._parameters)
    new.__dict__["_buffers"] = type(module._buffers)(module._buffers)
    new.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    new.__dict__["_modules"] = type(module._modules)(module._modules)
    return new


def _select(t: Tensor, selections) -> Tensor:
    out = t.detach()
    for dim, index in selections:
        out = out.index_select(dim, index.to(out.device))
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == ndim and t.is_contiguous(memory_format=fmt) and not t.is_contiguous():
            out = out.contiguous(memory_format=fmt)
    # unselected tensors (a bias when only input channels go) must not share
    # storage with the discarded module's parameters
    return out if selections else out.clone()


def _selections(spec: LayerSpec, module: nn.Module, pname: str, idx: dict[str, Tensor]):
    """(dim, kept index) per changed axis that indexes tensor ``pname``."""
    selections = []
    axes = spec.axes(module)
    for role, index in idx.items():
        dim = spec.tensor_dims(module, role, pname)
        if dim is not None:
            selections.append((dim, axes[role].index(pname, index)))
    return selections


def _known_tensors(spec: LayerSpec, module: nn.Module) -> set[str]:
    known = {t for axis in spec.axes(module).values() for t in axis.tensors} | set(spec.unchanged_tensors)
    weight = module._parameters.get("weight")
    for table in (module._parameters, module._buffers):  # weight-shaped state (a mask) follows the weight
        known.update(n for n, t in table.items()
                     if t is not None and weight is not None and t.shape == weight.shape)
    return known


def shrink_module(module: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """A copy of ``module`` (same type, dtype, device, training mode,
    requires_grad) keeping the positions ``masks[role]`` marks along each axis
    of its layer spec (:mod:`pyprune_ext.graph.specs`)."""
    spec = spec_for(module)
    if spec is None:
        raise ValueError(f"cannot shrink {type(module).__name__}: no layer spec is registered for it "
                         "(pyprune_ext.graph.register_layer)")
    axes = spec.axes(module)
    unknown_roles = sorted(set(masks) - set(axes))
    if unknown_roles:
        raise ValueError(f"cannot shrink {type(module).__name__} along '{unknown_roles[0]}': its spec "
                         f"({type(spec).__name__}) has the axes {', '.join(axes) or 'none'}")
    idx = {role: mask.nonzero().squeeze(1) for role, mask in masks.items()}
    known = _known_tensors(spec, module)
    new = _clone(module)
    for table in ("_parameters", "_buffers"):
        for pname, t in getattr(module, table).items():
            if t is None or pname == "num_batches_tracked":
                continue
            if pname not in known:
                raise ValueError(f"cannot shrink {type(module).__name__}: it holds '{pname}' of shape "
                                 f"{list(t.shape)}, which no axis of its spec ({type(spec).__name__}) indexes")
            shrunk = _select(t, _selections(spec, module, pname, idx))
            if table == "_parameters":
                getattr(new, table)[pname] = nn.Parameter(shrunk, requires_grad=t.requires_grad)
            else:
                getattr(new, table)[pname] = shrunk
    spec.resize(new, {role: len(index) for role, index in idx.items()})
    from ..nn.masked import _MaskedMixin  # masked layers rebuild what they derive from the mask
    if isinstance(new, _MaskedMixin):
        new.set_mask(new.mask)
    return new


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Puts ``new`` wherever ``old`` is registered in ``model`` (all aliases)."""
    names = [name for name, m in model.named_modules(remove_duplicate=False) if m is old and name]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def remove_channels(model: nn.Module, groups: list[ChannelGroup], keep: Mapping[int, Tensor]) -> nn.Module:
    """Removes channels for real: ``keep[i]`` lists the channels of ``groups[i]``
    to keep (groups not in ``keep`` are unchanged).

    Every affected Conv/Linear/BatchNorm/LayerNorm is replaced, in place, by a
    smaller module of the same type holding the kept weights, biases and
    running statistics (same dtype/device/requires_grad/training mode; a
    MaskedConv2d/MaskedLinear keeps its mask). The whole plan is checked before
    anything changes: ValueError for an index or channel out of range, repeated
    channels, an empty keep, an unprunable group, overlapping or stale groups, a
    group of several ``blocks`` (query heads per KV head) left with unequal blocks.
    Old groups are stale afterwards: call ``dependency_groups`` again. Returns
    ``model``. Optimizers built on the old parameters must be rebuilt.
    """
    plan = _checked_plan(model, groups, keep)
    keeps = _axis_keeps(model, plan)
    dims = {m.name: m.dim for _, group, _ in plan for m in group.members if m.role == "tensor"}
    # a module before its children: its spec's resize sees them as the analysis did (torchvision's
    # Swin attention derives its head width from its qkv layer's input width)
    for name, masks in sorted(keeps.items(), key=lambda item: item[0].count(".") + bool(item[0])):
        if "tensor" in masks:
            _shrink_tensor(model, name, dims[name], masks["tensor"])
            continue
        old = model.get_submodule(name)
        _replace(model, old, shrink_module(old, masks))
    refresh_sizes(model)  # sizes modules hold as attributes (GPT-2's split_size) follow their layers
    return model


def _shrink_tensor(model: nn.Module, name: str, dim: int, keep: Tensor) -> None:
    """Keeps the positions ``keep`` marks along ``dim`` of the parameter or buffer
    ``name`` (read directly by the model), in its owner module."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    kept = keep.nonzero().squeeze(1)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(_select(old, [(dim, kept)]), requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = _select(owner._buffers[attr], [(dim, kept)])


@torch.no_grad()
def zero_channels(model: nn.Module, group: ChannelGroup, channels) -> None:
    """Masks channels of ``group`` in place: zeroes the parameters of every
    member whose role zeroes (:data:`pyprune_ext.graph.specs.ROLES`: the
    producers' weight rows and biases, depthwise filters, the norm members'
    weight/bias) at those channels. For ``group.exact_masking`` groups the model
    then computes exactly what ``remove_channels`` would give (input-side
    weights need no change: they only ever see zeros)."""
    if not group.prunable:
        raise ValueError(f"group '{group.name}' is not prunable: {group.reason}")
    index = _channel_index(channels, group, "channels", allow_empty=True)
    _check_members(model, group, f"group '{group.name}'")
    for m in group.members:
        if index.numel() == 0:
            continue
        module, spec = member_layer(model, m)
        for param, dim, positions in zeroed_entries(module, m.role, member_positions(m, index), spec,
                                                    inputs=group.zeroes_inputs):
            param.index_fill_(dim, positions.to(param.device), 0)


def zeroed_entries(module: nn.Module, role: str, positions: Tensor,
                   spec: LayerSpec | None = None, *, inputs: bool = False) -> list[tuple[Tensor, int, Tensor]]:
    """(parameter, dim, index) that masking ``positions`` of ``module``'s axis
    ``role`` zeroes: the axis's parameters (buffers such as running statistics
    are left alone), or nothing for a role that does not zero. ``spec``: the
    member's (:func:`~pyprune_ext.graph.specs.member_layer`), default the module's.
    ``inputs``: an ``"in"`` axis zeroes too (``ChannelGroup.zeroes_inputs``)."""
    if not (ROLES[role].zeroes or (inputs and role == "in")):
        return []
    spec = spec or spec_for(module)
    return [(t, dim, index) for name, t, dim, index in spec.entries(module, role, positions)
            if module._parameters.get(name) is t or (spec.zeroes_buffers and module._buffers.get(name) is t)]
