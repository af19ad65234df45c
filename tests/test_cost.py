"""pyprune_ext.cost: per-layer parameter and MAC counts checked against hand computations."""

import json

import pytest
import torch
from torch import nn

from pyprune_ext import models
from pyprune_ext.cost import count_cost


def total_params(model):
    return sum(p.numel() for p in model.parameters())


def row(cost, name):
    (match,) = [r for r in cost.layers if r.name == name]
    return match


def test_conv2d_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    cost = count_cost(model, torch.randn(1, 3, 10, 10))
    (conv,) = cost.layers
    assert conv.macs == 8 * 10 * 10 * 3 * 9
    assert conv.params == 8 * 3 * 9 + 8
    assert (conv.name, conv.type, conv.in_features, conv.out_features) == ("0", "Conv2d", 3, 8)
    assert conv.output_shape == (8, 10, 10) and conv.calls == 1
    assert cost.total_macs == conv.macs and cost.total_params == conv.params


def test_macs_are_per_example_whatever_the_batch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(800, 5))
    one = count_cost(model, torch.randn(1, 3, 10, 10))
    many = count_cost(model, torch.randn(6, 3, 10, 10))
    assert one.total_macs == many.total_macs == 8 * 10 * 10 * 3 * 9 + 800 * 5
    assert many.batch_size == 6 and many.input_shapes == ((6, 3, 10, 10),)


def test_grouped_strided_conv_and_conv1d_by_hand():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, groups=4, bias=False),  # 9x9 -> 4x4
                          nn.Flatten(2), nn.Conv1d(16, 4, 5))                   # 16 -> 12
    cost = count_cost(model, torch.randn(2, 8, 9, 9))
    assert row(cost, "0").macs == 16 * 4 * 4 * (8 // 4) * 9
    assert row(cost, "0").params == 16 * 2 * 9
    assert row(cost, "2").macs == 4 * 12 * 16 * 5
    assert row(cost, "2").output_shape == (4, 12)


def test_transposed_conv_by_hand():
    model = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    cost = count_cost(model, torch.randn(1, 4, 5, 5))
    assert cost.layers[0].name == ""  # the model itself is the layer
    assert cost.total_macs == 4 * 5 * 5 * (6 // 2) * 9


def test_linear_over_tokens_by_hand():
    block = models.TransformerMLPBlock(dim=16, hidden=64)
    cost = count_cost(block, torch.randn(3, 7, 16))
    assert row(cost, "fc1").macs == 7 * 16 * 64
    assert row(cost, "fc2").macs == 7 * 64 * 16
    assert row(cost, "norm").macs == 0 and row(cost, "norm").params == 32
    with_norm = count_cost(block, torch.randn(3, 7, 16), norm_macs=True)
    assert row(with_norm, "norm").macs == 7 * 16
    assert with_norm.total_macs == cost.total_macs + 7 * 16
    assert cost.total_params == total_params(block)


def test_lenet300_cost():
    model = models.lenet300()
    cost = count_cost(model, torch.randn(1, 1, 28, 28))
    assert cost.total_macs == 784 * 300 + 300 * 100 + 100 * 10
    assert cost.total_params == total_params(model) == cost.layer_params
    assert [r.name for r in cost.layers] == ["fc1", "fc2", "fc3"]


def test_batchnorm_params_and_state_untouched():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = count_cost(model, torch.randn(1, 2, 3, 3))  # batch of 1: fine in eval mode
    bn = row(cost, "1")
    assert (bn.type, bn.params, bn.macs, bn.in_features) == ("BatchNorm2d", 8, 0, 4)
    assert count_cost(model, torch.randn(1, 2, 3, 3), norm_macs=True).layers[1].macs == 4 * 9
    assert model.training and model[0].training and not model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


class WithExtras(nn.Module):
    """A parameter outside any counted layer, a shared layer called twice, and a
    layer that never runs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))
        self.shared = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 3)

    def forward(self, x):
        return self.shared(self.shared(x * self.scale))


def test_totals_cover_all_parameters_and_shared_layers():
    model = WithExtras()
    cost = count_cost(model, torch.randn(2, 5))
    assert cost.total_params == total_params(model) == 5 + 30 + 18
    assert cost.other_params == 5
    shared, unused = row(cost, "shared"), row(cost, "unused")
    assert (shared.calls, shared.macs, shared.params) == (2, 2 * 25, 30)
    assert (unused.calls, unused.macs, unused.output_shape) == (0, 0, None)
    assert cost.total_macs == 50


def test_tied_weights_counted_once():
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    cost = count_cost(model, torch.randn(1, 4))
    assert cost.layer_params == cost.total_params == 16
    assert cost.other_params == 0


def test_multiple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    cost = count_cost(Two(), (torch.randn(2, 3), torch.randn(2, 4)))
    assert cost.total_macs == 3 * 2 + 4 * 2
    assert cost.input_shapes == ((2, 3), (2, 4))


def test_bad_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        count_cost(nn.Linear(2, 2), "x")
    with pytest.raises(ValueError, match="batch dimension"):
        count_cost(nn.Linear(2, 2), torch.randn(0, 2))


def test_format_table_and_dict():
    model = models.resnet20()
    cost = count_cost(model, torch.randn(1, 3, 32, 32))
    table = cost.format_table()
    lines = table.splitlines()
    assert len(lines) == 2 + len(cost.layers) + 3
    for r in cost.layers:
        assert r.name in table
    assert f"{cost.total_params:,}" in table and f"{cost.total_macs:,}" in table
    assert "layer2.0.shortcut.0" in table and str(cost) == table
    # The table's MACs column adds up to the total.
    assert sum(int(line.split()[-1].replace(",", "")) for line in lines[2:-3]) == cost.total_macs
    assert json.loads(json.dumps(cost.to_dict()))["total_macs"] == cost.total_macs


def test_resnet20_cost_by_hand():
    cost = count_cost(models.resnet20(), torch.randn(1, 3, 32, 32))
    # A 3x3 conv at full width costs the same in every stage (channels double as the
    # area quarters); each downsampling conv costs half of that.
    full = 9 * 16 * 16 * 32 * 32
    stages = 6 * full + 2 * (5 * full + full // 2)
    stem = 9 * 3 * 16 * 32 * 32
    shortcuts = 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8
    assert cost.total_macs == stem + stages + shortcuts + 64 * 10


def test_torchvision_resnet18_at_224():
    pytest.importorskip("torchvision")
    model = models.resnet18()
    cost = count_cost(model, torch.randn(1, 3, 224, 224))
    assert cost.total_macs == pytest.approx(1.82e9, rel=0.01)
    assert cost.total_params == total_params(model)
    assert cost.total_params == pytest.approx(11.69e6, rel=1e-3)
    assert row(cost, "conv1").macs == 64 * 112 * 112 * 3 * 49
    assert row(cost, "fc").macs == 512 * 1000
