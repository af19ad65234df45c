"""Drives one analysis pass: every node of the traced graph, in order, through
the rule for its kind of op."""

from __future__ import annotations

from torch import fx, nn

from .analysis import Analyzer
from .function_rules import visit_function
from .layouts import Tracked, Untracked, iter_layouts
from .module_rules import visit_module
from .recording import VALUE


def analyse(model: nn.Module, graph: fx.Graph, ignored: set[str], gqa: str = "kv") -> Analyzer:
    """The analysis of ``graph`` (traced from ``model``, values recorded); ``gqa``:
    see ``attention.GQA_MODES``."""
    an = Analyzer(model, graph, ignored, gqa)
    for node in graph.nodes:
        meta = node.meta.get(VALUE)
        if node.op == "placeholder":
            value = an.untracked_like(meta, f"comes from the model input '{node.target}'")
        elif node.op == "get_attr":
            an.attr_reads.append((str(node.target), node.name))
            value = an.untracked_like(meta, f"comes from the tensor attribute '{node.target}', "
                                            "not from a prunable layer")
            if isinstance(value, Untracked):
                value = Untracked(value.source, value.shape, attribute=str(node.target))
        elif node.op in ("call_module", "call_function", "call_method"):
            dirty = an.dirty_inputs(node)
            value = visit_module(an, node) if node.op == "call_module" else visit_function(an, node)
            an.settle(node, dirty, value)
        elif node.op == "output":
            for layout in iter_layouts(an.resolve(node.args)):
                if isinstance(layout, Tracked):
                    an.elements.block(layout.ids, "feeds the model output")
            value = None
        else:  # pragma: no cover - fx has no other node kinds
            raise AssertionError(f"unexpected fx node kind {node.op}")
        an.values[node] = value
    return an
