"""TaylorPruner: schedule, targets, masking through optimizer steps, physical
removal equal to the masked model, reports, plans, and bad arguments."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.cost import count_cost
from pyprune_ext.graph import zeroed_entries
from pyprune_ext.graph.specs import member_layer
from pyprune_ext.models import TransformerMLPBlock, resnet20
from pyprune_ext.taylor import Target, TaylorPruner, apply_plan


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 5))


def batches(n, shape=(1, 8, 8), classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *shape, generator=gen), torch.randint(0, classes, (16,), generator=gen))
            for _ in range(n)]


def train(model, pruner, data, optimizer, until_done=True):
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.step()
        optimizer.step()
        if until_done and pruner.done:
            break


def masked_entries(pruner):
    """(parameter, dim, positions) the masked channels occupy, from the public groups and alive masks."""
    for i, alive in pruner.alive.items():
        dead = (~alive).nonzero().flatten()
        for member in pruner.groups[i].members:
            positions = torch.tensor([p for c in dead.tolist() for p in member.positions(c)], dtype=torch.long)
            if len(positions):
                module, spec = member_layer(pruner.model, member)
                yield from zeroed_entries(module, member.role, positions, spec)


def masked_channels_are_zero(pruner):
    return all(param.index_select(dim, rows).abs().sum() == 0 for param, dim, rows in masked_entries(pruner))


@pytest.mark.parametrize("criterion", ["fo_bn", "fo_gate", "fo_fg", "fo_weight", "so_fisher"])
def test_flops_target_reached_and_finalized_model_equals_masked(criterion):
    torch.manual_seed(0)
    model = small_cnn()
    x0 = torch.randn(2, 1, 8, 8)
    pruner = TaylorPruner(model, x0, criterion, target=Target.flops(0.5), every=3, prune_per_step=4)
    train(model, pruner, batches(200), torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    assert pruner.done and len(pruner.history) >= 2
    report = pruner.report()
    assert not report.measured and report.flops_kept <= 0.5
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    masked_out = model(x)
    small = pruner.finalize()
    assert small is model
    torch.testing.assert_close(small(x), masked_out, atol=1e-5, rtol=0)
    measured = pruner.report()
    assert measured.measured
    # The estimate the schedule stopped on is the measured cost of the rebuilt model.
    assert (measured.macs_after, measured.params_after) == (report.macs_after, report.params_after)
    after = count_cost(small, x0)
    assert after.total_macs == measured.macs_after and after.total_params == sum(p.numel() for p in small.parameters())
    assert measured.params_after < measured.params_before
    assert "MACs kept" in measured.format_table()


def test_channels_target_removes_exactly_that_many_and_keeps_them_zero_through_adam():
    torch.manual_seed(1)
    model = small_cnn()
    pruner = TaylorPruner(model, torch.randn(2, 1, 8, 8), target=Target.channels(13), every=2, prune_per_step=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, pruner, batches(60), opt, until_done=False)  # keeps training long after pruning ended
    assert pruner.done and pruner.channels_removed == 13
    assert [s.channels_removed for s in pruner.history] == [5, 10, 13]
    assert masked_channels_are_zero(pruner)
    for param, dim, rows in masked_entries(pruner):  # Adam moments at pruned channels stay zero too
        for state in opt.state[param].values():
            if state.shape == param.shape:
                assert state.index_select(dim, rows).abs().sum() == 0


def test_step_without_backward_counts_nothing():
    model = small_cnn()
    pruner = TaylorPruner(model, torch.randn(2, 1, 8, 8), target=3, every=1)
    assert pruner.step() is None and pruner.minibatches == 0
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    assert pruner.step() is None and pruner.minibatches == 0


def test_never_removes_a_groups_last_channel_and_warns_when_target_unreachable():
    torch.manual_seed(2)
    model = small_cnn()
    pruner = TaylorPruner(model, torch.randn(2, 1, 8, 8), target=Target.params(0.001), every=1, prune_per_step=50)
    with pytest.warns(UserWarning, match="stopped before its target"):
        train(model, pruner, batches(20), torch.optim.SGD(model.parameters(), lr=0.01))
    assert pruner.done
    assert all(int(a.sum()) == 1 for a in pruner.alive.values())
    small = pruner.finalize()
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 5)


def test_round_to_keeps_channel_counts_multiples():
    torch.manual_seed(3)
    model = small_cnn()
    pruner = TaylorPruner(model, torch.randn(2, 1, 8, 8), target=Target.flops(0.4), every=2, prune_per_step=6,
                          round_to=4)
    train(model, pruner, batches(200), torch.optim.SGD(model.parameters(), lr=0.01))
    assert pruner.channels_removed > 0
    for i, alive in pruner.alive.items():
        if pruner.groups[i].size >= 4:
            assert int(alive.sum()) % 4 == 0, pruner.groups[i].name


def test_local_scope_spreads_pruning_over_groups():
    torch.manual_seed(4)
    model = small_cnn()
    pruner = TaylorPruner(model, torch.randn(2, 1, 8, 8), target=Target.flops(0.6), every=2, prune_per_step=8,
                          scope="local")
    train(model, pruner, batches(100), torch.optim.SGD(model.parameters(), lr=0.01))
    removed = [int((~a).sum()) for a in pruner.alive.values()]
    assert all(r > 0 for r in removed), removed


def test_ignore_keeps_a_layers_channels():
    model = small_cnn()
    pruner = TaylorPruner(model, torch.randn(2, 1, 8, 8), target=Target.flops(0.5), every=1, prune_per_step=10,
                          ignore=[model[0]])
    train(model, pruner, batches(60), torch.optim.SGD(model.parameters(), lr=0.01))
    pruner.finalize()
    assert model[0].out_channels == 12 and model[3].out_channels < 16


def test_resnet20_residual_groups_and_plan_replay_for_state_dict_loading():
    torch.manual_seed(5)
    model = resnet20(num_classes=5, in_channels=1)
    x0 = torch.randn(2, 1, 8, 8)
    pruner = TaylorPruner(model, x0, target=Target.flops(0.6), every=2, prune_per_step=16)
    train(model, pruner, batches(100), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    expected = model(x)
    pruner.finalize()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    # Whole-module save, and state_dict into a fresh model rebuilt from the plan.
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected, atol=1e-5, rtol=0)
    fresh = apply_plan(resnet20(num_classes=5, in_channels=1), x0, pruner.plan())
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no channel group named"):
        apply_plan(small_cnn(), torch.randn(2, 1, 8, 8), pruner.plan())


def test_finalized_model_needs_nothing_from_pyprune():
    model = small_cnn()
    pruner = TaylorPruner(model, torch.randn(2, 1, 8, 8), "fo_fg", target=4, every=1, prune_per_step=4)
    train(model, pruner, batches(3), torch.optim.SGD(model.parameters(), lr=0.01))
    pruner.finalize()
    for module in model.modules():
        assert type(module).__module__.startswith("torch.nn"), type(module)
        assert not module._forward_hooks and not module._forward_pre_hooks
    for p in model.parameters():
        assert not p._backward_hooks
    with pytest.raises(RuntimeError, match="after finalize"):
        pruner.step()


def test_transformer_block_prunes_the_hidden_channels_only():
    torch.manual_seed(6)
    model = nn.Sequential(TransformerMLPBlock(16, 32), nn.Linear(16, 3))
    x0 = torch.randn(2, 5, 16)
    pruner = TaylorPruner(model, x0, "fo_gate", target=Target.channels(12), every=1, prune_per_step=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(5):
        x, y = torch.randn(8, 5, 16), torch.randint(0, 3, (8,))
        loss = F.cross_entropy(model(x).mean(1), y)
        opt.zero_grad()
        loss.backward()
        pruner.step()
        opt.step()
    assert pruner.done
    x = torch.randn(2, 5, 16)
    expected = model(x)
    pruner.finalize()
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][0]
    assert hidden.out_features == 32 - 12
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_torchvision_resnet18_prunes_and_finalizes():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    model = torchvision.models.resnet18(num_classes=4)
    x0 = torch.randn(2, 3, 32, 32)
    pruner = TaylorPruner(model, x0, target=Target.flops(0.8), every=1, prune_per_step=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in batches(30, shape=(3, 32, 32), classes=4):
        loss = F.cross_entropy(model(x[:4]), y[:4])
        opt.zero_grad()
        loss.backward()
        pruner.step()
        opt.step()
        if pruner.done:
            break
    assert pruner.done
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    pruner.finalize()
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    assert pruner.report().flops_kept <= 0.8


@pytest.mark.parametrize("kwargs, message", [
    (dict(target=1.5), "strictly between 0 and 1"),
    (dict(target=None), "target is required"),
    (dict(target=(lambda: Target("speed", 0.5))), "target kind"),
    (dict(target=0.5, scope="everywhere"), "scope must be"),
    (dict(target=0.5, every=0), "every must be"),
    (dict(target=0.5, momentum=1.0), "momentum must be"),
    (dict(target=0.5, criterion="fo_magic"), "unknown Taylor criterion"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        if callable(kwargs.get("target")):
            kwargs["target"] = kwargs["target"]()
        TaylorPruner(small_cnn(), torch.randn(2, 1, 8, 8), **kwargs)


class FixedScores:
    """An importance criterion with the same scores at every step: ``score(group)``."""

    def __init__(self, groups, score):
        self.groups, self.score = groups, score

    def attach(self):
        return self

    def end_minibatch(self):
        return True

    def means(self):
        return [torch.full((g.size,), float(self.score(g)), dtype=torch.float64) for g in self.groups]

    def reset(self):
        pass

    def detach(self):
        pass


def vit_pruner(score, **kwargs):
    """models.vit on 28x28 (16 tokens of width 64; 4 heads of 16 and 128 MLP neurons per block)."""
    from pyprune_ext.graph import dependency_groups
    from pyprune_ext.models import vit
    torch.manual_seed(0)
    model = vit((1, 28, 28), 10)
    example = torch.zeros(2, 1, 28, 28)
    groups = dependency_groups(model, (example,))
    pruner = TaylorPruner(model, example, FixedScores(groups, score), groups=groups, every=1, **kwargs)
    return pruner, {pruner.groups[i].name.split(":")[0]: i for i in pruner.prunable}


def test_channel_costs_are_the_macs_and_params_one_more_channel_removal_saves():
    pruner, index = vit_pruner(lambda g: 1.0, target=Target.channels(1))
    macs, params = pruner.channel_costs("macs"), pruner.channel_costs("params")
    tokens, width, head_dim, hidden = 16, 64, 16, 128
    # a head: its q, k, v rows and out_proj columns; a neuron: a row of fc1 and a column of fc2 (+ fc1's bias)
    assert macs[index["blocks.0.attn"]] == 4 * head_dim * width * tokens
    assert params[index["blocks.0.attn"]] == 4 * head_dim * width + 3 * head_dim
    assert macs[index["blocks.2.mlp.0"]] == 2 * width * tokens
    assert params[index["blocks.2.mlp.0"]] == 2 * width + 1
    with pytest.raises(ValueError, match="kind must be 'macs' or 'params'"):
        pruner.channel_costs("latency")


def test_channel_costs_follow_the_channels_masked_so_far():
    # the residual width scores lowest: pruning it makes every neuron and head cheaper
    pruner, index = vit_pruner(lambda g: 0.0 if g.name.startswith("residual") else 1.0,
                               target=Target.channels(16), prune_per_step=16)
    before = pruner.channel_costs()
    pruner.prune_now()
    assert int((~pruner.alive[index["residual"]]).sum()) == 16
    after = pruner.channel_costs()
    assert after[index["blocks.1.mlp.0"]] == before[index["blocks.1.mlp.0"]] * 48 // 64
    assert after[index["blocks.1.attn"]] == before[index["blocks.1.attn"]] * 48 // 64


@pytest.mark.parametrize("normalize, first", [(False, "mlp"), ("macs", "attn"), ("params", "attn")])
def test_normalize_by_cost_ranks_importance_per_mac(normalize, first):
    # a head scores 10x a neuron but costs 32x its MACs (and ~32x its parameters): per MAC it is worth less
    def score(group):
        return 10.0 if group.name.endswith("attn") else 100.0 if group.name.startswith("residual") else 1.0
    pruner, index = vit_pruner(score, target=Target.channels(1), prune_per_step=1, normalize=normalize)
    pruner.prune_now()
    (lost,) = [pruner.groups[i].name for i, alive in pruner.alive.items() if not bool(alive.all())]
    assert first in lost


@pytest.mark.parametrize("normalize", ["flops", 1, "L2"])
def test_normalize_refuses_an_unknown_normalisation(normalize):
    with pytest.raises(ValueError, match="normalize must be False, True or one of 'l2', 'macs', 'params'"):
        TaylorPruner(small_cnn(), torch.randn(2, 1, 8, 8), target=0.5, normalize=normalize)
