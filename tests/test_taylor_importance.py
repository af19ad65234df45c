"""The importance protocol and registry: the two user-defined criteria of
examples/custom_importance.py remove exactly the channels their scores say on
models whose weights make the answer known; criteria by name, class or object in
TaylorPruner and in the CLI's choices; and the errors for everything else."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.cli import build_parser
from pyprune_ext.cli.common import UsageError
from pyprune_ext.cli.launch import check_nproc
from pyprune_ext.graph import Member, dependency_groups
from pyprune_ext.taylor import (CRITERIA, Importance, Target, TaylorImportance, TaylorPruner, register_importance,
                                registered_importances, unregister_importance)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_importance.py"


def load_example():
    spec = importlib.util.spec_from_file_location("custom_importance", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()
X0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def names():
    """Registers test criteria through the returned function; removes them afterwards."""
    added = []

    def register(name, factory, **kwargs):
        register_importance(name, factory, **kwargs)
        added.append(name)
    yield register
    for name in added:
        if name in registered_importances():
            unregister_importance(name)


def group_index(groups, producer: str) -> int:
    return next(i for i, g in enumerate(groups) if any(m.name == producer and m.role == "out" for m in g.members))


def fill_rows_(weight: torch.Tensor, l1_norms) -> None:
    """Row c of ``weight`` (dim 0) gets L1 norm ``l1_norms[c]``, with alternating signs."""
    with torch.no_grad():
        for c, norm in enumerate(l1_norms):
            row = weight[c]
            row.fill_(norm / row.numel())
            row.view(-1)[::2] *= -1


def removed(pruner) -> dict[int, list[int]]:
    return {i: (~alive).nonzero().flatten().tolist() for i, alive in pruner.alive.items() if not alive.all()}


def prune_once(model, importance, channels: int, **kwargs) -> TaylorPruner:
    """One pruning step of ``channels`` channels. The criteria read the weights,
    so no forward or backward pass is needed for the scores."""
    pruner = TaylorPruner(model, X0, importance=importance, target=Target.channels(channels), every=1,
                          prune_per_step=channels, **kwargs)
    pruner.step()
    assert pruner.done and pruner.channels_removed == channels
    return pruner


# ---------------------------------------------------------------- L1 magnitude

def depthwise_cnn() -> nn.Sequential:
    """conv -> BN -> depthwise conv -> BN -> conv -> BN -> linear: the first
    group's channels run through two producers (the conv and the depthwise conv)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


FIRST_L1 = [5.0, 1.0, 7.0, 3.0, 9.0, 2.0]            # conv 0's filters
DEPTHWISE_L1 = [0.5, 0.5, 0.5, 0.5, 0.5, 3.0]        # conv 3's filters, in the same group as conv 0's
THIRD_L1 = [4.0, 0.5, 8.0, 6.0, 10.0, 11.0, 12.0, 1.75]  # conv 6's filters


def known_l1_model() -> nn.Sequential:
    model = depthwise_cnn()
    fill_rows_(model[0].weight, FIRST_L1)
    fill_rows_(model[3].weight, DEPTHWISE_L1)
    fill_rows_(model[6].weight, THIRD_L1)
    with torch.no_grad():
        model[11].weight.fill_(100.0)  # the consumer's input columns: an L1 over "in" members would see these
    return model


def test_l1_scores_are_the_producers_filter_norms_summed():
    model = known_l1_model()
    groups = dependency_groups(model, (X0,))
    scores = example.L1Magnitude(model, groups).means()
    first, third = group_index(groups, "0"), group_index(groups, "6")
    assert {m.role for m in groups[first].members_with_role("out", "depthwise")} == {"out", "depthwise"}
    torch.testing.assert_close(scores[first], torch.tensor(FIRST_L1) + torch.tensor(DEPTHWISE_L1))
    torch.testing.assert_close(scores[third], torch.tensor(THIRD_L1))


def test_l1_criterion_removes_exactly_the_lowest_l1_channels():
    model = known_l1_model()
    pruner = prune_once(model, example.L1Magnitude, 4)
    first, third = group_index(pruner.groups, "0"), group_index(pruner.groups, "6")
    # The four lowest over both groups: 0.5 (conv 6, ch 1), 1.5 (conv 0, ch 1), 1.75 (conv 6, ch 7) and
    # 3.5 (conv 0, ch 3); conv 0's ch 5 (2 + 3) stays only because the depthwise filter counts.
    assert removed(pruner) == {first: [1, 3], third: [1, 7]}
    kept_first = model[0].weight[[0, 2, 4, 5]].clone()
    small = pruner.finalize()
    assert small[0].out_channels == 4 and small[3].groups == 4 and small[6].out_channels == 6
    torch.testing.assert_close(small[0].weight, kept_first)


def test_channel_sums_follow_member_positions():
    spanning = Member("fc", "in", offset=1, span=2)  # group channel c is features 2 + 2c, 3 + 2c
    torch.testing.assert_close(example.channel_sums(torch.arange(8.0), spanning, 3), torch.tensor([5.0, 9.0, 13.0]))


# ------------------------------------------------------------------- BN scale

def bn_cnn(hidden_linear: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    head = [nn.Linear(8 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 5)] if hidden_linear else [nn.Linear(8 * 4 * 4, 5)]
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), *head)


def test_bn_scale_criterion_removes_exactly_the_smallest_gammas(names):
    model = bn_cnn()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.1, 2.0, -3.0, 0.05, 1.0]))
        model[4].weight.copy_(torch.tensor([1.0, 0.2, -0.3, 4.0, 0.01, 2.0, 5.0, -0.15]))
        model[0].weight.fill_(0.0)  # a magnitude criterion would rank these first: BN scale must not
    names("test_bn_scale", example.BNScale)
    pruner = prune_once(model, "test_bn_scale", 4)
    first, second = group_index(pruner.groups, "0"), group_index(pruner.groups, "3")
    # |gamma| lowest four: 0.01 (bn 4, ch 4), 0.05 (bn 1, ch 4), 0.1 (bn 1, ch 1), 0.15 (bn 4, ch 7).
    assert removed(pruner) == {first: [1, 4], second: [4, 7]}
    small = pruner.finalize()
    torch.testing.assert_close(small[4].weight, torch.tensor([1.0, 0.2, -0.3, 4.0, 2.0, 5.0]))


def test_bn_scale_refuses_a_group_without_batchnorm_until_it_is_ignored():
    model = bn_cnn(hidden_linear=True)
    hidden = group_index(dependency_groups(model, (X0,)), "8")
    pruner = TaylorPruner(model, X0, importance=example.BNScale, target=Target.channels(2), every=1)
    name = pruner.groups[hidden].name
    with pytest.raises(ValueError, match=rf"BNScale gave no scores for channel group '{name}' .*ignore="):
        pruner.step()
    pruner.remove()
    model = bn_cnn(hidden_linear=True)
    pruner = prune_once(model, example.BNScale, 2, ignore=[model[8]])
    assert hidden not in pruner.alive  # left alone; the two channels came from the convolutions


# ------------------------------------------------------- names, classes, objects

def test_a_registered_name_a_class_and_an_object_prune_the_same_channels(names):
    names("test_l1", example.L1Magnitude)
    assert registered_importances()[:len(CRITERIA)] == CRITERIA and registered_importances()[-1] == "test_l1"
    by_name = removed(prune_once(known_l1_model(), "test_l1", 3))
    by_class = removed(prune_once(known_l1_model(), example.L1Magnitude, 3))
    model = known_l1_model()
    groups = dependency_groups(model, (X0,))
    by_object = removed(prune_once(model, example.L1Magnitude(model, groups), 3, groups=groups))
    assert by_name == by_class == by_object and sum(map(len, by_name.values())) == 3


def test_criterion_stays_an_alias_positional_and_keyword(names):
    names("test_l1", example.L1Magnitude)
    model = known_l1_model()
    positional = TaylorPruner(model, X0, "fo_gate", target=Target.channels(1))
    keyword = TaylorPruner(known_l1_model(), X0, criterion="test_l1", target=Target.channels(1))
    default = TaylorPruner(known_l1_model(), X0, target=Target.channels(1))
    assert isinstance(positional.importance, TaylorImportance) and positional.importance.criterion == "fo_gate"
    assert isinstance(keyword.importance, example.L1Magnitude)
    assert default.importance.criterion == "fo_bn"
    with pytest.raises(TypeError, match="give importance= or its older name criterion=, not both"):
        TaylorPruner(known_l1_model(), X0, "fo_bn", criterion="fo_gate", target=Target.channels(1))


def test_factories_get_the_options_their_signature_takes():
    seen = {}

    def named(model, groups, device):
        seen["named"] = {"device": device}
        return example.L1Magnitude(model, groups)

    def catch_all(model, groups, **options):
        seen["catch_all"] = options
        return example.L1Magnitude(model, groups)

    for factory in (named, catch_all):
        TaylorPruner(known_l1_model(), X0, importance=factory, target=Target.channels(1), square_then_sum=True)
    assert seen["named"] == {"device": torch.device("cpu")}
    assert seen["catch_all"] == {"device": torch.device("cpu"), "sync": None, "square_then_sum": True}


def test_an_attached_taylor_importance_passed_in_counts_each_minibatch_once():
    torch.manual_seed(3)
    model = bn_cnn()
    groups = dependency_groups(model, (X0,))
    twice = TaylorImportance(model, groups, "fo_gate").attach().attach()
    once = TaylorImportance(model, groups, "fo_gate").attach()
    pruner = TaylorPruner(model, X0, importance=twice, groups=groups, target=Target.channels(1), every=10)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y).backward()
    pruner.step()
    once.end_minibatch()
    for mine, reference in zip(pruner.importance.means(), once.means()):
        torch.testing.assert_close(mine, reference)
    assert any(m.abs().sum() > 0 for m in once.means())


# ------------------------------------------------------------------------ CLI

def test_the_cli_offers_registered_criteria(names, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["taylor", "--criterion", "test_l1"])
    assert "invalid choice: 'test_l1'" in capsys.readouterr().err
    names("test_l1", example.L1Magnitude)
    args = build_parser().parse_args(["taylor", "--criterion", "test_l1"])
    assert args.criterion == "test_l1"
    assert build_parser().parse_args(["taylor"]).criterion == "fo_bn"


def test_the_cli_refuses_a_registered_criterion_across_processes(names):
    names("test_l1", example.L1Magnitude)
    args = argparse.Namespace(command="taylor", criterion="test_l1", nproc=2, device="cpu", batch_size=60)
    with pytest.raises(UsageError, match="registered in this process only"):
        check_nproc(args)
    check_nproc(argparse.Namespace(**{**vars(args), "criterion": "fo_bn"}))  # built in: every process has it


# --------------------------------------------------------------------- errors

class Constant(Importance):
    """Scores every channel ``value`` (for the error tests)."""

    def __init__(self, model, groups, value=1.0, shape=None, count=None):
        self.groups, self.value, self.shape, self.count = list(groups), value, shape, count

    def end_minibatch(self):
        return True

    def means(self):
        out = [torch.full(self.shape or (g.size,), self.value) for g in self.groups]
        return out[:self.count] if self.count is not None else out


def test_registry_errors(names):
    names("test_l1", example.L1Magnitude)
    with pytest.raises(ValueError, match=r"unknown Taylor criterion 'fo_magic'; registered importance criteria: "
                                         r"fo_bn, fo_gate, fo_fg, fo_weight, so_fisher, test_l1"):
        TaylorPruner(known_l1_model(), X0, importance="fo_magic", target=1)
    with pytest.raises(ValueError, match="'test_l1' is already registered .*L1Magnitude.*replace=True"):
        register_importance("test_l1", Constant)
    register_importance("test_l1", Constant, replace=True)
    assert isinstance(TaylorPruner(known_l1_model(), X0, importance="test_l1", target=1).importance, Constant)
    with pytest.raises(TypeError, match="the factory must be callable"):
        register_importance("test_bad", 42)
    model = known_l1_model()
    with pytest.raises(TypeError, match="not a built Constant object"):
        register_importance("test_bad", Constant(model, []))
    for bad in ("", "two words", 7):
        with pytest.raises(ValueError, match="non-empty string without spaces"):
            register_importance(bad, Constant)
    with pytest.raises(ValueError, match="unknown Taylor criterion 'nothing'"):
        unregister_importance("nothing")
    assert "test_bad" not in registered_importances()


def test_objects_and_factories_that_do_not_follow_the_protocol():
    with pytest.raises(TypeError, match="got a object, which lacks attach, end_minibatch, means, reset, detach"):
        TaylorPruner(known_l1_model(), X0, importance=object(), target=1)
    with pytest.raises(TypeError, match=r"returned a dict, which is not an importance object: it lacks attach"):
        TaylorPruner(known_l1_model(), X0, importance=lambda model, groups: {}, target=1)

    class NoMeans(Importance):
        def __init__(self, model, groups):
            pass

        def end_minibatch(self):
            return True
    with pytest.raises(TypeError, match="abstract method 'means'|abstract method means"):
        TaylorPruner(known_l1_model(), X0, importance=NoMeans, target=1)


@pytest.mark.parametrize("options, message", [
    (dict(count=1), r"gave 1 score tensors for \d+ channel groups: build it for the groups the pruner uses"),
    (dict(shape=(3,)), r"scores of shape \(3,\) and dtype torch.float32; expected \d+ real scores"),
    (dict(value=float("nan")), "NaN scores"),
])
def test_scores_of_the_wrong_kind_are_refused_naming_the_group(options, message):
    factory = lambda model, groups: Constant(model, groups, **options)  # noqa: E731
    pruner = TaylorPruner(known_l1_model(), X0, importance=factory, target=Target.channels(1), every=1)
    with pytest.raises(ValueError, match=message):
        pruner.step()


# -------------------------------------------------------------------- example

def test_the_example_runs(capsys):
    try:
        example.main(["--epochs", "1", "--target-flops", "0.8"])
    finally:
        unregister_importance("bn_scale")
    out = capsys.readouterr().out
    assert out.count("MACs kept") == 2 and "L1 magnitude: test accuracy" in out and "BN scale" in out
