"""A hand-written RMSNorm module is recognized by its code and analysed as an RMSNorm:
the residual width through it is prunable, masked with statistics over the kept channels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import dependency_groups, remove_channels
from pyprune_ext.graph.norm_patterns import match_rms_norm
from pyprune_ext.graph.specs import spec_for
from pyprune_ext.taylor import Target, TaylorPruner
from pyprune_ext.taylor.norm_masks import masked_norm

from pruning_loop import finalize_and_compare, train_until_done
from test_graph import TransformerMLP, outputs, roles, with_member
from test_graph_attention import HandWrittenRMSNorm, LlamaBlock, VOCAB, EMBED, tokens


class _Norm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + 0.1 * torch.randn(dim)), eps


class HuggingFaceStyle(_Norm):
    """Llama's: in float32, then back to the input's dtype; eps under another name."""

    def __init__(self, dim, eps=1e-5):
        super().__init__(dim)
        del self.eps
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DividedBySqrt(_Norm):
    def forward(self, x):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class LiteralEps(_Norm):
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(torch.mean(x ** 2, -1, keepdim=True) + 1e-6))


class Squared(_Norm):
    def forward(self, x):
        return (torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * x) * self.weight


# near misses: each computes something other than an RMSNorm over the last dim
class GemmaStyle(_Norm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class OverAnotherDim(_Norm):
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps))


class SumNotMean(_Norm):
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps))


class WrongPower(_Norm):
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(4).mean(-1, keepdim=True) + self.eps))


class WithBias(_Norm):
    def __init__(self, dim):
        super().__init__(dim)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) + self.bias


@pytest.mark.parametrize("cls, eps_name", [(HandWrittenRMSNorm, "eps"), (HuggingFaceStyle, "variance_epsilon"),
                                           (DividedBySqrt, "eps"), (LiteralEps, None), (Squared, "eps")])
def test_hand_written_rms_norms_are_recognized_with_their_eps(cls, eps_name):
    norm = cls(12)
    pattern = match_rms_norm(norm)
    assert pattern is not None and pattern.eps_attribute == eps_name
    assert pattern.eps(norm) == (1e-6 if cls in (LiteralEps, HandWrittenRMSNorm) else 1e-5)
    if eps_name:  # read from each instance, not from the one the class was recognized on
        other = cls(12)
        setattr(other, eps_name, 0.25)
        assert match_rms_norm(other).eps(other) == 0.25
    assert spec_for(norm) is not None and spec_for(norm).normalized_shape(norm) == (12,)


@pytest.mark.parametrize("cls", [GemmaStyle, OverAnotherDim, SumNotMean, WrongPower, WithBias])
def test_near_misses_are_not_recognized(cls):
    norm = cls(12)
    assert match_rms_norm(norm) is None and spec_for(norm) is None


@pytest.mark.parametrize("cls", [HandWrittenRMSNorm, HuggingFaceStyle, DividedBySqrt, LiteralEps])
def test_masked_norm_of_a_recognized_norm_is_the_norm_of_the_kept_channels(cls):
    torch.manual_seed(0)
    norm = cls(12).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    keep = torch.rand(12) > 0.4
    eps = match_rms_norm(norm).eps(norm)
    with torch.no_grad():
        got = masked_norm(norm, x, keep)
        torch.testing.assert_close(got[..., keep], F.rms_norm(x[..., keep], (int(keep.sum()),), norm.weight[keep], eps))
        assert float(got[..., ~keep].abs().max()) == 0.0


def test_the_width_through_a_hand_written_rms_norm_is_removed_as_computed_on_the_kept_channels():
    torch.manual_seed(0)
    model = TransformerMLP(norm=HuggingFaceStyle).eval()
    x = torch.randn(2, 5, 6)
    groups = dependency_groups(model, x)
    stream = with_member(groups, "norm", "norm")
    assert roles(stream) == {("embed", "out"), ("norm", "norm"), ("linear1", "in"), ("linear2", "out"),
                             ("head", "in")}
    assert stream.exact_with_masked_norms and stream.masked_norms == ("norm",)
    kept = torch.tensor([0, 3, 4, 7, 11])
    pruned = remove_channels(copy.deepcopy(model), groups, {groups.index(stream): kept})
    m = model
    with torch.no_grad():
        h = F.linear(x, m.embed.weight[kept], m.embed.bias[kept])
        n = F.rms_norm(h, (5,), m.norm.weight[kept], m.norm.variance_epsilon)
        h = h + F.linear(F.gelu(F.linear(n, m.linear1.weight[:, kept], m.linear1.bias)),
                         m.linear2.weight[kept], m.linear2.bias[kept])
        want = F.linear(h.mean(1), m.head.weight[:, kept], m.head.bias)
    assert pruned.norm.weight.shape == (5,)
    torch.testing.assert_close(outputs(pruned, x), want, atol=1e-5, rtol=0)


def test_taylor_prunes_the_width_of_a_llama_block_with_hand_written_rms_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, EMBED), LlamaBlock(HandWrittenRMSNorm), nn.Linear(EMBED, VOCAB))
    x, labels = tokens(batch=4), tokens(batch=4, seed=1)
    (stream,) = [g for g in dependency_groups(model, x) if g.name.startswith("residual")]
    assert stream.exact_with_masked_norms and stream.masked_norms == ("1.norm1", "1.norm2")
    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(8), every=1, prune_per_step=2,
                          max_fraction=lambda g: 0.25 if g.name.startswith("residual") else 0.0)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x).flatten(0, 1), labels.flatten()), lr=0.01)
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-5
    assert small[0].embedding_dim == EMBED - 8 and small[1].norm1.weight.shape == (EMBED - 8,)


def test_a_norm_first_met_inside_the_analysis_is_recognized():
    """Recognition runs the norm's forward: the analysis asks before tracing the model, so
    the probe is not captured by the model's trace (nor the verdict spoilt for the class)."""
    class FreshNorm(_Norm):
        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    groups = dependency_groups(TransformerMLP(norm=FreshNorm).eval(), torch.randn(2, 5, 6))
    assert with_member(groups, "norm", "norm").masked_norms == ("norm",)
    assert match_rms_norm(FreshNorm(4)) is not None
