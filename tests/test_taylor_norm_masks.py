"""LayerNorm/RMSNorm statistics over the kept channels: masking a transformer's
residual stream computes what removing it computes, so TaylorPruner prunes it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import dependency_groups
from pyprune_ext.taylor import Target, TaylorPruner
from pyprune_ext.taylor.norm_masks import NormMasks, masked_norm

from test_graph_attention import GPT, tokens
from pruning_loop import finalize_and_compare, train_until_done


@pytest.mark.parametrize("norm", [nn.LayerNorm(12), nn.RMSNorm(12), nn.RMSNorm(12, eps=1e-3),
                                  nn.LayerNorm(12, bias=False)], ids=["layernorm", "rmsnorm", "rmsnorm-eps", "no-bias"])
def test_masked_norm_equals_the_norm_of_the_kept_channels(norm):
    torch.manual_seed(0)
    norm = norm.double()
    with torch.no_grad():
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    keep = torch.rand(12) > 0.4
    small = type(norm)(int(keep.sum()), eps=norm.eps, **({"bias": norm.bias is not None}
                                                          if isinstance(norm, nn.LayerNorm) else {})).double()
    with torch.no_grad():
        small.weight.copy_(norm.weight[keep])
        if getattr(norm, "bias", None) is not None:
            small.bias.copy_(norm.bias[keep])
        got = masked_norm(norm, x, keep)
        torch.testing.assert_close(got[..., keep], small(x[..., keep]))
        torch.testing.assert_close(got[..., ~keep], torch.zeros_like(got[..., ~keep]))


def test_norm_masks_hook_until_removed():
    norm = nn.LayerNorm(6)
    x = torch.randn(2, 6)
    masks = NormMasks(nn.Sequential(norm), ["0"])
    with torch.no_grad():
        torch.testing.assert_close(norm(x), F.layer_norm(x, (6,), norm.weight, norm.bias))  # nothing masked yet
        masks.mask("0", torch.tensor([1, 4]))
        assert float(norm(x)[:, [1, 4]].abs().max()) == 0.0
        masks.remove()
        torch.testing.assert_close(norm(x), F.layer_norm(x, (6,), norm.weight, norm.bias))


def test_stream_groups_list_their_norms():
    groups = dependency_groups(GPT().eval(), tokens())
    (stream,) = [g for g in groups if g.name.startswith("residual")]
    assert not stream.exact_masking and stream.exact_with_masked_norms
    assert stream.masked_norms == ("blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln")


def test_taylor_prunes_the_residual_stream_and_finalize_equals_masked():
    torch.manual_seed(0)
    model, x = GPT(), tokens(batch=4)
    labels = tokens(batch=4, seed=1)
    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(8), every=1, prune_per_step=2,
                          max_fraction=lambda g: 0.25 if g.name.startswith("residual") else 0.0)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x).flatten(0, 1), labels.flatten()), lr=0.01)
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-5
    assert small.embed.embedding_dim == 24 and small.ln.normalized_shape == (24,)
    assert small.blocks[0].attn.q.in_features == 24 and small.head.in_features == 24
    assert not small.ln._forward_hooks  # the statistics hooks are gone with finalize


torchvision = pytest.importorskip("torchvision")


def test_channels_first_layernorm_masked_on_dim_1():
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(8).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    small = LayerNorm2d(6).double()
    with torch.no_grad():
        small.weight.copy_(norm.weight[keep])
        small.bias.copy_(norm.bias[keep])
        got = masked_norm(norm, x, keep, dim=1)
        torch.testing.assert_close(got[:, keep], small(x[:, keep]))
        assert float(got[:, ~keep].abs().max()) == 0.0


class TinyConvNeXt(nn.Module):
    """torchvision's CNBlock (layer_scale read directly, a LayerNorm over channels-last) and
    LayerNorm2d between a stem and a classifier."""

    def __init__(self):
        super().__init__()
        from torchvision.models.convnext import CNBlock, LayerNorm2d

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, stride=2), LayerNorm2d(16))
        self.blocks = nn.Sequential(CNBlock(16, 0.5, 0.0), CNBlock(16, 0.5, 0.0))
        self.norm, self.fc = LayerNorm2d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.norm(self.blocks(self.stem(x))).mean((2, 3)))


def test_taylor_prunes_a_convnext_stream():
    torch.manual_seed(0)
    model, x = TinyConvNeXt(), torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    groups = dependency_groups(model.eval(), x)
    (stream,) = [g for g in groups if g.name.startswith("residual")]
    assert stream.exact_with_masked_norms and "blocks.0.layer_scale" in {m.name for m in stream.members}
    pruner = TaylorPruner(model.train(), x, "fo_gate", target=Target.channels(4), every=1, prune_per_step=2,
                          max_fraction=lambda g: 0.25 if g.name.startswith("residual") else 0.0)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x), labels), lr=0.05)
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-5
    assert small.blocks[0].layer_scale.shape == (12, 1, 1) and small.norm.normalized_shape == (12,)
