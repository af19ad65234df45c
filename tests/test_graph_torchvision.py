"""Dependency groups and channel surgery on real torchvision models (weights=None).

Small inputs keep each model well under the time budget of a 2-core CPU.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from pyprune_ext.graph import dependency_groups
from test_graph import by_name, check_prune, plain_cpu_convolutions, roles, with_member  # noqa: F401 (fixture)

torchvision = pytest.importorskip("torchvision")


def image(size, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_partition(groups) -> None:
    """The groups partition every module axis they touch: each feature of each
    (module, role) belongs to exactly one group channel."""
    covered = defaultdict(list)
    for g in groups:
        for m, extent in zip(g.members, g.extents):
            covered[(m.name, m.role, extent)].extend(range(m.offset * m.span, (m.offset + g.size) * m.span))
    for (name, role, extent), positions in covered.items():
        assert sorted(positions) == list(range(extent)), (name, role)


def test_resnet18():
    model = torchvision.models.resnet18(weights=None)
    x = image(64)
    groups = dependency_groups(model, x)
    assert_partition(groups)
    stage1 = with_member(groups, "conv1", "out")
    assert stage1.name == "residual: conv1, layer1.0.conv2, layer1.1.conv2"
    assert roles(stage1) == {("conv1", "out"), ("bn1", "norm"), ("layer1.0.conv1", "in"), ("layer1.0.conv2", "out"),
                             ("layer1.0.bn2", "norm"), ("layer1.1.conv1", "in"), ("layer1.1.conv2", "out"),
                             ("layer1.1.bn2", "norm"), ("layer2.0.conv1", "in"), ("layer2.0.downsample.0", "in")}
    assert stage1.prunable and stage1.exact_masking and stage1.size == 64
    assert [gate.name for gate in stage1.gates] == ["bn1", "layer1.0.bn2", "layer1.1.bn2"]
    stage4 = with_member(groups, "fc", "in")
    assert ("layer4.0.downsample.0", "out") in roles(stage4) and stage4.prunable
    fc = by_name(groups, "fc")
    assert not fc.prunable and fc.reason == "feeds the model output"
    assert sum(g.prunable for g in groups) == 12  # 4 residual streams + 8 inner convs
    _, _, pruned = check_prune(model, x)
    assert pruned.fc.in_features < 512 and pruned.fc.out_features == 1000


def test_resnet50():
    model = torchvision.models.resnet50(weights=None)
    x = image(64)
    groups = dependency_groups(model, x)
    assert_partition(groups)
    inner = by_name(groups, "layer2.1.conv2")
    assert roles(inner) == {("layer2.1.conv2", "out"), ("layer2.1.bn2", "norm"), ("layer2.1.conv3", "in")}
    stream = with_member(groups, "layer3.0.downsample.0", "out")
    assert {f"layer3.{j}.conv3" for j in range(6)} <= {m.name for m in stream.members if m.role == "out"}
    assert sum(g.prunable for g in groups) == 4 + 16 * 2 + 1  # streams, two inner convs per block, stem
    check_prune(model, x)


def test_vgg11_bn():
    model = torchvision.models.vgg11_bn(weights=None)
    x = image(32)
    groups = dependency_groups(model, x)
    assert_partition(groups)
    last = by_name(groups, "features.25")
    # adaptive pooling to 7x7, flatten: each channel is 49 features of the first Linear
    assert ("classifier.0", "in") in roles(last)
    assert next(m for m in last.members if m.name == "classifier.0").span == 49
    assert [g.name for g in last.gates] == ["features.26"] and last.bn[0].name == "features.26"
    assert by_name(groups, "classifier.0").prunable and not by_name(groups, "classifier.6").prunable
    _, _, pruned = check_prune(model, x)
    assert pruned.classifier[0].in_features == 49 * pruned.features[25].out_channels


def test_mobilenet_v2():
    model = torchvision.models.mobilenet_v2(weights=None)
    x = image(64)
    groups = dependency_groups(model, x)
    assert_partition(groups)
    expand = by_name(groups, "features.2.conv.0.0")
    assert roles(expand) == {("features.2.conv.0.0", "out"), ("features.2.conv.0.1", "norm"),
                             ("features.2.conv.1.0", "depthwise"), ("features.2.conv.1.1", "norm"),
                             ("features.2.conv.2", "in")}
    assert [g.name for g in expand.gates] == ["features.2.conv.0.1", "features.2.conv.1.1"]
    # features.2 -> features.3 is a residual block: both projections in one group
    stream = with_member(groups, "features.3.conv.2", "out")
    assert ("features.2.conv.2", "out") in roles(stream) and stream.name.startswith("residual: ")
    _, _, pruned = check_prune(model, x)
    dw = pruned.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == pruned.features[2].conv[0][0].out_channels


def test_regnet_grouped_convs_lose_whole_groups():
    """RegNet's 3x3 convs are grouped (group width 16 in regnet_x_400mf): their
    groups are pruned whole, with the 1x1 convs around them."""
    model = torchvision.models.regnet_x_400mf(weights=None)
    x = image(64)
    groups = dependency_groups(model, x)
    assert_partition(groups)
    inner = with_member(groups, "trunk_output.block1.block1-0.f.b.0", "in")
    assert inner.prunable and inner.exact_masking
    assert {m.span for m in inner.members} == {16}  # one unit = one conv group of 16 channels
    _, plan, pruned = check_prune(model, x)
    conv = pruned.get_submodule("trunk_output.block1.block1-0.f.b.0")
    assert conv.in_channels == conv.out_channels == 16 * conv.groups


def test_pruned_zoo_model_exports_and_pickles():
    """torch.export and torch.save(model) of a pruned model: plain torch modules only."""
    model = torchvision.models.mobilenet_v3_small(weights=None)
    x = image(64, batch=1)
    _, _, pruned = check_prune(model, x)
    pruned.eval()
    exported = torch.export.export(pruned, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), pruned(x), rtol=1e-5, atol=1e-6)
    import io
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), pruned(x))


SWIN_T_HEADS = [3] * 2 + [6] * 2 + [12] * 6 + [24] * 2  # per attention layer, its stages' depths 2, 2, 6, 2


@pytest.mark.parametrize("name, heads, neurons", [("vit_b_16", [12] * 12, 3072), ("swin_t", SWIN_T_HEADS, 384)])
def test_transformer_heads_and_mlp_neurons(name, heads, neurons):
    """Every attention layer's heads and every MLP's neurons prune, and a quarter of the heads (at
    least one) and 30% of the neurons removed equals masking them. vit_b_16: 12 layers of 12 heads
    and 3072 neurons (torch's MultiheadAttention). swin_t: 12 window attention layers of 3 to 24
    heads (torchvision's ShiftedWindowAttention, which becomes pyprune_ext's when it loses heads,
    with its head width kept) and their first stage's 384 neurons."""
    import copy

    from pyprune_ext.graph import remove_channels, zero_channels

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    for module in model.modules():  # vit's classifier starts at zero: its output would say nothing
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)
    x = image(224, batch=1)
    groups = dependency_groups(model, x)
    assert_partition(groups)
    head_groups = [g for g in groups if any(m.role == "heads" for m in g.members)]
    mlp_groups = [g for g in groups if g.prunable and g.exact_masking and g.name.endswith("mlp.0")]
    assert [g.size for g in head_groups] == heads
    assert all(g.prunable and g.exact_masking for g in head_groups)
    assert len(mlp_groups) == 12 and mlp_groups[0].size == neurons
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    keep = {}
    for g in head_groups + mlp_groups:
        i = groups.index(g)
        drop = torch.arange(g.size - (max(1, g.size // 4) if g in head_groups else round(0.3 * g.size)), g.size)
        zero_channels(masked, g, drop)
        keep[i] = torch.arange(0, int(drop[0]))
    remove_channels(removed, groups, keep)
    with torch.no_grad():
        want, got = masked(x), removed(x)
    assert float((want - got).abs().max() / want.abs().max()) <= 1e-4
    if name == "vit_b_16":
        assert removed.encoder.layers[0].self_attention.num_heads == 9
    else:
        first, last = removed.features[1][0].attn, removed.features[7][1].attn
        assert (first.num_heads, first.head_dim, last.num_heads, last.head_dim) == (2, 32, 18, 32)
        assert type(first).__module__ == "pyprune_ext.nn.swin"
