"""Taylor importance estimators against plain-PyTorch references: explicit
gates for dL/dz, retained activations and gradients for the per-example terms."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext.graph import dependency_groups
from pyprune_ext.taylor import TaylorImportance


class Block(nn.Module):
    """conv-BN-ReLU, then conv-BN added to a 1x1 shortcut and ReLU, pooled into
    a classifier. `inplace` writes into the BatchNorm outputs the way
    torchvision's ResNet does (`out += identity`, ReLU(inplace=True))."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.short, self.bn_s = nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(5, 4)
        self.taps = {}

    def forward(self, x):
        a1 = self.bn1(self.conv1(x))
        self._tap("bn1", a1)
        h = self.relu(a1)
        a2 = self.bn2(self.conv2(h))
        self._tap("bn2", a2)
        identity = self.bn_s(self.short(x))
        self._tap("bn_s", identity)
        if self.inplace:
            a2 += identity
            out = self.relu(a2)
        else:
            out = self.relu(a2 + identity)
        return self.fc(out.mean((2, 3)))

    def _tap(self, name, a):
        if not self.inplace and a.requires_grad:  # the reference keeps a and dL/da
            a.retain_grad()
            self.taps[name] = a


def reference_terms(model: Block, x, y):
    """first = sum_n s[n], second = sum_n s[n]^2 per tapped BatchNorm output."""
    ref = copy.deepcopy(model)
    ref.inplace = False
    ref.relu = nn.ReLU()
    ref.taps = {}
    F.cross_entropy(ref(x), y).backward()
    out = {}
    for name, a in ref.taps.items():
        s = (a.grad * a).sum((2, 3)).double()
        out[name] = (s.sum(0), (s ** 2).sum(0))
    bn_gate = {name: (getattr(ref, name).weight * getattr(ref, name).weight.grad
                      + getattr(ref, name).bias * getattr(ref, name).bias.grad).double()
               for name in ("bn1", "bn2", "bn_s")}
    return out, bn_gate


def group_of(groups, module_name):
    return next(i for i, g in enumerate(groups) if any(gt.name == module_name for gt in g.gates))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Block(inplace=True)
    for bn in (model.bn1, model.bn2, model.bn_s):  # non-trivial affine parameters
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    x, y = torch.randn(8, 3, 7, 7), torch.randint(0, 4, (8,))
    groups = dependency_groups(model, (x[:2],))
    return model, x, y, groups


def run_once(model, groups, criterion, x, y):
    importance = TaylorImportance(model, groups, criterion).attach()
    F.cross_entropy(model(x), y).backward()
    assert importance.end_minibatch()
    importance.detach()
    return importance.means()


def test_gate_estimators_match_reference_through_inplace_ops(setup):
    model, x, y, groups = setup
    terms, _ = reference_terms(model, x, y)
    i1, i_res = group_of(groups, "bn1"), group_of(groups, "bn2")
    assert group_of(groups, "bn_s") == i_res  # the residual add couples bn2 and the shortcut
    expected = {
        "fo_gate": lambda f, s, b: f ** 2,
        "fo_fg": lambda f, s, b: s,
        "so_fisher": lambda f, s, b: (-f + 0.5 * b * s) ** 2,
    }
    for criterion, formula in expected.items():
        scores = run_once(copy.deepcopy(model), groups, criterion, x, y)
        torch.testing.assert_close(scores[i1], formula(*terms["bn1"], 8), rtol=1e-4, atol=1e-12)
        want_res = formula(*terms["bn2"], 8) + formula(*terms["bn_s"], 8)  # members' scores summed
        torch.testing.assert_close(scores[i_res], want_res, rtol=1e-4, atol=1e-12)
        assert scores[i1].abs().sum() > 0


def test_fo_bn_equals_gate_gradient_squared(setup):
    model, x, y, groups = setup
    terms, bn_gate = reference_terms(model, x, y)
    # The BatchNorm identity: gamma * dL/dgamma + beta * dL/dbeta = dL/dz = sum_n s[n].
    for name in ("bn1", "bn2", "bn_s"):
        torch.testing.assert_close(bn_gate[name], terms[name][0], rtol=1e-4, atol=1e-9)
    scores = run_once(copy.deepcopy(model), groups, "fo_bn", x, y)
    i1, i_res = group_of(groups, "bn1"), group_of(groups, "bn2")
    torch.testing.assert_close(scores[i1], bn_gate["bn1"] ** 2, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(scores[i_res], bn_gate["bn2"] ** 2 + bn_gate["bn_s"] ** 2, rtol=1e-4, atol=1e-12)


def test_fo_weight_matches_filter_sums(setup):
    model, x, y, groups = setup
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    conv = ref.conv1
    per_filter = (conv.weight * conv.weight.grad).sum((1, 2, 3)) + conv.bias * conv.bias.grad
    squares = (conv.weight * conv.weight.grad).pow(2).sum((1, 2, 3)) + (conv.bias * conv.bias.grad) ** 2
    i1 = group_of(groups, "bn1")
    torch.testing.assert_close(run_once(copy.deepcopy(model), groups, "fo_weight", x, y)[i1],
                               per_filter.double() ** 2, rtol=1e-4, atol=1e-12)
    importance = TaylorImportance(copy.deepcopy(model), groups, "fo_weight", square_then_sum=True).attach()
    F.cross_entropy(importance.parts[0].model(x), y).backward()
    importance.end_minibatch()
    torch.testing.assert_close(importance.means()[i1], squares.double(), rtol=1e-4, atol=1e-12)


def test_scores_are_means_over_minibatches_and_independent_of_grad_accumulation(setup):
    model, x, y, groups = setup
    importance = TaylorImportance(model, groups, "fo_bn").attach()
    singles = []
    for half in (slice(0, 4), slice(4, 8)):
        single = run_once(copy.deepcopy(model), groups, "fo_bn", x[half], y[half])
        singles.append(single)
        F.cross_entropy(model(x[half]), y[half]).backward()  # .grad accumulates: scores must not
        importance.end_minibatch()
    assert importance.scores.minibatches == 2
    for i, mean in enumerate(importance.means()):
        torch.testing.assert_close(mean, (singles[0][i] + singles[1][i]) / 2)
    importance.reset()
    assert importance.scores.minibatches == 0 and all(m.abs().sum() == 0 for m in importance.means())
    assert not importance.end_minibatch()  # no backward since: nothing counted


def test_gate_hooks_keep_no_activation_without_backward(setup):
    model, x, y, groups = setup
    importance = TaylorImportance(model, groups, "fo_fg").attach()
    refs = []
    model.bn1.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    out = model(x)
    del out
    gc.collect()
    assert refs and refs[0]() is None  # the graph was dropped: nothing of ours holds the activation
    with torch.no_grad():
        model(x)
    assert not importance.end_minibatch()


def test_unknown_criterion_is_a_clear_error(setup):
    model, x, y, groups = setup
    with pytest.raises(ValueError, match="unknown Taylor criterion 'fo_magic'"):
        TaylorImportance(model, groups, "fo_magic")
