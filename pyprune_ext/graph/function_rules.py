"""``call_function`` / ``call_method`` nodes: plain Python containers, tensor
attributes, then the op's rule (a user's registration by identity first, then
the table by canonical name; see ``rules``)."""

from __future__ import annotations

from torch import fx

from . import optable as T
from .analysis import Analyzer, is_attribute_view
from .layouts import Tracked, Untracked, iter_layouts
from .recording import VALUE
from .rules import OpCall, _has_tensor, _setitem, _what, reshape_via_probe, rule_for_name, user_rule_for


def visit_function(an: Analyzer, node: fx.Node):
    meta = node.meta.get(VALUE)
    args, kwargs = an.resolve(node.args), an.resolve(node.kwargs)
    name, swapped = T.canonical(node)
    first = args[0] if args else None
    # plain Python containers (split outputs, max's (values, indices), sizes)
    # (indexing a container reads no values: each piece keeps its own dirt, see Analyzer.carry)
    if name == "getitem" and isinstance(first, (list, tuple, dict)):
        an.absorb(first)
        return first[args[1]]
    if name == "getattr" and isinstance(first, (list, tuple)) and args[1] in ("values", "indices"):
        an.absorb(first)
        return first[0 if args[1] == "values" else 1]
    if name == "setitem" and any(isinstance(v, Tracked) for v in iter_layouts(args)):
        return _setitem(an, node, first, args, meta)  # returns None, but writes into a tensor
    if not _has_tensor(meta):
        return meta
    if isinstance(first, Untracked) and first.attribute is not None and is_attribute_view(node):
        return Untracked(first.source, tuple(meta.shape), attribute=first.attribute)
    if not any(isinstance(v, Tracked) for v in iter_layouts((args, kwargs))):
        # keep the first input's origin (a model input, a parameter read directly): it names the cause
        sources = [v.source for v in iter_layouts((args, kwargs)) if isinstance(v, Untracked)]
        return an.untracked_like(meta, sources[0] if sources else
                                 f"comes from {_what(node)}, which has no prunable channels as input")
    rule = user_rule_for(node.target) if node.op == "call_function" else None
    if rule is None and (name == "getattr" or (name or "").startswith("attr:")):
        attr = args[1] if name == "getattr" else name[5:]
        if attr == "data":
            return an.follow(first, meta)
        if attr in T.TENSOR_ATTRS:
            return reshape_via_probe(an, node, attr, first, args, kwargs, meta)
        return an.unknown(node, (args, kwargs), meta)
    rule = rule or rule_for_name(name)
    if rule is None:
        return an.unknown(node, (args, kwargs), meta)
    return rule.apply(an, OpCall(node, name, swapped, args, kwargs, meta))
