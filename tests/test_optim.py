"""build_optimizer: fused Adam / AdamW by default, the caller's choice kept,
and the same updates as torch's unfused Adam."""

import pytest
import torch
from torch import nn

from pyprune_ext.lottery import LotteryConfig
from pyprune_ext.lottery.training import make_optimizer
from pyprune_ext.optim import build_optimizer


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_is_fused_by_default(cls):
    layer = nn.Linear(4, 3)
    assert build_optimizer(cls, layer.parameters(), lr=1e-3).defaults["fused"] is True
    groups = [{"params": [layer.weight]}, {"params": [layer.bias], "lr": 0.1}]
    optimizer = build_optimizer(cls, groups, lr=1e-3)
    assert optimizer.defaults["fused"] is True and optimizer.param_groups[1]["lr"] == 0.1


def test_the_callers_choice_is_kept():
    layer = nn.Linear(4, 3)
    assert not build_optimizer(torch.optim.Adam, layer.parameters(), lr=1e-3, foreach=False).defaults["fused"]
    assert not build_optimizer(torch.optim.Adam, layer.parameters(), lr=1e-3, fused=False).defaults["fused"]
    assert not build_optimizer(torch.optim.Adam, layer.parameters(), lr=1e-3, differentiable=True).defaults["fused"]
    assert not build_optimizer(torch.optim.SGD, layer.parameters(), lr=1e-3).defaults.get("fused")
    with pytest.raises(TypeError):
        build_optimizer(torch.optim.Adam, layer.parameters(), lr=1e-3, no_such_option=1)


def test_lottery_optimizer_is_fused_and_bad_kwargs_are_named():
    layer = nn.Linear(4, 3)
    config = LotteryConfig(iterations=10, optimizer="adamw", lr=1e-3, optimizer_kwargs={"weight_decay": 0.1})
    assert make_optimizer(config, layer.parameters()).defaults["fused"] is True
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        make_optimizer(LotteryConfig(iterations=10, optimizer="adam", optimizer_kwargs={"momentum": 0.9}),
                       layer.parameters())


def test_fused_adam_takes_the_same_steps_as_plain_adam():
    torch.manual_seed(0)
    plain, fused = nn.Linear(20, 5).double(), nn.Linear(20, 5).double()
    fused.load_state_dict(plain.state_dict())
    optimizers = [torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False),
                  build_optimizer(torch.optim.Adam, fused.parameters(), lr=1e-2)]
    x, y = torch.randn(32, 20, dtype=torch.float64), torch.randn(32, 5, dtype=torch.float64)
    for _ in range(20):
        for model, optimizer in zip((plain, fused), optimizers):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
