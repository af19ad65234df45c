"""Layer specs: grouped convs, GroupNorm, ConvTranspose, Embedding, PReLU and a
user's layer registered through the public API are prunable, and removing
channels computes exactly what masking them computes."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.cost import count_cost
from pyprune_ext.graph import (Axis, ChannelwiseSpec, GraphAnalysisWarning, LayerSpec, dependency_groups,
                               register_layer, registered_layers, remove_channels, spec_for, unregister_layer,
                               zero_channels)
from pyprune_ext.taylor import Target, TaylorPruner, apply_plan
from pyprune_ext.taylor.report import estimate_cost


def prunable(groups):
    return [(i, g) for i, g in enumerate(groups) if g.prunable and g.exact_masking]


def dropped(group) -> torch.Tensor:
    """About a third of the group's channels, never all of them (deterministic)."""
    count = max(1, min(group.size - 1, round(0.3 * group.size)))
    return torch.arange(group.size - count, group.size) if group.size > 1 else torch.tensor([], dtype=torch.long)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def assert_removed_equals_masked(model: nn.Module, x, *, expect_groups: int = 1):
    """Masks a third of every prunable group, removes the same channels on a copy,
    and compares the outputs (fp32, <= 1e-5 relative). Returns (groups, removed model)."""
    torch.manual_seed(0)
    model.eval()
    groups = dependency_groups(model, x)
    chosen = [(i, g) for i, g in prunable(groups) if g.size > 1]
    assert len(chosen) >= expect_groups, [(g.name, g.reason, g.exact_reason) for g in groups]
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    keep = {}
    for i, g in chosen:
        drop = dropped(g)
        zero_channels(masked, g, drop)
        keep[i] = torch.tensor([c for c in range(g.size) if c not in set(drop.tolist())])
    remove_channels(removed, groups, keep)
    with torch.no_grad():
        want, got = masked(x), removed(x)
    assert got.shape == want.shape
    assert relative_difference(want, got) <= 1e-5
    before = count_cost(model, x)
    alive = {i: torch.isin(torch.arange(g.size), keep[i]) for i, g in chosen}
    macs, params = estimate_cost(before, groups, alive, dict(model.named_modules()))
    after = count_cost(removed, x)
    assert (macs, params) == (after.total_macs, after.total_params)  # the estimate is exact
    assert after.total_params < before.total_params
    return groups, removed


def member_roles(group):
    return {(m.name, m.role, m.span) for m in group.members}


# -- grouped convolutions --------------------------------------------------------------------------
class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.grouped, self.bn_g = nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        x = F.relu(self.bn_g(self.grouped(x)))
        return self.head(x).mean((2, 3))


def randomize_norms(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_grouped_conv_loses_whole_groups():
    model = randomize_norms(GroupedNet())
    x = torch.randn(2, 3, 8, 8)
    groups, removed = assert_removed_equals_masked(model, x)
    unit = next(g for g in groups if ("grouped", "in", 2) in member_roles(g))
    assert unit.size == 4 and unit.prunable
    assert member_roles(unit) == {("a", "out", 2), ("bn_a", "norm", 2), ("grouped", "in", 2),
                                  ("grouped", "out", 4), ("bn_g", "norm", 4), ("head", "in", 4)}
    assert [(gate.name, gate.span) for gate in unit.gates] == [("bn_a", 2), ("bn_g", 4)]
    # a third of 4 groups: one group left the conv, with its 2 input and 4 output channels
    assert (removed.grouped.groups, removed.grouped.in_channels, removed.grouped.out_channels) == (3, 6, 12)
    assert removed.grouped.weight.shape == (12, 2, 3, 3) and removed.a.out_channels == 6


def test_depthwise_multiplier_conv_is_a_grouped_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(8, 2, 1), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    groups, removed = assert_removed_equals_masked(model, torch.randn(2, 3, 8, 8), expect_groups=2)
    assert removed[2].groups == removed[2].in_channels and removed[2].out_channels == 2 * removed[2].groups


# -- GroupNorm -------------------------------------------------------------------------------------------
class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.Conv2d(12, 4, 3)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x)))).mean((2, 3))


def test_groupnorm_prunes_whole_groups_exactly():
    model = randomize_norms(GroupNormNet())
    groups, removed = assert_removed_equals_masked(model, torch.randn(2, 3, 8, 8))
    unit = next(g for g in groups if any(m.name == "gn" for m in g.members))
    assert unit.size == 4 and unit.exact_masking
    assert member_roles(unit) == {("a", "out", 3), ("gn", "norm", 3), ("b", "in", 3)}
    assert (removed.gn.num_groups, removed.gn.num_channels) == (3, 9) and removed.b.in_channels == 9


def test_groupnorm_on_another_dim_is_refused_by_name():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gn = nn.Linear(4, 6), nn.GroupNorm(3, 3)

        def forward(self, x):  # (N, 3, L) with the Linear's channels on the last dim
            return self.gn(self.fc(x))

    groups = dependency_groups(Wrong(), torch.randn(2, 3, 4))
    fc = next(g for g in groups if any((m.name, m.role) == ("fc", "out") for m in g.members))
    assert not fc.prunable and "GroupNorm gn normalizes dim 1, but the prunable channels are on dim 2" in fc.reason


# -- transposed convolutions -------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_2d_output_channels_are_weight_dim_1(groups):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
                          nn.ConvTranspose2d(8, 6, 3, stride=2, groups=groups), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 1))
    randomize_norms(model)
    found, removed = assert_removed_equals_masked(model, torch.randn(2, 3, 7, 7), expect_groups=1)
    deconv = removed[2]
    assert deconv.weight.shape == (deconv.in_channels, deconv.out_channels // deconv.groups, 3, 3)
    assert deconv.in_channels < 8 or deconv.out_channels < 6


def test_conv_transpose_1d_and_depthwise():
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.ReLU(), nn.ConvTranspose1d(6, 6, 3, groups=6), nn.ReLU(),
                          nn.ConvTranspose1d(6, 4, 2), nn.ReLU(), nn.Conv1d(4, 3, 1))
    groups, removed = assert_removed_equals_masked(model, torch.randn(2, 2, 9), expect_groups=2)
    assert removed[2].groups == removed[2].in_channels == removed[2].out_channels < 6


# -- Embedding, PReLU -------------------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(20, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, tokens):
        return self.fc2(F.relu(self.fc1(self.emb(tokens)))).mean(1)


def test_embedding_columns_are_output_channels():
    tokens = torch.randint(0, 20, (2, 5))
    groups, removed = assert_removed_equals_masked(EmbeddingNet(), tokens, expect_groups=2)
    emb = next(g for g in groups if any(m.name == "emb" for m in g.members))
    assert member_roles(emb) == {("emb", "out", 1), ("fc1", "in", 1)}
    assert removed.emb.weight.shape == (20, removed.emb.embedding_dim) and removed.emb.embedding_dim < 8
    rows = {row.name: row for row in count_cost(removed, tokens).layers}
    assert rows["emb"].params == 20 * removed.emb.embedding_dim and rows["emb"].macs == 0


def test_per_channel_prelu_follows_its_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 3), nn.PReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.1, 0.4)
    groups, removed = assert_removed_equals_masked(model, torch.randn(2, 3, 8, 8), expect_groups=2)
    assert removed[1].num_parameters == removed[1].weight.numel() == removed[0].out_channels < 8
    assert removed[3].num_parameters == 1


# -- a user's layer, through the public API only -------------------------------------------------------------
class Scale(nn.Module):
    """A per-channel scale on (N, C, H, W) inputs: a user's layer pyprune_ext does not know."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class ScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.scale, self.b = nn.Conv2d(3, 8, 3), Scale(8), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(F.relu(self.scale(self.a(x)))).mean((2, 3))


@pytest.fixture
def scale_registered():
    register_layer(Scale, ChannelwiseSpec({"gamma": 0}, channel_dim=1))
    yield
    unregister_layer(Scale)


def test_unregistered_user_layer_reading_its_parameter_is_blocked_by_name():
    groups = dependency_groups(ScaleNet(), torch.randn(2, 3, 8, 8))
    a = next(g for g in groups if any((m.name, m.role) == ("a", "out") for m in g.members))
    assert not a.prunable and "comes from the tensor attribute 'scale.gamma'" in a.reason


def test_registered_user_layer_is_pruned_with_its_channels(scale_registered):
    x = torch.randn(2, 3, 8, 8)
    groups, removed = assert_removed_equals_masked(ScaleNet(), x)
    a = next(g for g in groups if any((m.name, m.role) == ("a", "out") for m in g.members))
    assert member_roles(a) == {("a", "out", 1), ("scale", "channel", 1), ("b", "in", 1)}
    assert removed.scale.gamma.shape == (removed.a.out_channels,)
    assert spec_for(removed.scale) is registered_layers()[Scale]


def test_register_layer_refuses_bad_input():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(int, ChannelwiseSpec({"w": 0}))
    with pytest.raises(TypeError, match="LayerSpec instance"):
        register_layer(Scale, ChannelwiseSpec)
    with pytest.raises(ValueError, match="Conv2d is already registered.*replace=True"):
        register_layer(nn.Conv2d, ChannelwiseSpec({"weight": 0}))
    with pytest.raises(KeyError, match="not registered"):
        unregister_layer(Scale)


class SwappedChannels(LayerSpec):
    """A deliberately incomplete spec: no ``analyse``."""

    def axes(self, module):
        return {"channel": Axis(module.gamma.shape[0], {"gamma": 0})}


def test_incomplete_spec_fails_naming_the_method():
    register_layer(Scale, SwappedChannels())
    try:
        with pytest.raises(NotImplementedError, match="SwappedChannels.analyse"):
            dependency_groups(ScaleNet(), torch.randn(2, 3, 8, 8))
    finally:
        unregister_layer(Scale)


def test_subclass_overriding_forward_is_not_covered_by_its_base_spec():
    class LayerNorm2d(nn.LayerNorm):  # normalises NCHW over channels: not what LayerNorm computes
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    assert spec_for(LayerNorm2d(4)) is None
    assert spec_for(LayerNorm2d(4), any_subclass=True) is spec_for(nn.LayerNorm(4))


# -- Taylor pruning and plans on the new layer types -------------------------------------------------------------
class GroupsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.g, self.bn = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.a(x)))
        x = F.relu(self.bn(self.g(x)))
        return self.fc(x.mean((2, 3)))



@pytest.mark.parametrize("criterion", ["fo_bn", "fo_gate", "fo_weight"])
def test_taylor_prunes_grouped_convs_and_groupnorm(criterion):
    torch.manual_seed(0)

    model = GroupsNet()
    x = torch.randn(4, 1, 6, 6)
    pruner = TaylorPruner(model, x, criterion, target=Target.channels(2), every=1, prune_per_step=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    while not pruner.done:
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        pruner.step()
        optimizer.step()
    assert pruner.channels_removed == 2 and [g.size for g in pruner.groups if g.prunable] == [4]
    model.eval()
    with torch.no_grad():
        masked = model(x)
    plan = pruner.plan()
    small = pruner.finalize()
    with torch.no_grad():
        assert relative_difference(masked, small(x)) <= 1e-5
    rebuilt = apply_plan(GroupsNet(), x, plan)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in small.parameters()]
    rebuilt.load_state_dict(small.state_dict())
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), small(x))
    report = pruner.report()
    assert report.measured and report.params_after < report.params_before
    assert (small.g.groups, small.gn.num_groups, small.fc.in_features) == (2, 2, 4)


def test_no_warning_for_supported_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphAnalysisWarning)
        dependency_groups(randomize_norms(GroupedNet()), torch.randn(1, 3, 8, 8))
        dependency_groups(GroupNormNet(), torch.randn(1, 3, 8, 8))
        dependency_groups(EmbeddingNet(), torch.randint(0, 20, (1, 4)))
