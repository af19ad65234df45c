"""Where masked channels do not stay zero: an op with f(0) != 0 (sigmoid, + 1)
makes them non-zero, and masking equals removal only while such a value is
multiplied by a clean one (a squeeze-and-excitation gate, a GLU) before anything
consumes it. Each exact case is checked as removed == masked; each inexact one
names the op that spoils it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import dependency_groups

from test_graph_layers import assert_removed_equals_masked


def group_of(groups, module: str, role: str = "out"):
    found = [g for g in groups if any(m.name == module and m.role == role for m in g.members)]
    assert len(found) == 1, [(g.name, [(m.name, m.role) for m in g.members]) for g in groups]
    return found[0]


class SqueezeExcite(nn.Module):
    """conv -> SE gate (avgpool, fc, relu, fc, gate) -> conv; ``gate`` maps 0 to non-zero."""

    def __init__(self, gate=torch.sigmoid, inplace_gate: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc1 = nn.Conv2d(12, 4, 1)
        self.fc2 = nn.Conv2d(4, 12, 1)
        self.project = nn.Conv2d(12, 6, 1)
        self.gate, self.inplace_gate = gate, inplace_gate

    def forward(self, x):
        x = F.silu(self.bn(self.conv(x)))
        s = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        s = s.sigmoid_() if self.inplace_gate else self.gate(s)
        return self.project(x * s)


@pytest.mark.parametrize("gate", [torch.sigmoid, F.hardsigmoid, nn.Hardsigmoid()], ids=["sigmoid", "hardsigmoid",
                                                                                       "module"])
def test_squeeze_excitation_gate_is_exact(gate):
    model = SqueezeExcite(gate)
    x = torch.randn(2, 3, 8, 8)
    groups, _ = assert_removed_equals_masked(model, x, expect_groups=2)
    gated = group_of(groups, "conv")
    assert gated.prunable and gated.exact_masking, gated.exact_reason
    assert {(m.name, m.role) for m in gated.members} >= {("conv", "out"), ("fc2", "out"), ("fc1", "in"),
                                                           ("project", "in")}
    assert group_of(groups, "fc1").exact_masking


def test_in_place_gate_is_exact_too():
    model = SqueezeExcite(inplace_gate=True)
    groups, _ = assert_removed_equals_masked(model, torch.randn(2, 3, 8, 8), expect_groups=2)
    assert group_of(groups, "conv").exact_masking


class GLU(nn.Module):
    def __init__(self, gate_first: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.out = nn.Conv2d(8, 5, 1)
        self.gate_first = gate_first

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.out(torch.sigmoid(a) * b if self.gate_first else a * torch.sigmoid(b))


@pytest.mark.parametrize("gate_first", [False, True])
def test_glu_chunk_is_exact(gate_first):
    groups, _ = assert_removed_equals_masked(GLU(gate_first), torch.randn(2, 3, 6, 6))
    assert group_of(groups, "conv").exact_masking


class Spoiled(nn.Module):
    """A dirty value reaches a consumer before (or without) a clean factor."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "conv":        # sigmoid straight into a conv
            return self.out(torch.sigmoid(y))
        if self.kind == "add":         # y + sigmoid(gate): the sum is 0.5 at pruned channels
            return self.out(y + torch.sigmoid(self.fc(y)))
        if self.kind == "two_dirty":   # a product of two dirty values is still dirty
            return self.out(torch.sigmoid(y) * torch.sigmoid(self.fc(y)))
        if self.kind == "reduce":      # a sum over the channels of a dirty value
            return self.out(y * torch.sigmoid(y).sum(1, keepdim=True))
        if self.kind == "in_place":    # y itself overwritten, then used
            z = y * 2
            y.sigmoid_()
            return self.out(z + y)
        if self.kind == "ones_like":   # a tensor of ones shaped like y, added to it
            return self.out(y + torch.ones_like(y))
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind, culprit", [("conv", "sigmoid"), ("add", "sigmoid"), ("two_dirty", "sigmoid"),
                                           ("reduce", "sigmoid"), ("in_place", "sigmoid_"),
                                           ("ones_like", "ones_like")])
def test_dirty_value_consumed_is_inexact(kind, culprit):
    model = Spoiled(kind).eval()
    groups = dependency_groups(model, torch.randn(1, 3, 5, 5))
    group = group_of(groups, "conv")
    assert group.prunable and not group.exact_masking
    assert culprit in group.exact_reason


def test_masked_channel_made_non_zero_really_differs():
    """The inexact verdict is real: for the sigmoid-into-conv case, masked != removed."""
    from pyprune_ext.graph import remove_channels, zero_channels
    import copy

    model = Spoiled("conv").eval()
    x = torch.randn(2, 3, 5, 5)
    groups = dependency_groups(model, x)
    index = groups.index(group_of(groups, "conv"))
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, groups[index], torch.tensor([0, 1]))
    remove_channels(removed, groups, {index: torch.arange(2, 8)})
    with torch.no_grad():
        assert not torch.allclose(masked(x), removed(x), atol=1e-4)
