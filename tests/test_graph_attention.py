"""Attention heads as prunable groups: hand-written attention (view into heads,
scaled_dot_product_attention or matmul-softmax-matmul, causal masked_fill),
grouped-query attention (enable_gqa, repeat_interleave, the expand + reshape
of Hugging Face's repeat_kv). A head's q/k/v rows and output-projection columns
go together; removing heads computes what masking them computes. With gqa="query"
the KV heads stay and query heads go, as many per KV head, in TaylorPruner too."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import (dependency_groups, register_size_attribute, remove_channels,
                               unregister_size_attribute, zero_channels)
from pyprune_ext.taylor import Importance, Target, TaylorPruner, apply_plan

from test_graph_layers import assert_removed_equals_masked, relative_difference
from pruning_loop import finalize_and_compare, train_until_done

EMBED, VOCAB, SEQ = 32, 40, 7


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's repeat_kv: (B, Hkv, L, D) -> (B, Hkv * n_rep, L, D)."""
    batch, heads, length, dim = x.shape
    return x[:, :, None, :, :].expand(batch, heads, n_rep, length, dim).reshape(batch, heads * n_rep, length, dim)


class Attention(nn.Module):
    def __init__(self, heads=4, kv_heads=4, kind="sdpa", literal_heads=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, EMBED // heads
        self.kind, self.literal_heads = kind, literal_heads
        self.q = nn.Linear(EMBED, heads * self.head_dim)
        self.k = nn.Linear(EMBED, kv_heads * self.head_dim)
        self.v = nn.Linear(EMBED, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, EMBED)
        self.register_buffer("causal", torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)))

    def split(self, t, heads):
        b, length, _ = t.shape
        return t.view(b, length, heads if self.literal_heads else -1, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, length, _ = x.shape
        q, k, v = self.split(self.q(x), self.heads), self.split(self.k(x), self.kv_heads), \
            self.split(self.v(x), self.kv_heads)
        rep = self.heads // self.kv_heads
        if self.kind == "sdpa_gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        else:
            if rep > 1 and self.kind == "repeat_kv":
                k, v = repeat_kv(k, rep), repeat_kv(v, rep)
            elif rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if self.kind == "matmul":
                scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
                scores = scores.masked_fill(~self.causal[:length, :length], float("-inf"))
                y = scores.softmax(-1) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, length, -1))


class GPT(nn.Module):
    """A two-block pre-norm GPT with a GELU MLP."""

    def __init__(self, **attention):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.ln1, block.attn, block.ln2 = nn.LayerNorm(EMBED), Attention(**attention), nn.LayerNorm(EMBED)
            block.fc, block.proj = nn.Linear(EMBED, 48), nn.Linear(48, EMBED)
            self.blocks.append(block)
        self.ln, self.head = nn.LayerNorm(EMBED), nn.Linear(EMBED, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = x + b.attn(b.ln1(x))
            x = x + b.proj(F.gelu(b.fc(b.ln2(x))))
        return self.head(self.ln(x))


def tokens(batch=2, seed=0):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def head_groups(groups, block=0):
    prefix = f"blocks.{block}.attn."
    return [g for g in groups if any(m.name == prefix + "q" and m.role == "out" for m in g.members)]


@pytest.mark.parametrize("kind", ["sdpa", "matmul"])
def test_heads_are_one_group_in_units_of_head_dim(kind):
    torch.manual_seed(0)
    groups, removed = assert_removed_equals_masked(GPT(kind=kind), tokens(), expect_groups=4)
    (heads,) = head_groups(groups)
    assert heads.prunable and heads.exact_masking and heads.size == 4
    spans = {(m.name.rsplit(".", 1)[1], m.role): m.span for m in heads.members}
    assert spans == {("q", "out"): 8, ("k", "out"): 8, ("v", "out"): 8, ("o", "in"): 8}
    attn = removed.blocks[0].attn
    assert attn.q.out_features == attn.k.out_features == attn.o.in_features < EMBED
    assert attn.q.out_features % 8 == 0


@pytest.mark.parametrize("kind", ["sdpa_gqa", "sdpa", "matmul", "repeat_kv"])
def test_grouped_query_attention_prunes_a_kv_head_with_its_query_heads(kind):
    torch.manual_seed(0)
    groups, removed = assert_removed_equals_masked(GPT(heads=4, kv_heads=2, kind=kind), tokens(), expect_groups=4)
    (heads,) = head_groups(groups)
    assert heads.size == 2  # KV heads; each takes its two query heads
    spans = {m.name.rsplit(".", 1)[1]: m.span for m in heads.members}
    assert spans == {"q": 16, "k": 8, "v": 8, "o": 16}
    attn = removed.blocks[0].attn
    assert (attn.q.out_features, attn.k.out_features) == (16, 8)  # one KV group of two left


# -- gqa="query": KV heads kept, query heads pruned within their KV groups ---------------------------
@pytest.fixture
def declared_heads():
    """The hand-written models repeat K/V ``heads // kv_heads`` times: pruning query heads
    must update ``heads``, declared as a size (as Hugging Face's num_key_value_groups is)."""
    declared = [(Attention, lambda m: m.q.out_features // m.head_dim),
                (LlamaBlock, lambda m: m.q_proj.out_features // m.head_dim)]
    for cls, compute in declared:
        register_size_attribute(cls, "heads", compute)
    yield
    for cls, _ in declared:
        unregister_size_attribute(cls, "heads")


def masked_and_removed(model, x, groups, keep: dict):
    """(masked output, removed model, its output): ``zero_channels`` on a copy drops what
    ``keep`` does not keep, ``remove_channels`` on another copy keeps ``keep``."""
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    for i, kept in keep.items():
        zero_channels(masked, groups[i], [c for c in range(groups[i].size) if c not in kept])
    remove_channels(removed, groups, {i: torch.tensor(kept) for i, kept in keep.items()})
    with torch.no_grad():
        return masked(x), removed, removed(x)


def query_group(groups, q_name):
    (index,) = [i for i, g in enumerate(groups) if any(m.name == q_name and m.role == "out" for m in g.members)]
    return index, groups[index]


@pytest.mark.parametrize("kind", ["sdpa_gqa", "sdpa", "matmul", "repeat_kv"])
def test_gqa_query_keeps_kv_heads_and_prunes_query_heads_in_equal_blocks(kind, declared_heads):
    """enable_gqa, repeat_interleave (sdpa and matmul-softmax-matmul), HF's expand + reshape."""
    torch.manual_seed(0)
    model, x = GPT(heads=4, kv_heads=2, kind=kind).eval(), tokens()
    groups = dependency_groups(model, x, gqa="query")
    index, heads = query_group(groups, "blocks.0.attn.q")
    assert heads.prunable and heads.exact_masking and heads.zeroes_inputs
    assert (heads.size, heads.blocks) == (4, 2)  # query heads; two KV heads with two each
    assert {(m.name, m.role, m.span) for m in heads.members} == {("blocks.0.attn.q", "out", 8),
                                                                  ("blocks.0.attn.o", "in", 8)}
    assert [(g.name, g.on_input) for g in heads.gates] == [("blocks.0.attn.o", True)]
    kv_rows = [g for g in groups if any(m.role == "out" and m.name.endswith((".k", ".v")) for m in g.members)]
    assert len(kv_rows) == 2 and not any(g.prunable for g in kv_rows)
    assert all("gqa='query' keeps the key/value heads" in g.reason for g in kv_rows)

    with pytest.raises(ValueError, match=r"group \d+ \('blocks.0.attn.q'\) has 2 blocks .* leave 2, 1 in them"):
        remove_channels(copy.deepcopy(model), groups, {index: torch.tensor([0, 1, 3])})
    other, _ = query_group(groups, "blocks.1.attn.q")
    # one query head per KV head, not the same slot in both: 0 of block 0, 3 (the second) of block 1
    masked, removed, got = masked_and_removed(model, x, groups, {index: [0, 3], other: [1, 2]})
    assert relative_difference(masked, got) <= 1e-4
    with torch.no_grad():
        assert relative_difference(model(x), masked) > 1e-3  # the masked heads did contribute
    for block in removed.blocks:
        attn = block.attn
        assert (attn.q.out_features, attn.k.out_features, attn.v.out_features, attn.o.in_features) == (16, 16, 16, 16)
        assert (attn.heads, attn.kv_heads) == (2, 2)


def test_gqa_query_llama_block_keeps_three_of_four_query_heads_per_kv_head(declared_heads):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, EMBED), LlamaBlock(heads=8, kv_heads=2), nn.Linear(EMBED, VOCAB)).eval()
    groups = dependency_groups(model, tokens(), gqa="query")
    index, heads = query_group(groups, "1.q_proj")
    assert (heads.size, heads.blocks, heads.name) == (8, 2, "1.q_proj") and heads.exact_masking
    masked, removed, got = masked_and_removed(model, tokens(), groups, {index: [0, 1, 3, 4, 6, 7]})
    assert relative_difference(masked, got) <= 1e-4
    block = removed[1]
    assert (block.q_proj.out_features, block.k_proj.out_features, block.o_proj.in_features) == (24, 8, 24)
    assert block.heads == 6 and block.heads // block.kv_heads == 3


def test_gqa_query_without_shared_kv_heads_couples_heads_as_by_default():
    """Hq == Hkv: a query head has its own KV head, so it goes with it in both modes."""
    model = GPT(heads=4, kv_heads=4).eval()
    assert ([(g.name, g.size, g.blocks) for g in dependency_groups(model, tokens(), gqa="query")]
            == [(g.name, g.size, g.blocks) for g in dependency_groups(model, tokens())])


def test_gqa_mode_is_validated():
    with pytest.raises(ValueError, match="gqa must be one of 'kv', 'query'.*got 'queries'"):
        dependency_groups(GPT(heads=4, kv_heads=2).eval(), tokens(), gqa="queries")


def test_head_count_written_in_the_view_is_refused_by_name():
    groups = dependency_groups(GPT(literal_heads=True).eval(), tokens())
    (heads,) = head_groups(groups)
    assert not heads.prunable
    assert "channel count (4) written" in heads.reason and "write -1" in heads.reason


def test_per_head_attention_mask_is_refused():
    class PerHeadMask(Attention):
        def forward(self, x):
            b, length, _ = x.shape
            q, k, v = (self.split(f(x), self.heads) for f in (self.q, self.k, self.v))
            mask = torch.zeros(b, self.heads, length, length)
            return self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
                          .reshape(b, length, -1))

    groups = dependency_groups(PerHeadMask().eval(), torch.randn(2, SEQ, EMBED))
    (heads,) = [g for g in groups if any(m.name == "q" and m.role == "out" for m in g.members)]
    assert not heads.prunable and "one slice per head" in heads.reason


def test_contraction_over_channels_without_a_layer_is_refused():
    class RawProduct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(EMBED, 16)
            self.weight = nn.Parameter(torch.randn(16, 5))

        def forward(self, x):
            return self.fc(x) @ self.weight

    groups = dependency_groups(RawProduct().eval(), torch.randn(2, EMBED))
    (fc,) = [g for g in groups if any(m.name == "fc" and m.role == "out" for m in g.members)]
    assert not fc.prunable and "contracts over the channels" in fc.reason


def test_taylor_prunes_heads_and_neurons_then_finalize_equals_masked():
    torch.manual_seed(0)
    model, x = GPT(heads=4, kv_heads=2), tokens(batch=4)
    target = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(4), every=1, prune_per_step=1)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x).flatten(0, 1), target.flatten()), lr=0.05)
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-5
    report = pruner.report()
    assert report.params_after < report.params_before


class FixedScores(Importance):
    """Scores set by hand: ``scores[group name]``, ``default`` for every other channel."""

    def __init__(self, groups, scores: dict, default: float = 100.0):
        self.values = [torch.tensor(scores[g.name], dtype=torch.float64) if g.name in scores
                       else torch.full((g.size,), default, dtype=torch.float64) for g in groups]

    def end_minibatch(self):
        return True

    def means(self):
        return self.values


def test_taylor_gqa_query_ranks_one_query_head_per_kv_head_by_their_mean(declared_heads):
    """8 query heads on 2 KV heads: a unit is the lowest live head of each block (here heads 1
    and 4, not the same slot), scored by their mean 1.5, which beats an MLP neuron at 1.6
    (their sum, 3, would not); the step's third channel is then that neuron."""
    torch.manual_seed(0)
    model, x = GPT(heads=8, kv_heads=2), tokens()
    groups = dependency_groups(model.eval(), x, gqa="query")
    heads, fc = "blocks.0.attn.q", "blocks.0.fc"
    assert {heads, fc} <= {g.name for g in groups}
    scores = FixedScores(groups, {heads: [5.0, 1.0, 7.0, 3.0, 2.0, 9.0, 4.0, 8.0], fc: [1.6] + [50.0] * 47})
    pruner = TaylorPruner(model, x, scores, groups=groups, target=Target.channels(3), prune_per_step=3, momentum=0)
    step = pruner.prune_now()
    assert step.removed == {heads: 2, fc: 1} and pruner.done
    alive = {groups[i].name: a for i, a in pruner.alive.items()}
    assert alive[heads].logical_not().nonzero().flatten().tolist() == [1, 4]
    assert alive[fc].logical_not().nonzero().flatten().tolist() == [0]
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-4
    attn = small.blocks[0].attn
    assert (attn.q.out_features, attn.k.out_features, attn.o.in_features, attn.heads) == (24, 8, 24, 6)
    fresh = apply_plan(GPT(heads=8, kv_heads=2).eval(), x, pruner.plan(), gqa="query")  # the plan names the group
    fresh.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), small(x))


def test_taylor_gqa_query_round_to_rounds_whole_units(declared_heads):
    """round_to=3 with 2 KV heads of 4 query heads: the count per KV head is rounded (to 3, a
    multiple of round_to in total too), by whole units, so the blocks stay equal; rounding the
    total alone would drop the two lowest heads, 1 and 2, both of the first KV head."""
    model, x = GPT(heads=8, kv_heads=2), tokens()
    groups = dependency_groups(model.eval(), x, gqa="query")
    heads = "blocks.0.attn.q"
    scores = FixedScores(groups, {heads: [5.0, 1.0, 2.0, 3.0, 6.0, 9.0, 4.0, 8.0]})
    pruner = TaylorPruner(model, x, scores, groups=groups, target=Target.channels(2), prune_per_step=2, round_to=3,
                          momentum=0, max_fraction=lambda g: 0.5 if g.name == heads else 0.0)
    (index,) = pruner.prunable
    assert groups[index].name == heads and pruner._floor[index] == 6  # lcm(2 blocks, round_to 3)
    pruner.prune_now()
    assert pruner.alive[index].logical_not().nonzero().flatten().tolist() == [1, 6]


@pytest.mark.parametrize("scope", ["global", "local"])
def test_taylor_gqa_query_prunes_query_heads_and_every_kv_head_keeps_as_many(scope, declared_heads):
    torch.manual_seed(0)
    model, x = GPT(heads=8, kv_heads=2, kind="sdpa_gqa"), tokens(batch=4)
    labels = tokens(batch=4, seed=1)
    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(6), every=1, prune_per_step=2, gqa="query",
                          scope=scope, max_fraction=lambda g: 0.5 if g.name.endswith("attn.q") else 0.0)
    heads = [i for i in pruner.prunable if pruner.groups[i].blocks == 2]
    assert len(heads) == 2 and all(pruner.groups[i].zeroes_inputs for i in heads)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x).flatten(0, 1), labels.flatten()), lr=0.05)
    for i in heads:  # the masks keep as many query heads per KV head at every step
        assert len(set(pruner.alive[i].view(2, 4).sum(1).tolist())) == 1
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-4
    removed = pruner.channels_removed  # local: every group loses a whole unit per step, which may overshoot
    assert removed == 6 if scope == "global" else removed >= 6
    kept = [b.attn.heads for b in small.blocks]
    assert sum(kept) == 16 - removed and all(h % 2 == 0 for h in kept)
    assert all(b.attn.k.out_features == b.attn.v.out_features == 8 for b in small.blocks)  # KV heads kept


def test_taylor_gqa_query_refuses_a_step_smaller_than_a_unit_and_bad_options():
    model, x = GPT(heads=4, kv_heads=2), tokens()
    only_heads = lambda g: 0.5 if g.name.endswith("attn.q") else 0.0  # noqa: E731
    with pytest.raises(ValueError, match=r"prune_per_step \(1\) is smaller than the 2 query heads group "
                                         r"'blocks.0.attn.q' loses at once"):
        TaylorPruner(model, x, target=Target.channels(2), prune_per_step=1, gqa="query", max_fraction=only_heads)
    with pytest.raises(ValueError, match="gqa must be one of 'kv', 'query'.*got 'q'"):
        TaylorPruner(model, x, target=Target.channels(2), gqa="q")
    with pytest.raises(ValueError, match="with precomputed groups= pass it to dependency_groups"):
        TaylorPruner(model, x, target=Target.channels(2), gqa="query", groups=dependency_groups(model.eval(), x))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class HandWrittenRMSNorm(nn.Module):
    """The Hugging Face pattern: weight * x * rsqrt(mean(x^2) + eps)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LlamaBlock(nn.Module):
    """RMSNorm, GQA attention with rotary embeddings and repeat_kv, SwiGLU MLP."""

    def __init__(self, norm=nn.RMSNorm, heads=4, kv_heads=2, hidden=40):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, EMBED // heads
        self.norm1, self.norm2 = norm(EMBED), norm(EMBED)
        self.q_proj = nn.Linear(EMBED, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(EMBED, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(EMBED, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, EMBED, bias=False)
        self.gate_proj = nn.Linear(EMBED, hidden, bias=False)
        self.up_proj = nn.Linear(EMBED, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, EMBED, bias=False)
        angles = torch.arange(SEQ)[:, None] * (1e-2 ** (torch.arange(self.head_dim // 2) / (self.head_dim // 2)))
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos()[None, None])
        self.register_buffer("sin", angles.sin()[None, None])

    def attention(self, x):
        b, length, _ = x.shape
        shape = (b, length, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, length, -1))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


@pytest.mark.parametrize("norm", [nn.RMSNorm, HandWrittenRMSNorm], ids=["nn.RMSNorm", "hand-written"])
def test_llama_block_prunes_kv_groups_and_swiglu_neurons(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, EMBED), LlamaBlock(norm), nn.Linear(EMBED, VOCAB))
    groups, removed = assert_removed_equals_masked(model, tokens(), expect_groups=2)
    heads = [g for g in groups if any(m.name == "1.q_proj" and m.role == "out" for m in g.members)]
    neurons = [g for g in groups if any(m.name == "1.gate_proj" and m.role == "out" for m in g.members)]
    assert len(heads) == len(neurons) == 1
    assert heads[0].size == 2 and heads[0].exact_masking and "units of 16, 8" in heads[0].name
    assert {(m.name, m.role) for m in neurons[0].members} == {("1.gate_proj", "out"), ("1.up_proj", "out"),
                                                              ("1.down_proj", "in")}
    assert neurons[0].size == 40 and neurons[0].exact_masking
    block = removed[1]
    assert block.k_proj.out_features == 8 and block.gate_proj.out_features == block.up_proj.out_features < 40


def test_head_gate_is_the_output_projection_input_and_scores_match_a_float64_reference():
    """fo_gate / fo_fg / so_fisher of a head: (sum over examples of) the sum over tokens
    and the head's dims of grad * activation at o's input, as the paper sums over pixels."""
    from pyprune_ext.taylor.importance import build_importance

    torch.manual_seed(0)
    model, x = GPT(heads=4, kv_heads=2), tokens(batch=3)
    labels = tokens(batch=3, seed=1)
    groups = dependency_groups(model, x)
    (heads,) = head_groups(groups)
    assert [(g.name, g.on_input, g.span) for g in heads.gates] == [("blocks.0.attn.o", True, 16)]
    index = groups.index(heads)
    captured = {}

    def keep_input(module, inputs):
        inputs[0].retain_grad()
        captured["a"] = inputs[0]

    hook = model.blocks[0].attn.o.register_forward_pre_hook(keep_input)
    scorers = {c: build_importance(c, model, groups).attach() for c in ("fo_gate", "fo_fg", "so_fisher")}
    loss = F.cross_entropy(model(x).flatten(0, 1), labels.flatten())
    loss.backward()
    hook.remove()
    a, g = captured["a"].detach().double(), captured["a"].grad.double()
    per_example = (a * g).sum(1).reshape(3, 2, 16).sum(-1)  # (N, KV groups): tokens and the unit's dims
    first, second = per_example.sum(0), (per_example ** 2).sum(0)
    want = {"fo_gate": first ** 2, "fo_fg": second, "so_fisher": (-first + 0.5 * 3 * second) ** 2}
    for criterion, scorer in scorers.items():
        assert scorer.end_minibatch()
        got = scorer.means()[index]
        torch.testing.assert_close(got.double(), want[criterion], rtol=1e-5, atol=1e-12)
        scorer.detach()


@pytest.mark.parametrize("criterion", ["fo_gate", "fo_fg", "so_fisher", "fo_weight"])
def test_every_criterion_prunes_heads(criterion):
    torch.manual_seed(0)
    model, x = GPT(heads=4), tokens(batch=4)
    labels = tokens(batch=4, seed=1)
    pruner = TaylorPruner(model, x, criterion, target=Target.channels(2), every=1, prune_per_step=1,
                          max_fraction=lambda g: 0.5 if "attn.q" in g.name else 0.0)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x).flatten(0, 1), labels.flatten()), lr=0.01)
    small = pruner.finalize()
    heads = [b.attn.q.out_features // 8 for b in small.blocks]
    assert sum(heads) == 6 and [b.fc.out_features for b in small.blocks] == [48, 48]


# -- nn.MultiheadAttention --------------------------------------------------------------------------
torchvision = pytest.importorskip("torchvision")


def small_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48,
                             num_classes=10)


def attention_groups(groups):
    return [g for g in groups if any(m.role == "heads" for m in g.members)]


def test_vit_heads_removed_equal_masked_and_become_pyprune_attention():
    from pyprune_ext.nn import MultiheadAttention

    torch.manual_seed(0)
    groups, removed = assert_removed_equals_masked(small_vit(), torch.randn(2, 3, 32, 32), expect_groups=4)
    heads = attention_groups(groups)
    assert [g.size for g in heads] == [4, 4] and all(g.exact_masking for g in heads)
    assert {(m.name.rsplit(".", 1)[-1], m.role, m.span) for m in heads[0].members} == {
        ("self_attention", "heads", 8), ("out_proj", "in", 8)}
    attention = removed.encoder.layers[0].self_attention
    assert type(attention) is MultiheadAttention
    assert attention.embed_dim == 32 and attention.num_heads < 4 and attention.head_dim == 8
    assert attention.in_proj_weight.shape == (3 * attention.num_heads * 8, 32)


def test_vit_width_prunes_through_the_class_token_and_the_declared_hidden_dim():
    """torchvision's ViT: the class token (expanded over the batch, concatenated before the patches)
    and the position embedding lose the stream's channels, the patch reshape writes hidden_dim
    (declared in pyprune_ext.graph.sizes and recomputed), the LayerNorms take masked statistics."""
    torch.manual_seed(0)
    model, x = small_vit(), torch.randn(4, 3, 32, 32)
    groups = dependency_groups(model, x)
    (stream,) = [g for g in groups if g.name.startswith("residual")]
    assert stream.prunable and stream.exact_with_masked_norms and stream.size == 32
    assert {(m.name, m.dim) for m in stream.members if m.role == "tensor"} == {
        ("class_token", 2), ("encoder.pos_embedding", 2)}
    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(8), every=1, prune_per_step=4, groups=groups,
                          max_fraction=lambda g: 0.25 if g.name.startswith("residual") else 0.0)
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x), torch.tensor([0, 1, 2, 3])), lr=0.01)
    small, difference = finalize_and_compare(pruner, model, lambda m: m(x))
    assert difference <= 1e-4
    assert small.hidden_dim == small.conv_proj.out_channels == 24
    assert small.class_token.shape == (1, 1, 24) and small.encoder.pos_embedding.shape[2] == 24
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)


class Encoder(nn.Module):
    """nn.MultiheadAttention, sequence first, with its (head-averaged) weights read or not."""

    def __init__(self, read_weights=False, per_head=False):
        super().__init__()
        self.read_weights, self.per_head = read_weights, per_head
        self.fc_in = nn.Linear(6, EMBED)
        self.attn = nn.MultiheadAttention(EMBED, 4)
        self.fc_out = nn.Linear(EMBED, 3)

    def forward(self, x):
        h = self.fc_in(x)
        y, weights = self.attn(h, h, h, average_attn_weights=not self.per_head)
        out = self.fc_out(F.relu(y))
        return out + weights.sum() if self.read_weights else out


def test_sequence_first_attention_heads_are_exact_when_weights_are_unused():
    groups, removed = assert_removed_equals_masked(Encoder(), torch.randn(SEQ, 2, 6), expect_groups=2)
    (heads,) = attention_groups(groups)
    assert heads.size == 4 and heads.exact_masking and removed.attn.num_heads < 4


@pytest.mark.parametrize("per_head, verdict", [(False, "inexact"), (True, "blocked")])
def test_read_attention_weights_make_heads_inexact_or_blocked(per_head, verdict):
    groups = dependency_groups(Encoder(read_weights=True, per_head=per_head).eval(), torch.randn(SEQ, 2, 6))
    (heads,) = attention_groups(groups)
    if verdict == "inexact":
        assert heads.prunable and not heads.exact_masking and "averaged over heads" in heads.exact_reason
    else:
        assert not heads.prunable and "per head" in heads.reason


def test_taylor_prunes_vit_heads_and_neurons_uniformly():
    import io

    torch.manual_seed(0)
    model, x = small_vit(), torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    def share(group):  # a quarter of the heads and 30% of the neurons; the width is the next test's
        return 0.0 if group.name.startswith("residual") else 0.25 if "self_attention" in group.name else 0.3

    pruner = TaylorPruner(model, x, "fo_gate", target=Target.channels(2 * (1 + 14)), every=1, prune_per_step=8,
                          max_fraction=share, uniform=True)
    assert pruner.converted_attention == ["encoder.layers.encoder_layer_0.self_attention",
                                          "encoder.layers.encoder_layer_1.self_attention"]
    train_until_done(pruner, model, lambda m: F.cross_entropy(m(x), labels), lr=0.01)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    report_before = pruner.report()
    small = pruner.finalize()
    with torch.no_grad():
        assert relative_difference(masked, small(x)) <= 1e-4
    layers = small.encoder.layers
    assert [l.self_attention.num_heads for l in layers] == [3, 3]
    assert [l.mlp[0].out_features for l in layers] == [34, 34]
    report = pruner.report()
    assert report.measured and report.params_after < report.params_before
    assert report.params_after == report_before.params_after  # the estimate was right
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), small(x))
