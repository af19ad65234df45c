"""prune_by_magnitude: exact counts per layer and globally, which weights go,
per-layer rates, and the remaining fraction after L levels."""

import math

import pytest
import torch

from lottery_common import single_thread  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import (MaskSet, count_to_prune, layer_rates, prune_by_magnitude,
                                 select_smallest_reference)
from pyprune_ext.models import conv2, lenet300


@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return lenet300(64, 10)


def perturb(model, seed):
    """Stands in for training between levels: new magnitudes, so each level ranks anew."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_count_rounds_to_nearest_halves_up():
    assert count_to_prune(0.2, 12) == 2   # 2.4
    assert count_to_prune(0.2, 13) == 3   # 2.6
    assert count_to_prune(0.5, 5) == 3    # 2.5: halves up
    assert count_to_prune(0.1, 4) == 0    # 0.4
    assert count_to_prune(1.0, 7) == 7 and count_to_prune(0.0, 7) == 0


def test_per_layer_exact_counts_over_levels(lenet):
    masks = MaskSet.ones(lenet)
    expected = {n: m.numel() for n, m in masks.items()}
    for level in range(1, 6):
        perturb(lenet, level)
        masks = prune_by_magnitude(lenet, masks, rate=0.2, output_rate=0.1)
        masks.apply(lenet)
        for name in expected:
            rate = 0.1 if name == "fc3.weight" else 0.2
            expected[name] -= count_to_prune(rate, expected[name])
        assert {n: k for n, (k, _) in masks.counts().items()} == expected
    # (1 - p)^L up to the rounding of one weight per level
    rem = masks.remaining().per_layer
    assert rem["fc1.weight"] == pytest.approx(0.8 ** 5, abs=5 / (64 * 300))
    assert rem["fc3.weight"] == pytest.approx(0.9 ** 5, abs=5 / 1000)


def test_per_layer_prunes_the_smallest_remaining(lenet):
    masks = prune_by_magnitude(lenet, MaskSet.ones(lenet), rate=0.3)
    for name, param in lenet.named_parameters():
        if name in masks:
            mags = param.detach().abs()
            assert float(mags[~masks[name]].max()) <= float(mags[masks[name]].min())
    # pruning again ranks only the weights still kept
    again = prune_by_magnitude(lenet, masks, rate=0.5)
    for name in masks:
        assert not bool((again[name] & ~masks[name]).any())
        assert int(again[name].sum()) == int(masks[name].sum()) - count_to_prune(0.5, int(masks[name].sum()))


def test_global_exact_k_equals_reference(lenet):
    masks = MaskSet.ones(lenet)
    for level in range(3):
        perturb(lenet, 10 + level)
        before = masks.remaining().kept
        new = prune_by_magnitude(lenet, masks, rate=0.2, scope="global")
        assert new.remaining().kept == before - count_to_prune(0.2, before)
        params = dict(lenet.named_parameters())
        ref = select_smallest_reference([params[n].detach() for n in masks], list(masks.values()),
                                        count_to_prune(0.2, before))
        assert all(torch.equal(new[n], r) for n, r in zip(masks, ref))
        # one threshold over all layers
        kept_min = min(float(params[n].detach().abs()[new[n]].min()) for n in new)
        newly_pruned_max = float(torch.cat([params[n].detach().abs()[masks[n] & ~new[n]] for n in new]).max())
        assert newly_pruned_max <= kept_min
        masks = new
    # global pruning does not keep per-layer fractions equal
    per_layer = masks.remaining().per_layer
    assert max(per_layer.values()) - min(per_layer.values()) > 0.01


def test_weight_dict_input_equals_model_input(lenet):
    masks = MaskSet.ones(lenet)
    from_model = prune_by_magnitude(lenet, masks, rate=0.2, output_rate=0.1)
    from_dict = prune_by_magnitude(lenet.state_dict(), masks, rate=0.2, output_rate=0.1)
    assert from_model == from_dict


def test_rates_by_type_name_and_output():
    model = conv2((1, 8, 8), 10)
    masks = MaskSet.ones(model)
    names = masks.names
    rates = layer_rates(model, masks, rate=0.5, rates={"Conv2d": 0.1, "Linear": 0.2}, output_rate=0.05)
    assert [rates[n] for n in names] == [0.1, 0.1, 0.2, 0.2, 0.05]
    rates = layer_rates(model, masks, rates={"Linear": 0.2, "classifier.0": 0.3,
                                             "features.0.weight": 0.4}, output_rate=0.05)
    assert rates["features.0.weight"] == 0.4 and rates["features.2.weight"] == 0.2  # default rate
    assert rates["classifier.0.weight"] == 0.3 and rates[names[-1]] == 0.05
    new = prune_by_magnitude(model, masks, rate=0.2, rates={"Conv2d": 0.1}, output_rate=0.1)
    for name, (kept, size) in new.counts().items():
        rate = 0.1 if name.startswith("features") or name == names[-1] else 0.2
        assert kept == size - count_to_prune(rate, size)


def test_rate_errors(lenet):
    masks = MaskSet.ones(lenet)
    with pytest.raises(ValueError, match="'fc9'.*match no masked tensor"):
        prune_by_magnitude(lenet, masks, rates={"fc9": 0.1})
    with pytest.raises(ValueError, match="scope='layer' only"):
        prune_by_magnitude(lenet, masks, scope="global", output_rate=0.1)
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\]"):
        prune_by_magnitude(lenet, masks, rate=1.5)
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_by_magnitude(lenet, masks, scope="local")
    with pytest.raises(ValueError, match="type keys need the model"):
        prune_by_magnitude(lenet.state_dict(), masks, rates={"Linear": 0.1})


def test_remaining_after_levels_follows_power_law():
    torch.manual_seed(1)
    model = lenet300(784, 10)
    masks = MaskSet.ones(model)
    for level in range(1, 11):
        masks = prune_by_magnitude(model, masks, rate=0.2, scope="global")
        assert masks.remaining().total == pytest.approx(0.8 ** level, rel=1e-4)
    assert math.isclose(masks.remaining().total, 0.107, abs_tol=1e-3)
