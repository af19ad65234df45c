"""Sizes a module writes into its computation (a split of a packed projection at
``self.split_size``): refused by name until declared, then pruned alike and
recomputed after removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import dependency_groups, register_size_attribute, unregister_size_attribute

from test_graph_layers import assert_removed_equals_masked

# a split into a tuple cannot be traced by torch.fx: the analysis runs the model instead
pytestmark = pytest.mark.filterwarnings("ignore::pyprune_ext.graph.GraphAnalysisWarning")


class PackedAttention(nn.Module):
    """GPT-2's layout: one projection holding q, k and v, cut at a size held as an attribute."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.head_dim, self.split_size = dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (t.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(self.split_size, dim=2))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = PackedAttention()

    def forward(self, x):
        return x + self.attn(x)


@pytest.fixture
def declared():
    size = register_size_attribute(PackedAttention, "split_size", lambda m: m.qkv.out_features // 3, child="qkv")
    yield size
    unregister_size_attribute(PackedAttention, "split_size")


def heads_group(groups):
    (group,) = [g for g in groups if any(m.name == "attn.qkv" and m.role == "out" for m in g.members)]
    return group


def test_a_split_at_an_undeclared_attribute_is_refused_by_name():
    group = heads_group(dependency_groups(Model(), torch.randn(2, 5, 16)))
    assert not group.prunable and "fixed sizes (16, 16, 16)" in group.reason
    assert "register_size_attribute" in group.reason


def test_a_declared_split_prunes_heads_and_the_attribute_follows(declared):
    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(2, 5, 16)
    groups, removed = assert_removed_equals_masked(model, x)
    group = heads_group(groups)
    assert group.prunable and group.size == 4  # one unit per head: its q, k and v rows together
    assert removed.attn.split_size == removed.attn.qkv.out_features // 3 < 16
    assert removed(x).shape == (2, 5, 16)


def test_a_declared_size_is_matched_to_its_child_and_value(declared):
    class Other(PackedAttention):  # cuts at a size read elsewhere than the declared attribute
        def forward(self, x):
            q, k, v = self.qkv(x).split(self.qkv.out_features // 3, dim=2)
            return self.out(q + k + v)

    model = Model()
    model.attn.__class__ = Other
    model.attn.split_size = 99  # the declared attribute no longer holds the written size
    group = heads_group(dependency_groups(model, torch.randn(2, 5, 16)))
    assert not group.prunable and "fixed sizes (16, 16, 16)" in group.reason
    model.attn.split_size = 16  # it does again
    assert heads_group(dependency_groups(model, torch.randn(2, 5, 16))).prunable


def test_registration_errors(declared):
    with pytest.raises(ValueError, match="already declared"):
        register_size_attribute(PackedAttention, "split_size", lambda m: 0, child="qkv")
    with pytest.raises(TypeError, match="nn.Module class"):
        register_size_attribute(int, "split_size", lambda m: 0)
    with pytest.raises(ValueError, match="attribute name"):
        register_size_attribute(PackedAttention, "split size", lambda m: 0)
    with pytest.raises(TypeError, match="function of the module"):
        register_size_attribute(PackedAttention, "other", 3)
    with pytest.raises(KeyError, match="no size 'width'"):
        unregister_size_attribute(PackedAttention, "width")
