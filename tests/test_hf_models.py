"""Hugging Face transformers models built from small configs (random weights):
heads (grouped-query aware) and MLP neurons are found, removing them computes
what masking them computes, TaylorPruner prunes them, and with ``uniform=True``
the updated config round-trips through save_pretrained / from_pretrained.
Skipped when transformers is not installed (it is a test extra)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

from pyprune_ext import hf  # noqa: E402
from pyprune_ext.graph import GraphAnalysisWarning, dependency_groups, remove_channels  # noqa: E402
from pyprune_ext.taylor import Target, TaylorPruner  # noqa: E402

from test_graph_layers import assert_removed_equals_masked  # noqa: E402
from pruning_loop import finalize_and_compare, train_until_done  # noqa: E402

VOCAB, SEQ = 64, 7


def llama(heads=4, kv_heads=2, hidden=32):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=32))


def qwen2(heads=4, kv_heads=2, hidden=32):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=32))


def bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0))


class Output(nn.Module):
    """The model's main output tensor (logits or hidden states), without a KV cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, use_cache=False) if hasattr(self.model, "lm_head") else self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def lm_loss(model, x, labels):
    return F.cross_entropy(model(x, use_cache=False).logits.flatten(0, 1), labels.flatten())


def tokens(batch=2, seed=0):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def groups_with(groups, suffix, role="out"):
    return [g for g in groups if any(m.name.endswith(suffix) and m.role == role for m in g.members)]


def quiet_groups(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)  # fx cannot trace HF models: the fallback runs
        return dependency_groups(model, x)


@pytest.mark.parametrize("make, query, mlp, kv_groups", [
    (llama, "self_attn.q_proj", "mlp.gate_proj", 2),
    (qwen2, "self_attn.q_proj", "mlp.gate_proj", 2),
    (bert, "attention.self.query", "intermediate.dense", 4),
], ids=["llama", "qwen2", "bert"])
def test_heads_and_mlp_neurons_are_groups_and_removal_equals_masking(make, query, mlp, kv_groups):
    torch.manual_seed(0)
    model = Output(make()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        groups, removed = assert_removed_equals_masked(model, tokens(), expect_groups=4)
    heads, neurons = groups_with(groups, query), groups_with(groups, mlp)
    assert [g.size for g in heads] == [kv_groups, kv_groups] and all(g.exact_masking for g in heads)
    assert [g.size for g in neurons] == [48, 48] and all(g.exact_masking for g in neurons)


def test_gpt2_heads_through_the_packed_split_and_mlp_neurons_removal_equals_masking():
    """GPT-2 cuts its packed c_attn at self.split_size (declared in pyprune_ext.graph.sizes):
    each head's q, k and v columns and c_proj rows are one unit, and split_size follows."""
    torch.manual_seed(0)
    model = Output(gpt2()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        groups, removed = assert_removed_equals_masked(model, tokens(), expect_groups=4)
    heads = groups_with(groups, "attn.c_attn")
    assert [g.size for g in heads] == [4, 4] and all(g.prunable and g.exact_masking for g in heads)
    assert [g.size for g in groups_with(groups, "mlp.c_fc") if g.prunable] == [128, 128]
    for block in removed.model.transformer.h:
        attn = block.attn
        assert attn.num_heads == 3 and attn.split_size == attn.embed_dim == 3 * attn.head_dim
        assert attn.c_attn.weight.shape == (32, 3 * attn.split_size) and attn.c_proj.weight.shape[0] == attn.split_size


def test_taylor_prunes_gpt2_heads_and_neurons():
    torch.manual_seed(0)
    model = gpt2()
    x, labels = tokens(batch=4), tokens(batch=4, seed=1)

    def share(group):  # a quarter of the heads, 30% of the MLP neurons
        return 0.25 if "attn.c_attn" in group.name else 0.3 if "mlp.c_fc" in group.name else 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(2 * (1 + 38)), every=1, prune_per_step=10,
                              max_fraction=share, normalize="macs")
    train_until_done(pruner, model, lambda m: lm_loss(m, x, labels))
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x, use_cache=False).logits)
    assert difference <= 1e-4
    assert [(b.attn.num_heads, b.mlp.c_fc.weight.shape[1]) for b in small.transformer.h] == [(3, 90), (3, 90)]
    report = pruner.report()
    assert report.params_after < report.params_before and report.macs_after < report.macs_before


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2"])
def test_taylor_prunes_uniformly_and_the_config_round_trips(make, tmp_path):
    torch.manual_seed(0)
    model = make(heads=8, kv_heads=4)
    x, labels = tokens(batch=4), tokens(batch=4, seed=1)

    def share(group):  # half the KV groups (the config needs a head count dividing hidden_size), 30% of the MLP
        first = group.name.split(",")[0]
        return 0.5 if first.endswith("q_proj") else 0.3 if first.endswith("mlp.gate_proj") else 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(2 * (2 + 14)), every=1,
                              prune_per_step=10, max_fraction=share, uniform=True)
    train_until_done(pruner, model, lambda m: lm_loss(m, x, labels))
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x, use_cache=False).logits)
    assert difference <= 1e-4
    attention = [small.model.layers[i].self_attn for i in range(2)]
    assert [(a.q_proj.out_features, a.k_proj.out_features) for a in attention] == [(16, 8), (16, 8)]
    assert [small.model.layers[i].mlp.up_proj.out_features for i in range(2)] == [34, 34]
    changed = hf.update_config(small)
    assert {k: v[1] for k, v in changed.items() if k != "head_dim"} == {
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 34}
    assert small.config.head_dim == 4
    report = pruner.report()
    assert report.params_after < report.params_before
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x, use_cache=False).logits, small(x, use_cache=False).logits)


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2"])
def test_taylor_gqa_query_prunes_query_heads_within_kv_groups_and_the_config_round_trips(make, tmp_path):
    """gqa="query": 8 query heads on 2 KV heads (head_dim 6); a quarter of the query heads go,
    one per KV head, in both layers alike; num_key_value_groups follows (4 -> 3), the config
    gets 6 attention heads and keeps its 2 KV heads."""
    torch.manual_seed(0)
    model = make(heads=8, kv_heads=2, hidden=48)
    model.model.layers[0].self_attn.num_heads = 8  # as older transformers releases hold it
    x, labels = tokens(batch=4), tokens(batch=4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(2 * 2), every=1, prune_per_step=4,
                              gqa="query", uniform=True,
                              max_fraction=lambda g: 0.25 if g.name.endswith("self_attn.q_proj") else 0.0)
    heads = [pruner.groups[i] for i in pruner.prunable]
    assert [(g.size, g.blocks, g.zeroes_inputs) for g in heads] == [(8, 2, True), (8, 2, True)]
    train_until_done(pruner, model, lambda m: lm_loss(m, x, labels))
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x, use_cache=False).logits)
    assert difference <= 1e-4
    attention = [layer.self_attn for layer in small.model.layers]
    assert [(a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features,
             a.num_key_value_groups) for a in attention] == [(36, 12, 12, 36, 3)] * 2
    assert attention[0].num_heads == 6 and not hasattr(attention[1], "num_heads")  # refreshed where held
    changed = hf.update_config(small)
    assert {k: v for k, v in changed.items() if k != "head_dim"} == {"num_attention_heads": (8, 6)}
    assert (small.config.num_key_value_heads, small.config.head_dim) == (2, 6)
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x, use_cache=False).logits, small(x, use_cache=False).logits)


def test_update_config_refuses_layers_of_different_sizes():
    model = llama()
    model.model.layers[0].mlp.up_proj = nn.Linear(32, 40, bias=False)
    with pytest.raises(ValueError, match="different MLP sizes.*uniform=True"):
        hf.update_config(model)


def test_update_config_refuses_sizes_transformers_rejects_and_keeps_the_config():
    model = llama(heads=8, kv_heads=4)
    if not hasattr(model.config, "validate_architecture"):
        pytest.skip("this transformers release does not validate configs")
    for layer in model.model.layers:  # 6 query heads of 4: 32 % 6 != 0
        layer.self_attn.q_proj = nn.Linear(32, 24, bias=False)
        layer.self_attn.k_proj = nn.Linear(32, 12, bias=False)
    with pytest.raises(ValueError, match="refuses the pruned sizes"):
        hf.update_config(model)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 4)


def test_update_config_refuses_an_unknown_architecture():
    model = llama()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no layout for model_type 'mystery'.*register_architecture"):
        hf.update_config(model)


@pytest.mark.parametrize("make, mlp, field", [(bert, "intermediate.dense", "intermediate_size"),
                                              (gpt2, "mlp.c_fc", "n_inner")], ids=["bert", "gpt2"])
def test_bert_and_gpt2_configs_round_trip_a_pruned_mlp_and_refuse_pruned_heads(make, mlp, field, tmp_path):
    """Their configs derive head_dim from hidden_size / num_attention_heads: a pruned MLP is
    described (uniform), pruned heads are refused by name and the config is left alone."""
    torch.manual_seed(0)
    model = make()
    x = tokens(batch=4)
    output = (lambda m: m(x, use_cache=False).logits) if make is gpt2 else (lambda m: m(x).last_hidden_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(2 * 10), every=1, prune_per_step=20,
                              max_fraction=lambda g: 0.3 if mlp in g.name else 0.0, uniform=True)
    train_until_done(pruner, model, lambda m: output(m).pow(2).mean())
    small, difference = finalize_and_compare(pruner, model, output)
    assert difference <= 1e-4
    sizes = {name: (m.out_features if isinstance(m, nn.Linear) else m.weight.shape[1])
             for name, m in small.named_modules() if name.endswith(mlp)}
    new_size = sizes.popitem()[1]
    assert set(sizes.values()) <= {new_size} and new_size < (48 if make is bert else 128)
    assert hf.update_config(small)[field][1] == new_size
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(output(reloaded), output(small.eval()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        groups = quiet_groups(small, x)
    heads = [(i, g) for i, g in enumerate(groups) if g.prunable and g.size == 4 and g.exact_masking
             and any(("query" in m.name or "c_attn" in m.name) for m in g.members)]
    assert len(heads) == 2
    remove_channels(small, groups, {i: torch.tensor([0, 1, 2]) for i, _ in heads})
    before = dict(small.config.to_dict())
    with pytest.raises(ValueError, match=f"a {small.config.model_type} config has no head_dim.*torch.save"):
        hf.update_config(small)
    assert small.config.to_dict() == before


def test_keyword_example_inputs_are_passed_by_keyword():
    """A dict of forward arguments reaches a **kwargs forward as keywords (HF's own decorators
    would see a positional use_cache twice otherwise)."""
    x = tokens()
    groups = quiet_groups(bert().eval(), {"input_ids": x, "attention_mask": torch.ones_like(x)})
    assert [g.size for g in groups_with(groups, "attention.self.query")] == [4, 4]


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2"])
def test_taylor_prunes_the_residual_width_through_rmsnorm_and_the_config_round_trips(make, tmp_path):
    """The stream (embedding columns, every projection on it, every RMSNorm) is pruned with the
    norms' statistics over the kept channels; hidden_size follows into the config."""
    torch.manual_seed(0)
    model = make(heads=8, kv_heads=4)
    x, labels = tokens(batch=4), tokens(batch=4, seed=1)
    groups = quiet_groups(model.eval(), x)
    (stream,) = [g for g in groups if g.name.startswith("residual")]
    assert stream.exact_with_masked_norms and len(stream.masked_norms) == 5  # 2 per layer and the last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphAnalysisWarning)
        pruner = TaylorPruner(model.train(), x, "fo_gate", target=Target.channels(8), every=1, prune_per_step=4,
                              max_fraction=lambda g: 0.25 if g.name.startswith("residual") else 0.0)
    train_until_done(pruner, model, lambda m: lm_loss(m, x, labels))
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x, use_cache=False).logits)
    assert difference <= 1e-4
    assert small.model.embed_tokens.embedding_dim == 24 and small.model.norm.weight.shape == (24,)
    assert hf.update_config(small)["hidden_size"] == (32, 24)
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x, use_cache=False).logits, small(x, use_cache=False).logits)
