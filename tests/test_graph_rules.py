"""Op rules: chunk / split along the channels, and a user's custom op, Python
function and module class declared with register_op_rule (public API only)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import (ChannelwiseSpec, ElementWise, GraphAnalysisWarning, Opaque, OpRule, Reshape,
                               dependency_groups, register_layer, register_op_rule, unregister_layer,
                               unregister_op_rule)
from test_graph_layers import Scale, assert_removed_equals_masked, member_roles


@torch.library.custom_op("pyprune_test::scaled_relu", mutates_args=())
def scaled_relu(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.relu(x) * scale


@scaled_relu.register_fake
def _(x, scale):
    return torch.empty_like(x)


def soft_gate(x):
    """A user's element-wise function (f(0) == 0) that fx would otherwise trace into."""
    return x * torch.sigmoid(x)


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def groups_of(model, x, name):
    groups = dependency_groups(model, x)
    return groups, next(g for g in groups if any((m.name, m.role) == (name, "out") for m in g.members))


# -- chunk / split ------------------------------------------------------------------------------------------
class Chunked(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.how == "chunk":
            p, q = torch.chunk(y, 2, dim=1)
        elif self.how == "computed split":
            p, q = y.split(y.size(1) // 2, dim=1)
        elif self.how == "tensor_split":
            p, q = torch.tensor_split(y, 2, dim=1)
        elif self.how == "literal split":
            p, q = torch.split(y, 4, dim=1)
        else:
            p, q = torch.tensor_split(y, [4], dim=1)
        return (self.c1(p) * self.c2(q)).mean((2, 3))


@pytest.mark.parametrize("how", ["chunk", "computed split", "tensor_split"])
def test_chunks_along_the_channels_are_pruned_alike(how):
    x = torch.randn(2, 3, 8, 8)
    groups, removed = assert_removed_equals_masked(Chunked(how), x)
    _, a = groups_of(Chunked(how), x, "a")
    assert a.prunable and a.size == 4
    assert member_roles(a) == {("a", "out", 1), ("c1", "in", 1), ("c2", "in", 1)}
    assert sorted(m.offset for m in a.members if m.name == "a") == [0, 4]  # channel i and 4 + i go together
    assert removed.a.out_channels == removed.c1.in_channels + removed.c2.in_channels
    assert removed.c1.in_channels == removed.c2.in_channels < 4


@pytest.mark.parametrize("how,op", [("literal split", "torch.split"), ("cut points", "torch.tensor_split")])
def test_cuts_written_in_the_code_are_refused_by_name(how, op):
    _, a = groups_of(Chunked(how), torch.randn(2, 3, 8, 8), "a")
    assert not a.prunable and f"{op} at node" in a.reason and "pieces of fixed sizes (4, 4)" in a.reason


def test_uneven_chunks_are_refused():
    class Uneven(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 7, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            p, q = self.a(x).chunk(2, dim=1)
            return self.b(p).mean((2, 3)) + q.mean((1, 2, 3))[:, None]

    _, a = groups_of(Uneven(), torch.randn(2, 3, 8, 8), "a")
    assert not a.prunable and "pieces of fixed sizes (4, 3)" in a.reason


# -- a user's op, function and module --------------------------------------------------------------------------
class UserOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.doubler, self.b = nn.Conv2d(3, 8, 3), Doubler(), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = torch.ops.pyprune_test.scaled_relu(self.a(x), 0.5)
        return self.b(self.doubler(soft_gate(y))).mean((2, 3))


def test_undeclared_custom_op_is_refused_by_name():
    with pytest.warns(GraphAnalysisWarning, match="unknown op"):
        _, a = groups_of(UserOps(), torch.randn(2, 3, 8, 8), "a")
    assert not a.prunable and "scaled_relu" in a.reason


@pytest.fixture
def user_rules():
    register_op_rule(torch.ops.pyprune_test.scaled_relu, ElementWise(zero_preserving=True))
    register_op_rule(soft_gate, ElementWise(zero_preserving=True))
    register_op_rule(Doubler, ElementWise(zero_preserving=True))
    yield
    for op in (torch.ops.pyprune_test.scaled_relu, soft_gate, Doubler):
        unregister_op_rule(op)


def test_declared_custom_op_function_and_module_are_followed(user_rules):
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphAnalysisWarning)
        groups, removed = assert_removed_equals_masked(UserOps(), x)
    _, a = groups_of(UserOps(), x, "a")
    assert a.prunable and member_roles(a) == {("a", "out", 1), ("b", "in", 1)}
    assert removed.b.in_channels == removed.a.out_channels < 8


class CustomEverything(nn.Module):
    """A custom layer (registered spec) and a custom op in one model."""

    def __init__(self):
        super().__init__()
        self.a, self.scale, self.b = nn.Conv2d(3, 8, 3), Scale(8), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(torch.ops.pyprune_test.scaled_relu(self.scale(self.a(x)), 2.0)).mean((2, 3))


def test_model_with_a_custom_layer_and_a_custom_op(user_rules):
    register_layer(Scale, ChannelwiseSpec({"gamma": 0}, channel_dim=1))
    try:
        groups, removed = assert_removed_equals_masked(CustomEverything(), torch.randn(2, 3, 8, 8))
        assert removed.scale.gamma.numel() == removed.a.out_channels == removed.b.in_channels < 8
    finally:
        unregister_layer(Scale)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(soft_gate(self.a(x))).mean((2, 3))


def test_opaque_rule_blocks_without_a_warning():
    register_op_rule(soft_gate, Opaque("mixes the channels (a user's reason)"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", GraphAnalysisWarning)
            _, a = groups_of(Gated(), torch.randn(2, 3, 8, 8), "a")
        assert not a.prunable and "mixes the channels (a user's reason)" in a.reason
    finally:
        unregister_op_rule(soft_gate)


def test_custom_rule_subclass_sees_the_call():
    seen = []

    class Spy(OpRule):
        def apply(self, an, call):
            seen.append((call.what, len(call.tensors())))
            return ElementWise().apply(an, call)

    register_op_rule(soft_gate, Spy())
    try:
        _, a = groups_of(Gated(), torch.randn(2, 3, 8, 8), "a")
        assert a.prunable and len(seen) == 1 and "soft_gate" in seen[0][0] and seen[0][1] == 1
    finally:
        unregister_op_rule(soft_gate)


def test_register_op_rule_refuses_bad_input():
    with pytest.raises(TypeError, match="OpRule instance"):
        register_op_rule(soft_gate, ElementWise)
    with pytest.raises(TypeError, match="expected a custom op"):
        register_op_rule(3, ElementWise())
    with pytest.raises(ValueError, match="'relu' already has a rule.*replace=True"):
        register_op_rule("relu", Reshape())
    with pytest.raises(KeyError, match="has no rule"):
        unregister_op_rule(soft_gate)
