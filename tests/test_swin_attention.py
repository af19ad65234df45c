"""torchvision's Swin window attention loses heads: pyprune_ext.nn.ShiftedWindowAttention
computes what torchvision's computes (float64-equal: shifted and unshifted windows, padded
maps) with the same state dict, and keeps working with fewer heads; a head's q/k/v rows,
proj columns and bias-table column are one group, removing heads computes what masking them
computes, and TaylorPruner prunes them. Swin v2's heads are refused by name."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pyprune_ext.graph import dependency_groups
from pyprune_ext.nn.attention import convert
from pyprune_ext.taylor import Target, TaylorPruner

from test_graph_layers import assert_removed_equals_masked
from pruning_loop import finalize_and_compare, train_until_done

torchvision = pytest.importorskip("torchvision")
from torchvision.models import swin_transformer as tv_swin  # noqa: E402

from pyprune_ext.nn import ShiftedWindowAttention  # noqa: E402 (needs torchvision)

DIM, HEADS = 16, 4


def reference(shift, window=(4, 4)):
    torch.manual_seed(0)
    module = tv_swin.ShiftedWindowAttention(DIM, list(window), list(shift), HEADS).double().eval()
    with torch.no_grad():  # non-zero biases, so that a wrong slice would show
        module.qkv.bias.normal_()
        module.proj.bias.normal_()
    return module


def small_swin(v2=False, embed_dim=32, heads=(4, 8)):
    """Two stages (a patch merging between), windows of 4: a 40x40 image gives 10x10 and 5x5
    maps, padded to 12x12 and 8x8, with shifted windows in both stages."""
    torch.manual_seed(0)
    extra = {"block": tv_swin.SwinTransformerBlockV2, "downsample_layer": tv_swin.PatchMergingV2} if v2 else {}
    return tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=embed_dim, depths=[2, 2], num_heads=list(heads),
                                   window_size=[4, 4], num_classes=10, **extra).eval()


def image(batch=2, size=40, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def attention_layers(model):
    return [m for m in model.modules() if isinstance(m, tv_swin.ShiftedWindowAttention)]


@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (3, 3)])  # whole windows, padded, smaller than a window
@pytest.mark.parametrize("grad", [False, True])
def test_matches_torchvision(shift, size, grad):
    ref = reference(shift)
    ours = ShiftedWindowAttention.from_torchvision(ref)
    assert ours.qkv is ref.qkv and ours.relative_position_bias_table is ref.relative_position_bias_table
    x = torch.randn(2, *size, DIM, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        assert torch.equal(ours(x), ref(x))
    ref.train()  # dropout 0: training mode computes the same
    ShiftedWindowAttention.convert_in_place(ref)
    assert type(ref) is ShiftedWindowAttention and ref.head_dim == DIM // HEADS and ref.training
    assert torch.equal(ref(x), ours(x))


def test_state_dict_round_trip_and_fewer_heads():
    ref = reference((2, 2))
    fresh = ShiftedWindowAttention(DIM, [4, 4], [2, 2], HEADS).double().eval()
    assert list(fresh.state_dict()) == list(ref.state_dict())
    fresh.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 8, DIM, dtype=torch.float64)
    assert torch.equal(fresh(x), ref(x))
    back = tv_swin.ShiftedWindowAttention(DIM, [4, 4], [2, 2], HEADS).double().eval()
    back.load_state_dict(fresh.state_dict())
    assert torch.equal(back(x), ref(x))
    smaller = ShiftedWindowAttention(DIM, [4, 4], [2, 2], num_heads=3, head_dim=4)  # 12 != 16
    assert smaller.qkv.weight.shape == (36, DIM) and smaller.proj.weight.shape == (DIM, 12)
    assert smaller.relative_position_bias_table.shape == (49, 3)
    assert smaller(torch.randn(2, 7, 9, DIM)).shape == (2, 7, 9, DIM)
    with pytest.raises(ValueError, match="divisible"):
        ShiftedWindowAttention(DIM, [4, 4], [0, 0], num_heads=3)


def test_convert_swaps_v1_in_place_and_leaves_v2():
    model = small_swin()
    layers = attention_layers(model)
    names = convert(model)
    assert len(names) == 4 and all(type(m) is ShiftedWindowAttention for m in layers)
    assert attention_layers(model) == layers  # the same objects
    assert convert(model) == []  # already converted
    v2 = small_swin(v2=True)
    assert convert(v2) == []
    assert all(type(m) is tv_swin.ShiftedWindowAttentionV2 for m in attention_layers(v2))
    with pytest.raises(ValueError, match="Swin v2"):
        ShiftedWindowAttention.from_torchvision(attention_layers(v2)[0])


def head_groups(groups):
    return [g for g in groups if any(m.role == "heads" for m in g.members)]


def test_head_groups_hold_qkv_rows_proj_columns_and_the_bias_column():
    groups = dependency_groups(small_swin(), image())
    heads = head_groups(groups)
    assert [g.size for g in heads] == [4, 4, 8, 8] and all(g.prunable and g.exact_masking for g in heads)
    members = {(m.name, m.role, m.offset, m.span) for m in heads[0].members}
    attn = "features.1.0.attn"
    assert members == {(attn, "heads", 0, 1), (f"{attn}.proj", "in", 0, 8),
                       *((f"{attn}.qkv", "out", k * 4, 8) for k in range(3))}
    assert [(gate.name, gate.on_input) for gate in heads[0].gates] == [(f"{attn}.proj", True)]


@pytest.mark.parametrize("convert_first", [False, True])
def test_removing_heads_and_neurons_equals_masking(convert_first):
    model, x = small_swin(), image()
    if convert_first:
        convert(model)
    groups, removed = assert_removed_equals_masked(model, x, expect_groups=8)  # 4 attention, 4 MLP layers
    layers = attention_layers(removed)
    assert all(type(m) is ShiftedWindowAttention and m.head_dim == 8 for m in layers)
    assert [m.num_heads for m in layers] == [3, 3, 6, 6]  # a third of 4 and 8 heads
    assert [m.relative_position_bias_table.shape[1] for m in layers] == [3, 3, 6, 6]
    assert removed.features[1][0].mlp[0].out_features == 128 - 38  # 30% of the neurons gone
    assert removed(image(batch=1, size=33)).shape == (1, 10)


def share(group) -> float:
    if any(m.role == "heads" for m in group.members):
        return 0.25
    return 0.3 if group.name.endswith("mlp.0") else 0.0


def test_taylor_prunes_heads_and_neurons_then_finalize_equals_masked():
    model, x = small_swin(), image(batch=4)
    labels = torch.tensor([0, 1, 2, 3])
    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(1 + 1 + 2 + 2 + 38 + 38 + 76 + 76),
                          every=1, prune_per_step=40, max_fraction=share)
    assert len(pruner.converted_attention) == 4
    assert pruner.converted_attention[0] == "features.1.0.attn"
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x), labels), lr=0.01)
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-4
    assert [m.num_heads for m in attention_layers(small)] == [3, 3, 6, 6]
    assert all(m.head_dim == 8 and m.proj.in_features == 8 * m.num_heads for m in attention_layers(small))
    report = pruner.report()
    assert report.params_after < report.params_before


def test_swin_v2_heads_are_refused_by_name():
    groups = dependency_groups(small_swin(v2=True), image())
    heads = head_groups(groups)
    assert len(heads) == 4
    for g in heads:
        assert not g.prunable and "ShiftedWindowAttentionV2" in g.reason and "logit_scale" in g.reason
    mlps = [g for g in groups if g.name.endswith("mlp.0")]
    assert len(mlps) == 4 and all(g.prunable and g.exact_masking for g in mlps)
