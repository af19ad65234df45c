"""rewind: weights back to the saved values at kept positions and zero elsewhere;
with optimizer, LR schedule and data order, training after a rewind to iteration k
retraces the original run exactly. A rewind that does not happen is an error."""

import pytest
import torch
from torch import nn

from lottery_common import digits, single_thread  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import (DataOrder, LotteryConfig, MaskSet, RewindPoint, classification_step,
                                 fetch_batch, prune_by_magnitude, rewind)
from pyprune_ext.lottery.training import make_scheduler
from pyprune_ext.models import lenet300


def setup(seed=0):
    """Model (initialised with ``seed``), Adam, a warm-up + step schedule, data order (seed 0)."""
    torch.manual_seed(seed)
    model = lenet300(64, 10)
    MaskSet.ones(model).apply(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    config = LotteryConfig(iterations=100, lr_milestones=[7], warmup_iterations=4)
    scheduler = make_scheduler(config, optimizer)
    order = DataOrder(len(digits().train), 60, seed=0)
    return model, optimizer, scheduler, order


def train(model, optimizer, scheduler, order, steps):
    for _ in range(steps):
        classification_step(model, fetch_batch(digits().train, order.next_indices()), optimizer)
        scheduler.step()


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_rewind_to_init_restores_masked_init():
    model, optimizer, scheduler, order = setup()
    point = RewindPoint.capture(model, 0)
    init = weights(model)
    train(model, optimizer, scheduler, order, 5)
    masks = prune_by_magnitude(model, MaskSet.ones(model), rate=0.5, output_rate=0.25)
    rewind(model, point, masks)
    for name, param in model.named_parameters():
        if name in masks:
            assert torch.equal(param[masks[name]], init[name][masks[name]])
            assert bool((param[~masks[name]] == 0).all())
        else:  # biases: back to their initial values
            assert torch.equal(param, init[name])
    assert torch.equal(model.fc1.mask, masks["fc1.weight"])


def test_rewind_to_iteration_k_retraces_the_run(tmp_path):
    k, more = 6, 5
    model, optimizer, scheduler, order = setup()
    train(model, optimizer, scheduler, order, k)
    point = RewindPoint.capture(model, k, optimizer, scheduler, order)
    point.save(tmp_path / "point.pt")
    lr_at_k = optimizer.param_groups[0]["lr"]
    train(model, optimizer, scheduler, order, more)
    reference = weights(model)

    # A fresh model, optimizer and schedule, rewound from the file, all-kept masks.
    model2, optimizer2, scheduler2, order2 = setup(seed=1)
    loaded = RewindPoint.load(tmp_path / "point.pt")
    assert loaded.iteration == k
    rewind(model2, loaded, MaskSet.ones(model2), optimizer2, scheduler2, order2)
    assert optimizer2.param_groups[0]["lr"] == lr_at_k
    assert order2.step == k
    train(model2, optimizer2, scheduler2, order2, more)
    for name, value in weights(model2).items():
        assert torch.equal(value, reference[name]), name


def test_rewind_with_optimizer_zeroes_state_at_pruned_positions():
    model, optimizer, scheduler, order = setup()
    train(model, optimizer, scheduler, order, 3)
    point = RewindPoint.capture(model, 3, optimizer)
    masks = prune_by_magnitude(model, MaskSet.ones(model), rate=0.5)
    rewind(model, point, masks, optimizer)
    state = optimizer.state[model.fc1.weight]
    assert bool((state["exp_avg"][~masks["fc1.weight"]] == 0).all())
    assert bool((state["exp_avg_sq"][masks["fc1.weight"]] != 0).any())
    train(model, optimizer, scheduler, order, 3)
    assert bool((model.fc1.weight[~masks["fc1.weight"]] == 0).all())


def test_missing_state_is_an_error_not_a_no_op():
    model, optimizer, scheduler, order = setup()
    point = RewindPoint.capture(model, 0)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        rewind(model, point, MaskSet.ones(model), optimizer=optimizer)
    with pytest.raises(ValueError, match="holds no data_order state"):
        rewind(model, point, MaskSet.ones(model), data_order=order)


def test_point_of_another_model_is_rejected():
    model, *_ = setup()
    point = RewindPoint.capture(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 0)
    with pytest.raises(ValueError, match="does not match the model"):
        rewind(model, point, MaskSet.ones(model))
    wide = RewindPoint.capture(lenet300(784, 10), 0)
    with pytest.raises(ValueError, match="has shape"):
        rewind(model, wide, MaskSet.ones(model))


def test_rewind_that_does_not_take_effect_is_detected(monkeypatch):
    # Simulate the known bug of other tools: the copy into the model silently does
    # nothing. The post-rewind check must catch it.
    import pyprune_ext.lottery.rewinding as rewind_module
    model, optimizer, scheduler, order = setup()
    point = RewindPoint.capture(model, 0)
    train(model, optimizer, scheduler, order, 2)
    monkeypatch.setattr(rewind_module, "_load_model_state", lambda model, saved: None)
    with pytest.raises(RuntimeError, match="does not hold the rewound values"):
        rewind(model, point, MaskSet.ones(model))
