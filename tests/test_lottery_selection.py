"""select_smallest: exactly k of the kept weights pruned, smallest |w| first,
ties by (tensor index, flat index), already-pruned weights untouched."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lottery_common import single_thread  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import native_op_available, select_smallest, select_smallest_reference


def oracle(weights, masks, k):
    """Independent definition: rank every kept weight by (|w|, tensor, flat index)
    with numpy's lexsort and prune the first k."""
    mags, tensor_ids, flat_ids = [], [], []
    for t, (w, m) in enumerate(zip(weights, masks)):
        flat = m.flatten().numpy()
        idx = np.nonzero(flat)[0]
        mags.append(np.abs(w.flatten().double().numpy())[idx])
        tensor_ids.append(np.full(len(idx), t))
        flat_ids.append(idx)
    mags, tensor_ids, flat_ids = (np.concatenate(a) if a else np.zeros(0) for a in (mags, tensor_ids, flat_ids))
    order = np.lexsort((flat_ids, tensor_ids, mags))[:k]
    new = [m.clone().flatten() for m in masks]
    for i in order:
        new[int(tensor_ids[i])][int(flat_ids[i])] = False
    return [n.view(m.shape) for n, m in zip(new, masks)]


def random_case(seed, shapes, density=0.7, levels=None):
    g = torch.Generator().manual_seed(seed)
    weights, masks = [], []
    for shape in shapes:
        if levels:  # few distinct magnitudes: many ties, signs included
            w = (torch.randint(-levels, levels + 1, shape, generator=g)).float() / 4
        else:
            w = torch.randn(shape, generator=g)
        weights.append(w)
        masks.append(torch.rand(shape, generator=g) < density)
    return weights, masks


def kept(masks):
    return sum(int(m.sum()) for m in masks)


@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_oracle_over_several_tensors(levels, seed):
    weights, masks = random_case(seed, [(30, 20), (7,), (4, 3, 3, 3), (1, 1)], levels=levels)
    total = kept(masks)
    for k in [0, 1, total // 3, total // 2 + 1, total - 1, total]:
        new = select_smallest_reference(weights, masks, k)
        assert kept(new) == total - k
        for got, want in zip(new, oracle(weights, masks, k)):
            assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=4),
       seed=st.integers(0, 10_000), ties=st.sampled_from([None, 1, 2]), fraction=st.floats(0, 1))
def test_matches_oracle_hypothesis(shapes, seed, ties, fraction):
    weights, masks = random_case(seed, [tuple(s) for s in shapes], levels=ties)
    k = int(fraction * kept(masks))
    new = select_smallest_reference(weights, masks, k)
    assert all(torch.equal(a, b) for a, b in zip(new, oracle(weights, masks, k)))


def test_ties_go_to_earlier_tensor_then_earlier_index():
    weights = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([1.0, 0.5, -1.0])]
    masks = [torch.ones(3, dtype=torch.bool)] * 2
    new = select_smallest_reference(weights, masks, 3)  # 0.5, then the first two of the four 1s
    assert new[0].tolist() == [False, False, True]
    assert new[1].tolist() == [True, False, True]


def test_zeros_and_pruned_positions():
    # Zero weights that are still kept rank first; already-pruned weights are not
    # candidates even though their value (0 here, or tiny) is the smallest.
    w = torch.tensor([0.0, 0.0, 3.0, 1e-9, 2.0, 0.0])
    m = torch.tensor([True, True, True, False, True, False])
    new = select_smallest_reference([w], [m], 2)[0]
    assert new.tolist() == [False, False, True, False, True, False]
    new = select_smallest_reference([w], [m], 3)[0]
    assert new.tolist() == [False, False, True, False, False, False]


def test_inputs_not_modified_and_pruned_stay_pruned():
    weights, masks = random_case(3, [(10, 10), (5,)], density=0.5)
    before = [m.clone() for m in masks]
    new = select_smallest_reference(weights, masks, 10)
    assert all(torch.equal(a, b) for a, b in zip(masks, before))
    assert all(not bool((n & ~m).any()) for n, m in zip(new, masks))


def test_mixed_dtypes_compare_exactly():
    # 1/3 rounds differently in float16 and float32; both are ranked by their stored values.
    a = torch.tensor([1 / 3], dtype=torch.float16)
    b = torch.tensor([1 / 3], dtype=torch.float32)
    smaller_first = 0 if float(a) < float(b) else 1
    new = select_smallest_reference([a, b], [torch.ones(1, dtype=torch.bool)] * 2, 1)
    assert not bool(new[smaller_first])


@pytest.mark.parametrize("bad, message", [
    (dict(k=11), "only 10 weights"),
    (dict(k=-1), "k=-1"),
    (dict(k=1.5), "must be an int"),
    (dict(masks=[torch.ones(4, dtype=torch.bool)]), "shape"),
    (dict(masks=[torch.ones(10)]), "must be bool"),
    (dict(masks=[]), "1 weight tensors but 0 masks"),
])
def test_argument_errors(bad, message):
    args = dict(weights=[torch.randn(10)], masks=[torch.ones(10, dtype=torch.bool)], k=2)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        select_smallest_reference(args["weights"], args["masks"], args["k"])


def test_nan_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        select_smallest_reference([torch.tensor([1.0, float("nan")])], [torch.ones(2, dtype=torch.bool)], 1)


def test_auto_dispatch():
    weights, masks = random_case(5, [(8, 8), (3,)])
    auto = select_smallest(weights, masks, 17)
    assert all(torch.equal(a, b) for a, b in zip(auto, select_smallest_reference(weights, masks, 17)))
    with pytest.raises(ValueError, match="impl"):
        select_smallest(weights, masks, 1, impl="fast")
    if not native_op_available():
        with pytest.raises(RuntimeError, match="magnitude_prune"):
            select_smallest(weights, masks, 1, impl="op")


@pytest.mark.skipif(not native_op_available(), reason="this build has no torch.ops.pyprune.magnitude_prune")
@pytest.mark.parametrize("levels", [None, 2])
def test_native_op_equals_reference(levels):
    weights, masks = random_case(7, [(300, 64), (100, 300), (10, 100)], levels=levels)
    total = kept(masks)
    for k in [0, 1, total // 5, total]:
        op = select_smallest(weights, masks, k, impl="op")
        ref = select_smallest_reference(weights, masks, k)
        assert all(torch.equal(a, b) for a, b in zip(op, ref))
