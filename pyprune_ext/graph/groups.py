"""``dependency_groups``: trace, couple channels, bundle them into ChannelGroups."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter, defaultdict
from typing import Iterable

from torch import nn

from .analysis import Analyzer
from .attention import checked_gqa
from .walk import analyse
from .layouts import Elements
from .specs import ROLES, member_layer, spec_for
from .structs import ChannelGroup, Gate, GraphAnalysisWarning, Member
from .trace import trace_model


def dependency_groups(model: nn.Module, example_inputs, ignore: Iterable[nn.Module] = (),
                      gqa: str = "kv") -> list[ChannelGroup]:
    """The groups of channels of ``model`` that must be pruned together.

    ``example_inputs``: a tensor, a tuple/list of forward arguments or a dict of
    keyword arguments, on the model's device; it is run once in eval mode
    without autograd (training flags and BatchNorm statistics are left as they
    were). ``ignore``: modules whose output channels must not be pruned (an
    ignored module that is not a Conv/Linear/norm layer is treated as opaque:
    its inputs are not pruned either).

    ``gqa``: what grouped-query attention (a key/value head read by several
    query heads) is pruned by. ``"kv"`` (default): a unit is a KV head with the
    query heads reading it, so the ratio Hq / Hkv is kept. ``"query"``: the KV
    heads are kept (their k/v projections' rows are in no prunable group) and
    query heads go one by one, as a group with ``blocks`` = Hkv (every KV head
    keeps the same number of query heads, as GQA needs) and ``zeroes_inputs``
    (a masked query head still reads its KV head, so masking also zeroes its
    output projection's columns). Removal then changes Hq / Hkv: a module that
    holds that ratio as an attribute must declare it
    (:func:`~pyprune_ext.graph.register_size_attribute`; Hugging Face's
    ``num_key_value_groups`` is declared).

    The model is traced with torch.fx; if that fails (data-dependent control
    flow), it is traced by running it, with a ``GraphAnalysisWarning``. Ops the
    analysis does not understand make the channels through them unprunable,
    also with a warning. Groups come in graph order.
    """
    gqa = checked_gqa(gqa)
    ignored_ids = _ignored_ids(model, ignore)
    traced = trace_model(model, example_inputs, ignored_ids)
    names = {id(m): n for n, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    ignored = {names[i] for i in ignored_ids}
    an = analyse(model, traced.graph, ignored, gqa)
    _block_shared_weights(an, model)
    if traced.by_execution:
        _warn_unexecuted(model, an)
    return bundle(an, model)


def _ignored_ids(model: nn.Module, ignore: Iterable[nn.Module]) -> set[int]:
    own = {id(m) for m in model.modules()}
    ignored = set()
    for module in ignore:
        if not isinstance(module, nn.Module) or id(module) not in own:
            raise ValueError(f"ignore: {type(module).__name__} is not a submodule of the model")
        ignored.add(id(module))
    return ignored


def _block_shared_weights(an: Analyzer, model: nn.Module) -> None:
    """Layers whose weights are also used elsewhere (read directly in forward, or
    tied to another module) cannot be rebuilt on their own."""
    members = {name for name, role, _ in an.elements.members if role != "tensor"}
    for target, node_name in an.attr_reads:
        for name in members:
            if target.startswith(name + "."):
                an.elements.block(an.elements.module_elements(name),
                                  f"{target} is used directly at node '{node_name}'")
    owners = defaultdict(set)
    for name, module in model.named_modules(remove_duplicate=False):
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:
                owners[id(tensor)].add(id(module))
    modules = dict(model.named_modules())
    for name in members:
        module = modules[name]
        for pname, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and len(owners[id(tensor)]) > 1:
                an.elements.block(an.elements.module_elements(name),
                                  f"{name}.{pname} is shared with another module")
                break


def _warn_unexecuted(model: nn.Module, an: Analyzer) -> None:
    missed = [name for name, m in model.named_modules()
              if name not in an.calls and (spec := spec_for(m)) is not None and spec.axes(m)]
    if missed:
        warnings.warn(
            f"dependency_groups: the fallback tracer never saw {', '.join(missed[:8])}"
            f"{' ...' if len(missed) > 8 else ''} run on the example input; they are in no group and are "
            "never shrunk, so a code path that uses them may fail after pruning", GraphAnalysisWarning,
            stacklevel=3)


# -- bundling components into groups -----------------------------------------------------------
def member_length(modules, member: Member) -> int:
    """Length of the axis a group member indexes (``modules``: the model or a name -> module map)."""
    module, spec = member_layer(modules, member)
    axis = spec.axes(module).get(member.role) if spec is not None else None
    if axis is None:
        raise ValueError(f"{type(module).__name__} has no '{member.role}' axis in its layer spec "
                         f"({type(spec).__name__ if spec is not None else 'no spec registered'})")
    return axis.length


def axis_length(module: nn.Module, role: str) -> int:
    """Length of the module axis a member of ``role`` indexes (from its layer spec)."""
    spec = spec_for(module)
    axis = spec.axes(module).get(role) if spec is not None else None
    if axis is None:
        raise ValueError(f"{type(module).__name__} has no '{role}' axis in its layer spec "
                         f"({type(spec).__name__ if spec is not None else 'no spec registered'})")
    return axis.length


def _consolidate(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted module positions of one channel -> (offset, span) members.
    A run of ``span`` consecutive positions starting at a multiple of ``span``
    is one channel of a flattened (C, H, W) input; anything else is listed
    position by position (span 1), which is still exact."""
    positions = sorted(positions)
    runs, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            runs.append((positions[start], i - start))
            start = i
    out = []
    for first, length in runs:
        if first % length == 0:
            out.append((first // length, length))
        else:
            out.extend((p, 1) for p in range(first, first + length))
    return out


def _components(el: Elements, order: dict[str, int]):
    """root -> (signature, offsets): members sorted in a canonical order."""
    raw = defaultdict(lambda: defaultdict(list))
    for (name, role, position), e in el.members.items():
        raw[el.find(e)][(name, role)].append(position)
    result = {}
    for root, by_axis in raw.items():
        members = [(name, role, span, offset)
                   for (name, role), positions in by_axis.items()
                   for offset, span in _consolidate(positions)]
        members.sort(key=lambda m: (order.get(m[0], len(order)), m[0], ROLES[m[1]].order, m[2], m[3]))
        result[root] = (tuple(m[:3] for m in members), tuple(m[3] for m in members))
    return result


def bundle(an: Analyzer, model: nn.Module) -> list[ChannelGroup]:
    """Components with the same members at consecutive offsets become one group."""
    el = an.elements
    kv_read = _join_kv_reads(an)
    buckets = defaultdict(list)
    for root, (signature, offsets) in _components(el, an.first_seen).items():
        key = (signature, tuple(sorted(el.blocked.get(root, ()))), tuple(sorted(el.inexact.get(root, ()))),
               tuple(sorted(el.renorm.get(root, {}).items())), root in el.zeroes_inputs)
        buckets[key].append((offsets, root))
    runs = []
    for key, items in buckets.items():
        items.sort()
        start = 0
        for i in range(1, len(items) + 1):
            if i == len(items) or any(b != a + 1 for a, b in zip(items[i - 1][0], items[i][0])):
                runs.append((min(root for _, root in items[start:i]), key, items[start:i]))
                start = i
    runs.sort(key=lambda r: r[0])
    modules = dict(model.named_modules())
    return [_make_group(an, modules, key, items, kv_read) for _, key, items in runs]


def _join_kv_reads(an: Analyzer) -> dict[int, int]:
    """gqa="query": query head component -> the KV head component it reads. The
    K and V heads one query head reads are joined (both are kept), so each query
    head reads one component. Empty in the default mode."""
    el = an.elements
    read_by = defaultdict(list)
    for query, kv in an.kv_reads:
        for q, k in zip(query.tolist(), kv.tolist()):
            read_by[el.find(q)].append(k)
    for kvs in read_by.values():
        for k in kvs[1:]:
            el.union(kvs[0], k)
    return {el.find(q): el.find(kvs[0]) for q, kvs in read_by.items()}


def _query_blocks(kv_read: dict[int, int], roots: list[int]) -> tuple[int, str | None]:
    """(blocks, why not prunable) of a group whose channels are the components
    ``roots``, in channel order: query heads reading shared KV heads must form
    consecutive equal runs, one per KV head, holding all of that head's readers
    (then removal can keep the same count per KV head); 1 block otherwise."""
    reads = [kv_read.get(root) for root in roots]
    if all(kv is None for kv in reads):
        return 1, None
    runs = [(kv, len(list(run))) for kv, run in itertools.groupby(reads)]
    readers = Counter(kv_read.values())
    heads_per_kv = runs[0][1]
    if (any(kv is None or count != heads_per_kv or readers[kv] != count for kv, count in runs)
            or len({kv for kv, _ in runs}) != len(runs)):
        return 1, ("gqa='query': its query heads do not read their key/value heads in equal consecutive runs "
                   "(query head p reading KV head p // (Hq / Hkv)), so no removal keeps the attention grouped")
    return len(runs), None


def _make_group(an: Analyzer, modules, key, items, kv_read: dict[int, int]) -> ChannelGroup:
    (signature, blocked, inexact, renorm, zeroes_inputs), offsets = key, items[0][0]
    blocks, unblockable = _query_blocks(kv_read, [root for _, root in items])
    blocked = blocked + ((unblockable,) if unblockable else ())
    members = [Member(name, role, offset, span, dim=an.tensor_dims.get(name) if role == "tensor" else None)
               for (name, role, span), offset in zip(signature, offsets)]
    residual = any(root in an.elements.residual for _, root in items)
    gates, bn = _gates(an, members, attention=any(root in an.elements.attention for _, root in items))
    return ChannelGroup(
        size=len(items), members=members, gates=gates, bn=bn, prunable=not blocked,
        reason="; ".join(blocked) or None, exact_masking=not inexact and not renorm,
        name=_group_name(members, residual, len(items), modules),
        exact_reason="; ".join(list(inexact) + [reason for _, reason in renorm]) or None,
        masked_norms=tuple(norm for norm, _ in renorm), exact_with_masked_norms=bool(renorm) and not inexact,
        extents=tuple(member_length(modules, m) for m in members), blocks=blocks, zeroes_inputs=zeroes_inputs)


def _gates(an: Analyzer, members: list[Member], attention: bool = False) -> tuple[list[Gate], list[Member]]:
    if attention:  # a head is observed where its output enters the consumer (the output projection)
        gates = [Gate(m.name, m.offset, an.input_dim[m.name], producer=m.name, span=m.span, on_input=True)
                 for m in members if m.role == "in" and m.name in an.input_dim]
        if gates:
            return gates, []
    gates, bns = [], []
    for m in members:
        if not ROLES[m.role].produces or m.name not in an.gate_of:
            continue
        gate_name, channel_dim = an.gate_of[m.name]
        gates.append(Gate(gate_name, m.offset, channel_dim, producer=m.name, span=m.span))
        if gate_name != m.name:
            bns.append(Member(gate_name, "norm", m.offset, m.span))
    return gates, bns


def _group_name(members: list[Member], residual: bool, size: int, modules) -> str:
    """The producer's name ("layer1.0.conv1", "conv[0:16]" for part of its channels),
    "residual: a, b, c" for channels joined by adds, "inputs of: a, b" when no
    layer produces them (model input, constants)."""
    producing = [m for m in members if ROLES[m.role].produces]
    first_role = min((ROLES[m.role].order, m.role) for m in producing)[1] if producing else None
    producers = [m for m in producing if m.role == first_role]  # "out" members first, else depthwise
    names = list(dict.fromkeys(m.name for m in producers))
    if len(names) == 1:
        m = producers[0]
        whole = (len(producers) == 1 and m.offset == 0
                 and size * m.span == member_length(modules, m))
        if whole:
            return m.name
        return f"{m.name}[{m.offset}:{m.offset + size}]" + (f" (units of {m.span})" if m.span > 1 else "")
    if names:
        spans = sorted({m.span for m in producers if m.span > 1}, reverse=True)
        units = f" (units of {', '.join(map(str, spans))})" if spans else ""  # heads, GQA groups
        return ("residual: " if residual else "coupled: ") + ", ".join(names) + units
    return "inputs of: " + ", ".join(dict.fromkeys(m.name for m in members))
