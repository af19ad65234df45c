"""Structured pruning: which channels must go together, and removing them.

``dependency_groups(model, example_inputs)`` traces the model (torch.fx, or by
execution when fx cannot) and returns ``ChannelGroup``s: channels coupled by
residual adds, concatenation, depthwise convs, flattening into a Linear, norm
layers, attention heads (a view into heads, scaled_dot_product_attention,
nn.MultiheadAttention; grouped-query aware: ``gqa="query"`` keeps the KV heads and
prunes query heads with an equal count per KV head), ... Each group names its members (module axes), its gates (where
Taylor scores are measured) and whether it can be pruned at all.
``remove_channels`` rebuilds the affected layers smaller; ``zero_channels``
masks the same channels in place (exactly equivalent for ``exact_masking``
groups), for iterative pruning.

Extension points: ``register_layer(cls, spec)`` tells every part of the
library what a layer type is (``specs``: its channel axes, how it couples
channels, how it shrinks, its cost); ``register_op_rule(op, rule)`` tells the
analysis how an op moves channels (``rules``: a custom ``torch.ops`` op, a
function, a module class); ``register_size_attribute(cls, attr, compute,
child=...)`` declares a size a module holds and cuts a child's output at
(``sizes``: GPT-2's ``split_size``), kept true after removal. What is not registered is refused by name.
"""

from .groups import dependency_groups
from .specs import (ROLES, Axis, ChannelwiseSpec, LayerSpec, Role, register_layer, registered_layers,
                    spec_for, unregister_layer)
from .rules import (Binary, Clamp, Concat, ElementWise, Like, Opaque, OpCall, OpRule, Pad, Reduction, Reshape,
                    Select, Softmax, Spatial, Split, register_op_rule, unregister_op_rule)
from .sizes import SizeAttribute, register_size_attribute, unregister_size_attribute
from .structs import ChannelGroup, Gate, GraphAnalysisWarning, Member
from .surgery import remove_channels, shrink_module, zero_channels, zeroed_entries

__all__ = [
    "Binary",
    "Clamp",
    "Concat",
    "ElementWise",
    "Like",
    "Opaque",
    "OpCall",
    "OpRule",
    "Pad",
    "Reduction",
    "Reshape",
    "Select",
    "Softmax",
    "Spatial",
    "Split",
    "register_op_rule",
    "unregister_op_rule",
    "ROLES",
    "Axis",
    "ChannelwiseSpec",
    "LayerSpec",
    "Role",
    "register_layer",
    "registered_layers",
    "spec_for",
    "unregister_layer",
    "zeroed_entries",
    "SizeAttribute",
    "register_size_attribute",
    "unregister_size_attribute",
    "ChannelGroup",
    "Gate",
    "GraphAnalysisWarning",
    "Member",
    "dependency_groups",
    "remove_channels",
    "shrink_module",
    "zero_channels",
]
