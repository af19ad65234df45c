"""pyprune_ext.nn.MultiheadAttention computes what torch.nn.MultiheadAttention
computes with the same parameters (float64), in every calling convention, and
keeps working once its heads are fewer than embed_dim / head_dim."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyprune_ext.nn import MultiheadAttention

E, H, L, S, N = 16, 4, 5, 6, 3


def pair(batch_first, bias=True, dropout=0.0):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=bias, dropout=dropout).double().eval()
    with torch.no_grad():
        if bias:
            reference.in_proj_bias.normal_()
            reference.out_proj.bias.normal_()
    return reference, MultiheadAttention.from_torch(reference)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("masks", ["none", "bool_attn", "float_attn_per_head", "padding", "both"])
def test_matches_torch(batch_first, need_weights, average, masks):
    reference, ours = pair(batch_first)
    shape = (N, L, E) if batch_first else (L, N, E)
    kv_shape = (N, S, E) if batch_first else (S, N, E)
    q = torch.randn(shape, dtype=torch.float64)
    k, v = torch.randn(kv_shape, dtype=torch.float64), torch.randn(kv_shape, dtype=torch.float64)
    kwargs = {}
    if masks in ("bool_attn", "both"):
        kwargs["attn_mask"] = torch.rand(L, S) > 0.7
        kwargs["attn_mask"][:, 0] = False  # every query sees one key
    if masks == "float_attn_per_head":
        kwargs["attn_mask"] = torch.randn(N * H, L, S, dtype=torch.float64)
    if masks in ("padding", "both"):
        kwargs["key_padding_mask"] = torch.zeros(N, S, dtype=torch.bool)
        kwargs["key_padding_mask"][:, -2:] = True
    want, want_w = reference(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
    got, got_w = ours(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
    torch.testing.assert_close(got, want)
    if need_weights:
        torch.testing.assert_close(got_w, want_w)
    else:
        assert got_w is None and want_w is None


def test_unbatched_causal_and_no_bias():
    reference, ours = pair(batch_first=True, bias=False)
    x = torch.randn(L, E, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    want, _ = reference(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    got, _ = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    torch.testing.assert_close(got, want)
    got_causal_only, _ = ours(x, x, x, is_causal=True, need_weights=True)
    torch.testing.assert_close(got_causal_only, want)


def test_shares_parameters_and_loads_torch_state_dicts():
    reference, ours = pair(batch_first=True)
    assert ours.in_proj_weight is reference.in_proj_weight and ours.out_proj is reference.out_proj
    fresh = MultiheadAttention(E, H, batch_first=True).double()
    fresh.load_state_dict(reference.state_dict())
    x = torch.randn(N, L, E, dtype=torch.float64)
    torch.testing.assert_close(fresh(x, x, x)[0], reference(x, x, x)[0])


def test_fewer_heads_than_embed_dim_over_head_dim():
    attention = MultiheadAttention(E, num_heads=3, head_dim=4, batch_first=True)  # 12 != 16
    x = torch.randn(N, L, E)
    out, weights = attention(x, x, x)
    assert out.shape == (N, L, E) and weights.shape == (N, L, L)
    assert attention.in_proj_weight.shape == (36, E) and attention.out_proj.in_features == 12


def test_refuses_what_it_does_not_support():
    with pytest.raises(ValueError, match="kdim/vdim"):
        MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="bias_k"):
        MultiheadAttention.from_torch(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(E, 3)


@pytest.mark.parametrize("grad", [True, False])
def test_self_attention_with_and_without_gradients(grad):
    """One packed GEMM for self-attention; without gradients torch's own path when the heads
    fill embed_dim: both give torch's result."""
    reference, ours = pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(ours(x, x, x)[0], reference(x, x, x)[0])
        torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], reference(x, x, x, need_weights=False)[0])


def test_count_cost_is_the_same_for_torch_and_pyprune_attention():
    from pyprune_ext.cost import count_cost

    reference, ours = pair(batch_first=True)
    x = torch.randn(N, L, E, dtype=torch.float64)
    model_a = nn.Sequential(reference)
    want = count_cost(_First(model_a), x)
    got = count_cost(_First(nn.Sequential(ours)), x)
    assert (got.total_macs, got.total_params) == (want.total_macs, want.total_params)
    assert want.total_macs == L * (3 * E * E + E * E)  # q/k/v and the output projection, per example


class _First(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner[0](x, x, x, need_weights=False)[0]
