"""Controls: random pruning keeps the counts (per layer or in total), random
re-initialisation keeps the mask and draws a new initialisation; both read masks
from a run directory."""

import pytest
import torch

from lottery_common import single_thread  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import MaskSet, control_masks, level_masks, prune_by_magnitude, random_prune, random_reinit
from pyprune_ext.models import lenet300


def factory():
    return lenet300(64, 10)


@pytest.fixture
def ticket():
    torch.manual_seed(0)
    model = factory()
    return prune_by_magnitude(model, MaskSet.ones(model), rate=0.6, output_rate=0.3)


def test_random_prune_per_layer_keeps_counts(ticket):
    shuffled = random_prune(ticket, seed=1)
    assert shuffled.counts() == ticket.counts()
    assert shuffled.names == ticket.names
    for name in ticket:
        assert not torch.equal(shuffled[name], ticket[name])
    assert random_prune(ticket, seed=1) == shuffled
    assert random_prune(ticket, seed=2) != shuffled


def test_random_prune_global_keeps_total(ticket):
    shuffled = random_prune(ticket, seed=3, scope="global")
    assert shuffled.remaining().kept == ticket.remaining().kept
    # the per-layer fractions even out (fc3 was pruned at half the rate)
    per_layer = shuffled.remaining().per_layer
    assert per_layer["fc3.weight"] == pytest.approx(ticket.remaining().total, abs=0.05)
    with pytest.raises(ValueError, match="scope"):
        random_prune(ticket, seed=0, scope="channel")


def test_random_reinit_same_mask_new_init(ticket):
    torch.manual_seed(0)
    original = factory()
    before = torch.get_rng_state()
    model = random_reinit(factory, ticket, seed=123)
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    for name, param in model.named_parameters():
        if name in ticket:
            mask = ticket[name]
            assert bool((param[~mask] == 0).all())
            assert not torch.equal(param[mask], original.get_parameter(name)[mask])
            # a fresh draw from the factory's distribution, not the ticket's large
            # magnitudes: compare with the whole original tensor, not its kept part
            ratio = float(param.detach()[mask].std() / original.get_parameter(name).detach().std())
            assert 0.9 < ratio < 1.1
    again = random_reinit(factory, ticket, seed=123)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_control_masks_from_run_directory(tmp_path, ticket):
    for level, masks in enumerate([MaskSet.ones(factory()), ticket]):
        masks.save(tmp_path / f"level_{level:02d}" / "mask.pt")
    found = level_masks(tmp_path, factory())
    assert sorted(found) == [0, 1] and found[1] == ticket
    assert control_masks(found[1], "reinit", seed=0, level=1) == ticket
    random = control_masks(found[1], "random", seed=0, level=1)
    assert random.counts() == ticket.counts() and random != ticket
    assert control_masks(found[1], "random", seed=0, level=2) != random  # independent per level
    with pytest.raises(FileNotFoundError):
        level_masks(tmp_path / "absent")
