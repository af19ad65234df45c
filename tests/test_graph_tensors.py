"""Parameters and buffers a model reads directly (a ``layer_scale`` multiplied in, a
bias or position embedding added) lose channels with the values they meet:
removed == masked, the tensor shrinks in its owner, and what cannot follow is
refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import dependency_groups
from pyprune_ext.taylor import Target, TaylorPruner

from pruning_loop import finalize_and_compare, train_until_done
from test_graph_layers import assert_removed_equals_masked


class ScaledBlock(nn.Module):
    """ConvNeXt's pattern: x + layer_scale * f(x), layer_scale of shape (C, 1, 1)."""

    def __init__(self, channels):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw1, self.pw2 = nn.Conv2d(channels, 2 * channels, 1), nn.Conv2d(2 * channels, channels, 1)
        self.layer_scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * self.pw2(F.gelu(self.pw1(self.dw(x))))


class Net(nn.Module):
    def __init__(self, bias_as_buffer=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = ScaledBlock(8), ScaledBlock(8)
        if bias_as_buffer:
            self.register_buffer("shift", torch.randn(1, 8, 1, 1))
        else:
            self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc((self.b2(self.b1(self.stem(x))) + self.shift).mean((2, 3)))


def stream(groups):
    (group,) = [g for g in groups if g.name.startswith("residual")]
    return group


@pytest.mark.parametrize("bias_as_buffer", [False, True], ids=["parameter", "buffer"])
def test_tensors_read_directly_follow_the_stream(bias_as_buffer):
    torch.manual_seed(0)
    groups, removed = assert_removed_equals_masked(Net(bias_as_buffer), torch.randn(2, 3, 8, 8), expect_groups=3)
    tensors = {(m.name, m.dim) for m in stream(groups).members if m.role == "tensor"}
    assert tensors == {("b1.layer_scale", 0), ("b2.layer_scale", 0), ("shift", 1)}
    assert removed.b1.layer_scale.shape == (6, 1, 1) and removed.shift.shape == (1, 6, 1, 1)
    assert isinstance(removed.b1.layer_scale, nn.Parameter) and removed.stem.out_channels == 6


def test_taylor_masks_and_removes_a_tensor_read_directly():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(2), every=1, prune_per_step=1,
                          max_fraction=lambda g: 0.25 if g.name.startswith("residual") else 0.0)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x), labels), lr=0.05)
    assert int((model.b1.layer_scale == 0).sum()) == 2  # held at zero through the optimizer steps
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-5 and small.b2.layer_scale.shape == (6, 1, 1)
    assert pruner.report().params_after == sum(p.numel() for p in small.parameters())


class Misused(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv(x) * self.scale
        if self.kind == "matmul":  # also read by something that is not element-wise
            y = y + (self.scale.flatten() @ torch.ones(8))
        if self.kind == "tied":
            y = y * self.fc.weight[:1, :].view(1, 8, 1, 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("kind, reason", [("matmul", "scale is used by Tensor.flatten"),
                                          ("tied", "fc.weight is used directly")])
def test_tensors_that_cannot_follow_are_refused_by_name(kind, reason):
    groups = dependency_groups(Misused(kind).eval(), torch.randn(1, 3, 8, 8))
    (conv,) = [g for g in groups if any(m.name == "conv" and m.role == "out" for m in g.members)]
    assert not conv.prunable
    assert reason in conv.reason


class Tokens(nn.Module):
    """A class token expanded over the batch and concatenated before the tokens, and a
    position table longer than the sequence, sliced to it (or, misused, sliced along
    the channels)."""

    def __init__(self, slice_channels=False):
        super().__init__()
        self.slice_channels = slice_channels
        self.embed = nn.Linear(6, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 10, 16 if slice_channels else 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        pos = self.pos[:, :h.shape[1], :8] if self.slice_channels else self.pos[:, :h.shape[1]]
        return self.fc(F.relu(h + pos)[:, 0])


def embedded(groups):
    (group,) = [g for g in groups if any(m.name == "embed" and m.role == "out" for m in g.members)]
    return group


def test_expanded_and_sliced_tensors_follow_the_channels():
    torch.manual_seed(0)
    groups, removed = assert_removed_equals_masked(Tokens().eval(), torch.randn(2, 5, 6), expect_groups=1)
    assert {(m.name, m.dim) for m in embedded(groups).members if m.role == "tensor"} == {("cls", 2), ("pos", 2)}
    assert removed.cls.shape == (1, 1, 6) and removed.pos.shape == (1, 10, 6)
    assert removed(torch.randn(3, 7, 6)).shape == (3, 3)  # another batch and sequence length


def test_a_tensor_sliced_along_the_channels_is_refused_by_name():
    groups = dependency_groups(Tokens(slice_channels=True).eval(), torch.randn(2, 5, 6))
    assert not embedded(groups).prunable
    assert "pos (size 16 on dim 2) is expanded or sliced to the 8 channels" in embedded(groups).reason
