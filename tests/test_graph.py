"""Dependency groups and channel surgery (pyprune_ext.graph) on small hand-written models.

The central check (``check_prune``): remove random channels from every prunable
exact-masking group on one copy, zero the same channels on another, and require
identical outputs in eval mode with random, non-trivial BatchNorm statistics;
then the pruned model is smaller, re-analyses to the kept sizes, round-trips its
state_dict and trains a step. torchvision models are in test_graph_torchvision.py.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import (ChannelGroup, GraphAnalysisWarning, Member, dependency_groups, remove_channels,
                               zero_channels)

RMSNorm = getattr(nn, "RMSNorm", nn.LayerNorm)  # torch >= 2.4

# -- helpers (also used by test_graph_torchvision.py) ---------------------------------------------


@pytest.fixture(autouse=True)
def plain_cpu_convolutions(monkeypatch):
    """Speed only, the results are the same. oneDNN builds a new primitive for
    every new conv shape (tens of ms each on these CPUs) and pruned models are
    all new shapes: the reference kernels are much faster here (resnet50 check:
    13 s -> 1.4 s). One thread: these small tensors gain nothing from two, and
    on a busy 2-core machine OpenMP spinning made mobilenet_v2's check 10x slower."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm/LayerNorm state, so that a wrong channel mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, RMSNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    return model


def random_plan(groups: list[ChannelGroup], seed: int = 0, exact_only: bool = True) -> dict[int, torch.Tensor]:
    """Keeps a random non-empty strict subset of every prunable group (of size > 1)."""
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for i, g in enumerate(groups):
        if g.prunable and g.size > 1 and (g.exact_masking or not exact_only):
            count = int(torch.randint(1, g.size, (1,), generator=gen))
            plan[i] = torch.randperm(g.size, generator=gen)[:count].sort().values
    return plan


def dropped(group: ChannelGroup, kept: torch.Tensor) -> torch.Tensor:
    everything = torch.arange(group.size)
    return everything[~torch.isin(everything, kept)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: nn.Module, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def check_prune(model: nn.Module, x, seed: int = 0, groups=None, tol: float = 1e-5):
    """Masked == pruned, smaller, reloadable, trainable. Returns (groups, plan, pruned)."""
    randomize_norms(model, seed)
    groups = dependency_groups(model, x) if groups is None else groups
    plan = random_plan(groups, seed)
    assert plan, "the model has no prunable exact-masking group: the check would be vacuous"
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    for i, kept in plan.items():
        zero_channels(masked, groups[i], dropped(groups[i], kept))
    remove_channels(pruned, groups, plan)

    reference, want, got = outputs(model, x), outputs(masked, x), outputs(pruned, x)
    assert (want - reference).abs().max() > 1e-4, "masking changed nothing: the comparison is meaningless"
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= tol
    assert n_params(pruned) < n_params(model)

    # every affected module was rebuilt with the same type
    before = dict(model.named_modules())
    for name, module in pruned.named_modules():
        assert type(module) is type(before[name])

    # the pruned model re-analyses to the kept sizes
    again = {g.name: g.size for g in dependency_groups(pruned, x)}
    for i, kept in plan.items():
        if groups[i].name not in again:  # a grouped conv left with one group is a plain conv: new groups
            assert len(kept) == 1 and any(m.span > 1 for m in groups[i].members), groups[i].name
            continue
        assert again[groups[i].name] == len(kept), groups[i].name

    # state_dict: saves and loads strictly into a copy of the pruned model
    buffer = io.BytesIO()
    torch.save(pruned.state_dict(), buffer)
    buffer.seek(0)
    clone = copy.deepcopy(pruned)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    clone.load_state_dict(torch.load(buffer))
    assert torch.equal(outputs(clone, x), got)

    # one training step
    pruned.train()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.01)
    loss = pruned(x).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
    snapshot = [p.detach().clone() for p in pruned.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(snapshot, pruned.parameters()))
    return groups, plan, pruned


def by_name(groups: list[ChannelGroup], name: str) -> ChannelGroup:
    found = [g for g in groups if g.name == name]
    assert len(found) == 1, f"{name!r} not in {[g.name for g in groups]}"
    return found[0]


def with_member(groups: list[ChannelGroup], name: str, role: str) -> ChannelGroup:
    found = [g for g in groups if any(m.name == name and m.role == role for m in g.members)]
    assert len(found) == 1, f"{name} ({role}) is in {len(found)} groups"
    return found[0]


def roles(group: ChannelGroup) -> set[tuple[str, str]]:
    return {(m.name, m.role) for m in group.members}


# -- test models ---------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 32), nn.Linear(32, 24), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 layout (3 stages x 3 blocks), narrow for speed."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i and j == 0) else 1) for j in range(3)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1)
        return self.fc(x)


class ConcatNet(nn.Module):
    """Two branches concatenated, a BN over the concatenation, flatten into a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 7, 3, padding=1)
        self.fc = nn.Linear(7 * 4 * 4, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        y = F.max_pool2d(self.c(F.relu(self.bn(y))), 2)
        return self.fc(torch.flatten(y, 1))


class SelfConcat(nn.Module):
    """cat([y, y]): the consumer sees each producer channel twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(torch.cat((y, y), 1)).mean((2, 3))


class InvertedResidual(nn.Module):
    def __init__(self, c, expand):
        super().__init__()
        self.expand = nn.Conv2d(c, c * expand, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c * expand)
        self.dw = nn.Conv2d(c * expand, c * expand, 3, padding=1, groups=c * expand, bias=False)
        self.bn2 = nn.BatchNorm2d(c * expand)
        self.project = nn.Conv2d(c * expand, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(y))


class DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2 = InvertedResidual(8, 3), InvertedResidual(8, 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


class TransformerMLP(nn.Module):
    """x + Linear2(GELU(Linear1(LayerNorm(x)))) on (N, L, C), between an embedding
    Linear and a head, so the residual stream is prunable (and not exact: LayerNorm)."""

    def __init__(self, d_in=6, c=12, hidden=24, out=3, norm=nn.LayerNorm):
        super().__init__()
        self.embed = nn.Linear(d_in, c)
        self.norm = norm(c)
        self.linear1, self.linear2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.head = nn.Linear(c, out)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.linear2(F.gelu(self.linear1(self.norm(x))))
        return self.head(x.mean(1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 3)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if y.sum() > 0:
            y = F.relu(y)
        else:
            y = y * 0.5
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 4).flatten(1))


class Straight(Branchy):
    """Branchy with the branch the example input takes, written without control flow."""

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 4).flatten(1))


class Rolled(nn.Module):
    """torch.roll along the channels: an op the analysis does not know."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.c(torch.roll(F.relu(self.b(y)), 1, dims=1))


def x_image(size=16, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- group formation ---------------------------------------------------------------------------


def test_mlp_groups_and_prune():
    x = torch.randn(4, 20)
    groups, _, pruned = check_prune(MLP(), x)
    assert [(g.name, g.size, g.prunable) for g in groups] == [
        ("inputs of: fc1", 20, False), ("fc1", 32, True), ("fc2", 24, True), ("fc3", 5, False)]
    assert roles(by_name(groups, "fc1")) == {("fc1", "out"), ("fc2", "in")}
    assert by_name(groups, "fc3").reason == "feeds the model output"
    assert by_name(groups, "fc1").gates[0].name == "fc1" and by_name(groups, "fc1").gates[0].channel_dim == -1
    assert pruned.fc1.out_features == pruned.fc2.in_features < 32


def test_resnet20_residual_groups():
    model = ResNet20()
    groups = dependency_groups(model, x_image())
    stage1 = with_member(groups, "conv1", "out")
    expected = {("conv1", "out"), ("bn1", "norm")}
    for j in range(3):
        expected |= {(f"layer1.{j}.conv1", "in"), (f"layer1.{j}.conv2", "out"), (f"layer1.{j}.bn2", "norm")}
    expected |= {("layer2.0.conv1", "in"), ("layer2.0.shortcut.0", "in")}
    assert roles(stage1) == expected
    assert stage1.name == "residual: conv1, layer1.0.conv2, layer1.1.conv2, layer1.2.conv2"
    assert stage1.prunable and stage1.exact_masking and stage1.size == 8
    # one gate per producer, each on the BatchNorm that follows it
    assert [(gate.name, gate.producer) for gate in stage1.gates] == [
        ("bn1", "conv1")] + [(f"layer1.{j}.bn2", f"layer1.{j}.conv2") for j in range(3)]
    assert {m.name for m in stage1.bn} == {"bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"}
    stage2 = with_member(groups, "layer2.0.shortcut.0", "out")
    assert ("layer2.0.conv2", "out") in roles(stage2) and ("layer3.0.shortcut.0", "in") in roles(stage2)
    inner = by_name(groups, "layer2.1.conv1")
    assert roles(inner) == {("layer2.1.conv1", "out"), ("layer2.1.bn1", "norm"), ("layer2.1.conv2", "in")}
    assert not by_name(groups, "fc").prunable
    assert not with_member(groups, "conv1", "in").prunable  # the image channels
    # every conv/BN axis is in exactly one group
    seen = [(m.name, m.role) for g in groups for m in g.members]
    assert len(seen) == len(set(seen))


def test_resnet20_prune():
    check_prune(ResNet20(), x_image())


def test_concat_offsets_and_flatten_span():
    model = ConcatNet()
    groups = dependency_groups(model, x_image(8))
    ga, gb = by_name(groups, "a"), by_name(groups, "b")
    assert set(ga.members) == {Member("a", "out", 0), Member("bn", "norm", 0), Member("c", "in", 0)}
    assert set(gb.members) == {Member("b", "out", 0), Member("bn", "norm", 6), Member("c", "in", 6)}
    assert set(by_name(groups, "c").members) == {Member("c", "out", 0), Member("fc", "in", 0, span=16)}
    # b's output feeds a BN only through the concat: gate on b itself, not on the shared BN
    assert gb.gates[0].name == "b" and gb.bn == []
    check_prune(model, x_image(8))


def test_self_concat_couples_both_copies():
    model = SelfConcat()
    groups = dependency_groups(model, x_image(8))
    assert set(by_name(groups, "a").members) == {Member("a", "out", 0), Member("b", "in", 0), Member("b", "in", 5)}
    _, plan, pruned = check_prune(model, x_image(8))
    assert pruned.b.in_channels == 2 * len(plan[groups.index(by_name(groups, "a"))])


def test_depthwise_couples_input_and_output():
    model = DepthwiseNet()
    groups = dependency_groups(model, x_image(8))
    hidden = by_name(groups, "block1.expand")
    assert roles(hidden) == {("block1.expand", "out"), ("block1.bn1", "norm"), ("block1.dw", "depthwise"),
                             ("block1.bn2", "norm"), ("block1.project", "in")}
    assert [g.name for g in hidden.gates] == ["block1.bn1", "block1.bn2"]
    stream = with_member(groups, "stem", "out")
    assert stream.name == "residual: stem, block1.project, block2.project"
    _, _, pruned = check_prune(model, x_image(8))
    dw = pruned.block1.dw
    assert dw.groups == dw.in_channels == dw.out_channels == pruned.block1.expand.out_channels < 24


@pytest.mark.parametrize("norm", [nn.LayerNorm, RMSNorm], ids=["LayerNorm", "RMSNorm"])
def test_transformer_mlp_layernorm_groups(norm):
    model = randomize_norms(TransformerMLP(norm=norm))
    x = torch.randn(2, 5, 6)
    groups = dependency_groups(model, x)
    stream = with_member(groups, "norm", "norm")
    assert roles(stream) == {("embed", "out"), ("norm", "norm"), ("linear1", "in"), ("linear2", "out"),
                             ("head", "in")}
    assert stream.prunable and not stream.exact_masking
    assert f"{norm.__name__} norm normalizes over the channels" in stream.exact_reason
    assert all(gate.channel_dim == -1 for gate in stream.gates)
    hidden = by_name(groups, "linear1")
    assert hidden.exact_masking and roles(hidden) == {("linear1", "out"), ("linear2", "in")}

    # exact groups: masked == pruned
    check_prune(model, x)

    # the LayerNorm group: the pruned model computes the block on the kept channels
    i = groups.index(stream)
    kept = torch.tensor([0, 3, 4, 7, 11])
    pruned = remove_channels(copy.deepcopy(model), groups, {i: kept})
    assert pruned.norm.normalized_shape == (5,) and pruned.norm.weight.shape == (5,)
    m = model
    with torch.no_grad():
        h = F.linear(x, m.embed.weight[kept], m.embed.bias[kept])
        if norm is nn.LayerNorm:
            n = F.layer_norm(h, (5,), m.norm.weight[kept], m.norm.bias[kept], m.norm.eps)
        else:
            n = F.rms_norm(h, (5,), m.norm.weight[kept], m.norm.eps)
        h = h + F.linear(F.gelu(F.linear(n, m.linear1.weight[:, kept], m.linear1.bias)),
                         m.linear2.weight[kept], m.linear2.bias[kept])
        want = F.linear(h.mean(1), m.head.weight[:, kept], m.head.bias)
    torch.testing.assert_close(outputs(pruned, x), want, atol=1e-5, rtol=0)


def test_model_input_and_output_channels_are_unprunable():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())  # the conv's output is the model's output
    groups = dependency_groups(model, x_image(4))
    assert [(g.name, g.prunable) for g in groups] == [("inputs of: 0", False), ("0", False)]
    assert groups[0].reason == "comes from the model input 'input'"
    assert groups[1].reason == "feeds the model output"


def test_ignore_makes_output_channels_unprunable():
    model = ResNet20()
    groups = dependency_groups(model, x_image(), ignore=[model.layer1[0].conv2, model.layer2[1].conv1])
    stage1 = with_member(groups, "conv1", "out")
    assert not stage1.prunable and "ignored module layer1.0.conv2" in stage1.reason
    assert not by_name(groups, "layer2.1.conv1").prunable
    assert by_name(groups, "layer1.0.conv1").prunable  # the ignored conv's input side stays prunable
    with pytest.raises(ValueError, match="not a submodule"):
        dependency_groups(model, x_image(), ignore=[nn.Conv2d(1, 1, 1)])


# -- what the analysis refuses ---------------------------------------------------------------------


def test_unknown_op_warns_and_blocks():
    model = Rolled()
    with pytest.warns(GraphAnalysisWarning, match=r"unknown op torch\.roll at node 'roll'"):
        groups = dependency_groups(model, x_image(12))
    rolled = by_name(groups, "b")
    assert not rolled.prunable and "torch.roll" in rolled.reason
    after = with_member(groups, "c", "in")
    assert not after.prunable and "torch.roll" in after.reason
    assert by_name(groups, "a").prunable  # channels that do not reach the roll stay prunable
    with pytest.raises(ValueError, match="not prunable.*torch.roll"):
        remove_channels(model, groups, {groups.index(rolled): torch.tensor([0])})
    with pytest.raises(ValueError, match="not prunable"):
        zero_channels(model, rolled, torch.tensor([0]))


class UnknownModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.lrn, self.b = nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(2), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(self.lrn(F.relu(self.a(x))))


def test_unknown_module_warns_and_blocks():
    with pytest.warns(GraphAnalysisWarning, match="unknown module lrn"):
        groups = dependency_groups(UnknownModule(), x_image(8))
    assert not by_name(groups, "a").prunable and "LocalResponseNorm" in by_name(groups, "a").reason


class Selecting(nn.Module):
    """split / chunk / slicing along the channels, a grouped conv, a hard-coded view."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 1)
        self.c1, self.c2 = nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 1)
        self.grouped = nn.Conv2d(6, 6, 1, groups=2)
        self.d, self.e = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), 4, dim=1)
        y = self.c1(p) + self.c2(q)
        g = self.grouped(self.b(F.relu(self.a(x))))
        z = self.d(x).view(x.size(0), 6, 36)            # the channel count is written in the code
        w = self.e(x)[:, :, 1:-1, 1:-1].flatten(1)     # spatial slicing: fine
        return y.mean((2, 3)), g[:, :4].sum((2, 3)), z.sum(2), w


def test_selecting_ops_block_with_reasons():
    model = Selecting()
    groups = dependency_groups(model, x_image(6))
    split = [g for g in groups if ("a", "out") in roles(g)]
    assert len(split) == 2 and all(not g.prunable and "torch.split at node 'split'" in g.reason for g in split)
    assert [g.name for g in split] == ["a[0:4]", "a[4:8]"]
    # a grouped conv loses whole groups: its input channels, its output channels and the
    # channels feeding it are one unit per group (here blocked by the fixed slice g[:, :4])
    grouped = with_member(groups, "b", "out")
    assert {("grouped", "in"), ("grouped", "out")} <= set(roles(grouped)) and grouped.size == 2
    assert {m.span for m in grouped.members} == {3}
    assert not grouped.prunable and "operator.getitem at node" in grouped.reason
    assert "takes a fixed part" in grouped.reason
    assert by_name(groups, "residual: c1, c2").reason == "feeds the model output"
    d = by_name(groups, "d")
    assert not d.prunable and "channel count (6) written" in d.reason
    e = by_name(groups, "e")
    assert e.reason == "feeds the model output"  # not blocked by the spatial slice


class ViewFlatten(nn.Module):
    """x.view(x.size(0), -1) into a Linear: span = H*W."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 10), nn.Linear(10, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc2(F.relu(self.fc1(y.view(y.size(0), -1))))


def test_view_flatten_span_and_prune():
    model = ViewFlatten()
    groups = dependency_groups(model, x_image(6))
    g = by_name(groups, "conv")
    assert Member("fc1", "in", 0, span=16) in g.members and g.gates[0].name == "bn"
    _, _, pruned = check_prune(model, x_image(6))
    assert pruned.fc1.in_features == 16 * pruned.conv.out_channels


class SharedConv(nn.Module):
    """One conv applied twice: its input and output channels are one group."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.b(F.relu(self.a(x))))
        return self.c(F.relu(self.b(y))).mean((2, 3))


def test_module_registered_under_two_names():
    model = SharedConv()
    model.alias = model.b  # same module object, second name
    groups = dependency_groups(model, x_image(8))
    assert all(m.name != "alias" for g in groups for m in g.members)
    remove_channels(model, groups, {groups.index(with_member(groups, "b", "out")): torch.tensor([1, 4])})
    assert model.alias is model.b and model.b.out_channels == 2
    model(x_image(8))


class DynamicReshape(nn.Module):
    """Sizes read from the tensor (not written in the code) stay prunable under fx."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 2)

    def forward(self, x):
        y = F.relu(self.a(x))
        n, c, h, w = y.shape
        return self.b(y.reshape(n, c, h * w).permute(0, 2, 1)).mean(1)


def test_dynamic_reshape_is_followed():
    groups, _, _ = check_prune(DynamicReshape(), x_image(6))
    assert roles(by_name(groups, "a")) == {("a", "out"), ("b", "in")}


def test_module_called_twice():
    groups, _, _ = check_prune(SharedConv(), x_image(8))
    g = with_member(groups, "b", "out")
    assert roles(g) == {("a", "out"), ("b", "out"), ("b", "in"), ("c", "in")}


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.d = nn.Linear(6, 6)
        self.d.weight = self.b.weight  # tied

    def forward(self, x):
        return self.c(self.d(F.relu(self.b(F.relu(self.a(x))))))


def test_tied_weights_are_unprunable():
    groups = dependency_groups(TiedWeights(), torch.randn(3, 4))
    g = with_member(groups, "b", "in")
    assert not g.prunable and "shared with another module" in g.reason


# -- fallback tracing ----------------------------------------------------------------------------


def test_fallback_tracer_matches_fx():
    model = Branchy()
    x = x_image(8)
    with torch.no_grad():
        model.bn1.bias.fill_(1.0)  # the example takes the ReLU branch, as Straight does
    with pytest.warns(GraphAnalysisWarning, match="fallback"):
        groups = dependency_groups(model, x)
    twin = Straight()
    twin.load_state_dict(model.state_dict())
    expected = dependency_groups(twin, x)
    def summary(gs):
        return [(g.name, g.size, g.prunable, g.reason, g.members, g.gates, g.bn) for g in gs]

    assert summary(groups) == summary(expected)


def test_fallback_prunes_the_branchy_model():
    model = randomize_norms(Branchy())
    x = x_image(8)
    with torch.no_grad():  # make sure the example takes the ReLU branch, as Straight does
        model.bn1.bias.fill_(1.0)
    with pytest.warns(GraphAnalysisWarning, match="fallback"):
        groups = dependency_groups(model, x)
    plan = random_plan(groups, seed=3)
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    for i, kept in plan.items():
        zero_channels(masked, groups[i], dropped(groups[i], kept))
    remove_channels(pruned, groups, plan)
    torch.testing.assert_close(outputs(pruned, x), outputs(masked, x), atol=1e-5, rtol=0)
    assert n_params(pruned) < n_params(model)


def test_fallback_sees_unknown_ops_too():
    class BranchyRoll(Rolled):
        def forward(self, x):
            y = F.relu(self.a(x))
            if y.mean() > -1e9:
                y = torch.roll(F.relu(self.b(y)), 1, dims=1)
            return self.c(y)

    with pytest.warns(GraphAnalysisWarning) as record:
        groups = dependency_groups(BranchyRoll(), x_image(12))
    messages = [str(w.message) for w in record]
    assert any("fallback" in m for m in messages) and any("torch.roll" in m for m in messages)
    assert not by_name(groups, "b").prunable and by_name(groups, "a").prunable


# -- bad plans ----------------------------------------------------------------------------------


@pytest.fixture
def mlp_groups():
    model = MLP()
    return model, dependency_groups(model, torch.randn(2, 20))


@pytest.mark.parametrize("keep, message", [
    ({7: torch.tensor([0])}, r"group index 7, but there are 4 groups"),
    ({1: torch.tensor([0, 32])}, r"channel 32, outside 0\.\.31"),
    ({1: torch.tensor([-1, 3])}, r"channel -1, outside"),
    ({1: torch.tensor([2, 5, 2])}, r"channel 2 more than once"),
    ({1: torch.tensor([], dtype=torch.long)}, r"keeps no channel: removing every channel of group 'fc1'"),
    ({3: torch.tensor([0, 1])}, r"group 3 \('fc3'\) is not prunable: feeds the model output"),
    ({0: torch.tensor([0])}, r"not prunable: comes from the model input"),
    ({1: torch.tensor([0.0, 1.0])}, r"integer channel indices"),
    ({1: torch.tensor([[0, 1]])}, r"1-D"),
    ([torch.tensor([0])], r"keep must map group indices"),
])
def test_bad_plans_raise(mlp_groups, keep, message):
    model, groups = mlp_groups
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        remove_channels(model, groups, keep)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed


def test_plan_checked_before_any_change(mlp_groups):
    model, groups = mlp_groups
    with pytest.raises(ValueError):
        remove_channels(model, groups, {1: torch.tensor([0, 1]), 2: torch.tensor([99])})
    assert model.fc1.out_features == 32 and model.fc2.in_features == 32


def test_stale_and_overlapping_groups(mlp_groups):
    model, groups = mlp_groups
    with pytest.raises(ValueError, match="groups 1 and 2 both contain channels of fc1"):
        remove_channels(copy.deepcopy(model), [groups[0], groups[1], groups[1]],
                        {1: torch.tensor([0]), 2: torch.tensor([1])})
    remove_channels(model, groups, {1: torch.arange(10)})
    with pytest.raises(ValueError, match="stale: fc1 .* has 10 channels but the analysis saw 32"):
        remove_channels(model, groups, {1: torch.arange(5)})
    with pytest.raises(ValueError, match="stale"):
        zero_channels(model, groups[1], torch.tensor([0]))


def test_keep_everything_changes_nothing(mlp_groups):
    model, groups = mlp_groups
    fc1 = model.fc1
    remove_channels(model, groups, {1: torch.arange(32), 2: [0, 5, 1, 3]})  # unsorted lists are fine
    assert model.fc1 is fc1 and model.fc2.out_features == 4


# -- what surgery preserves -------------------------------------------------------------------------


def test_surgery_preserves_dtype_format_grad_and_mode():
    model = ResNet20().to(torch.float64).to(memory_format=torch.channels_last)
    model.train()
    model.layer1[0].bn1.eval()
    model.layer1[0].conv1.weight.requires_grad_(False)
    x = x_image().double()
    groups = dependency_groups(model, x)
    assert model.training and not model.layer1[0].bn1.training  # tracing restored the modes
    remove_channels(model, groups, random_plan(groups))
    conv = model.layer1[0].conv1
    assert conv.out_channels < 8 and conv.weight.dtype == torch.float64
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.requires_grad and model.layer1[0].conv2.weight.requires_grad
    assert model.training and not model.layer1[0].bn1.training and model.layer1[1].bn1.training
    assert isinstance(conv.weight, nn.Parameter) and conv.weight.grad is None
    model(x).sum().backward()


def test_tracing_does_not_touch_batchnorm_statistics():
    model = ResNet20().train()
    before = copy.deepcopy(model.state_dict())
    dependency_groups(model, x_image())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_masked_layers_keep_their_mask():
    from pyprune_ext.nn import MaskedConv2d, mask_model

    model = ResNet20()
    gen = torch.Generator().manual_seed(0)
    mask_model(model, {name: torch.rand(m.weight.shape, generator=gen) < 0.7
                       for name, m in model.named_modules() if isinstance(m, nn.Conv2d)})
    groups, plan, pruned = check_prune(model, x_image())
    conv = pruned.layer1[0].conv1
    assert isinstance(conv, MaskedConv2d) and conv.mask.shape == conv.weight.shape
    assert bool((conv.weight[~conv.mask] == 0).all())
    rows = plan[groups.index(by_name(groups, "layer1.0.conv1"))]
    columns = plan[groups.index(with_member(groups, "layer1.0.conv1", "in"))]
    assert torch.equal(conv.mask, model.layer1[0].conv1.mask[rows][:, columns])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a mixed-device model")
def test_mixed_devices():
    model = ConcatNet()
    model.c.cuda()
    model.fc.cuda()

    class Split(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            m = self.inner
            y = torch.cat([F.relu(m.a(x)), m.b(x)], dim=1)
            y = F.max_pool2d(m.c(F.relu(m.bn(y)).cuda()), 2)
            return m.fc(torch.flatten(y, 1))

    wrapped = Split(model)
    groups = dependency_groups(wrapped, x_image(8))
    remove_channels(wrapped, groups, random_plan(groups))
    assert model.a.weight.device.type == "cpu" and model.c.weight.device.type == "cuda"
    assert wrapped(x_image(8)).device.type == "cuda"


# -- property: random widths, random plans ------------------------------------------------------------


def test_random_conv_stacks_match():
    """Random widths, residual adds where shapes allow, traced by fx or (with a
    data-dependent branch) by the fallback: masked == pruned for random plans."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    class Net(nn.Module):
        def __init__(self, widths, residual, branchy):
            super().__init__()
            self.branchy = branchy
            self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:]))
            self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths[1:])
            self.adds = [residual and a == b for a, b in zip(widths, widths[1:])]
            self.fc = nn.Linear(widths[-1] * 4, 3)

        def forward(self, x):
            y = F.relu(self.stem(x))
            if self.branchy and y.sum() > -1e30:  # data-dependent: fx cannot trace this
                y = y * 2.0
            for conv, bn, add in zip(self.convs, self.bns, self.adds):
                z = F.relu(bn(conv(y)))
                y = y + z if add else z
            return self.fc(F.adaptive_max_pool2d(y, 2).flatten(1))

    @hypothesis.settings(max_examples=16, deadline=None, derandomize=True)
    @hypothesis.given(widths=st.lists(st.integers(2, 7), min_size=1, max_size=4), seed=st.integers(0, 10_000),
                      residual=st.booleans(), branchy=st.booleans())
    def run(widths, seed, residual, branchy):
        torch.manual_seed(seed)
        model = randomize_norms(Net(widths, residual, branchy), seed)
        x = x_image(6, seed=seed)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            groups = dependency_groups(model, x)
        messages = [str(w.message) for w in record if issubclass(w.category, GraphAnalysisWarning)]
        assert messages == (messages[:1] if branchy else []) and all("fallback" in m for m in messages)
        assert sum(g.prunable for g in groups) == 1 + sum(1 for a in model.adds if not a)
        plan = random_plan(groups, seed)
        masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
        for i, kept in plan.items():
            zero_channels(masked, groups[i], dropped(groups[i], kept))
        remove_channels(pruned, groups, plan)
        torch.testing.assert_close(outputs(pruned, x), outputs(masked, x), atol=1e-5, rtol=0)

    run()


def test_single_channel_left_is_still_followed(recwarn):
    """Pruning a group down to one channel: the re-analysis still follows the
    flatten (a single channel's dim cannot be seen in index values)."""
    model = ConcatNet()
    groups = dependency_groups(model, x_image(8))
    plan = {groups.index(by_name(groups, name)): torch.tensor([1]) for name in ("a", "c")}
    remove_channels(model, groups, plan)
    again = dependency_groups(model, x_image(8))
    assert not [w for w in recwarn if issubclass(w.category, GraphAnalysisWarning)]
    assert by_name(again, "c").members == [Member("c", "out", 0), Member("fc", "in", 0, span=16)]
    assert by_name(again, "a").size == 1 and by_name(again, "a").prunable


class Writes(nn.Module):
    def __init__(self, fixed_channel):
        super().__init__()
        self.fixed_channel = fixed_channel
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = F.relu(self.a(x)).clone()  # (autograd: relu's output must not be written to)
        if self.fixed_channel:
            y[:, 0] = 0.0        # which channel is "0" changes when channels go
        else:
            y[:, :, 0, :] = 0.0  # the same rows of every channel: fine
        return self.b(y).mean((2, 3))


@pytest.mark.parametrize("fixed_channel", [True, False])
def test_item_assignment(fixed_channel):
    with pytest.warns(GraphAnalysisWarning, match="fallback"):  # fx cannot trace item assignment
        groups = dependency_groups(Writes(fixed_channel), x_image(6))
    a = by_name(groups, "a")
    assert a.prunable != fixed_channel
    if fixed_channel:
        assert "writes into a fixed part of the channels" in a.reason
    else:
        with pytest.warns(GraphAnalysisWarning, match="fallback"):
            check_prune(Writes(False), x_image(6))
