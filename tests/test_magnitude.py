"""magnitude_prune / magnitude_threshold (global magnitude selection) against a
float64 plain-PyTorch reference that concatenates and stable-sorts, with ties,
NaN, signed zeros, every dtype, non-contiguous inputs, opcheck, compile and bad
inputs. CUDA twins through the `device` fixture."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyprune_ext as pp
from pyprune_ext.ops import kept_count

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --- reference --------------------------------------------------------------------

def reference_prune(weights, masks, k):
    """(new masks, threshold, ties) by concatenating every kept |w| in (tensor,
    flat index) order and sorting stably: the first k go. NaN sorts after every
    number (inf included); -0.0 and 0.0 are equal (abs)."""
    values, tensor_ids, flat_ids = [], [], []
    for t, (w, m) in enumerate(zip(weights, masks)):
        flat_index = m.cpu().reshape(-1).nonzero().reshape(-1)
        values.append(w.detach().cpu().double().abs().reshape(-1)[flat_index])
        tensor_ids.append(torch.full_like(flat_index, t))
        flat_ids.append(flat_index)
    new = [m.detach().cpu().clone(memory_format=torch.contiguous_format) for m in masks]
    if k == 0:
        return new, 0.0, 0
    v = torch.cat(values)
    nan = v.isnan()
    order = torch.sort(torch.where(nan, 0.0, v), stable=True).indices
    order = order[torch.sort(nan[order].to(torch.uint8), stable=True).indices]  # NaNs last, in order
    drop = order[:k]
    drop_tensor, drop_flat = torch.cat(tensor_ids)[drop], torch.cat(flat_ids)[drop]
    for t in range(len(new)):
        new[t].view(-1)[drop_flat[drop_tensor == t]] = False
    threshold = v[order[k - 1]].item()
    if math.isnan(threshold):
        ties = int(nan[order[:k]].sum())
    else:
        ties = int((v[order[:k]] == threshold).sum())
    return new, threshold, ties


def assert_matches_reference(weights, masks, k):
    got = pp.magnitude_prune(weights, masks, k)
    want_masks, want_threshold, want_ties = reference_prune(weights, masks, k)
    assert len(got.masks) == len(masks)
    for g, w, m in zip(got.masks, want_masks, masks):
        assert g.dtype == torch.bool and g.shape == m.shape and g.device == m.device
        assert torch.equal(g.cpu(), w)
    threshold = got.threshold.item()
    assert got.threshold.dtype == (weights[0].dtype if weights else torch.float32)
    assert got.threshold.shape == () and got.ties.shape == () and got.ties.dtype == torch.long
    if math.isnan(want_threshold):
        assert math.isnan(threshold)
    else:
        assert threshold == want_threshold
    assert got.ties.item() == want_ties
    # The threshold op alone gives the same cut.
    only = pp.magnitude_threshold(weights, masks, k)
    assert torch.equal(only.threshold, got.threshold) or (only.threshold.isnan() and got.threshold.isnan())
    assert only.ties.item() == want_ties
    return got


def random_set(shapes, density, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]
    masks = [(torch.rand(s, generator=gen) < density).to(device) for s in shapes]
    return weights, masks


# --- correctness --------------------------------------------------------------------

shape_st = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(shape_st, min_size=1, max_size=5), density=st.sampled_from([1.0, 0.7, 0.2, 0.0]),
       fraction=st.floats(0, 1), dtype=st.sampled_from(ALL_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_random_sets_match_reference(shapes, density, fraction, dtype, seed, device):
    weights, masks = random_set(shapes, density, dtype, device, seed)
    k = int(fraction * kept_count(masks))
    got = assert_matches_reference(weights, masks, k)
    assert kept_count(got.masks) == kept_count(masks) - k


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("density", [1.0, 0.2])
def test_resnet_like_layer_sizes(dtype, density, device):
    """Several tensors, some bigger than a CPU chunk (64K) and a CUDA tile, over 1M
    weights in all so that counts merge across CPU threads and CUDA blocks; prune
    20% of the remaining."""
    shapes = [(64, 3, 7, 7), (256, 64, 3, 3), (800000,), (10, 512), (10,)]
    weights, masks = random_set(shapes, density, dtype, device, seed=1)
    k = round(0.2 * kept_count(masks))
    assert_matches_reference(weights, masks, k)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_many_ties_across_chunks(dtype, device):
    """Weights from a few values (zeros of both signs included): the cut falls in a
    huge tie that spans tensors, CPU chunks and threads, and CUDA tiles; the k
    sweep through the ranked write path (the unranked one at k = zeros)."""
    gen = torch.Generator().manual_seed(3)
    values = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, -2.0], dtype=torch.float64)
    shapes = [(300, 300), (7,), (1100001,), (5, 5)]
    weights = [values[torch.randint(0, len(values), s, generator=gen)].to(device, dtype) for s in shapes]
    masks = [(torch.rand(s, generator=gen) < 0.8).to(device) for s in shapes]
    kept = kept_count(masks)
    zeros = sum(int(((w == 0) & m).sum()) for w, m in zip(weights, masks))
    for k in [1, zeros // 3, zeros, zeros + 1, zeros + 12345, kept - 1, kept]:
        assert_matches_reference(weights, masks, k)


def test_signed_zeros_tie_in_list_then_index_order(device):
    weights = [torch.tensor([0.0, -0.0, 3.0], device=device), torch.tensor([[-0.0, 0.0]], device=device)]
    masks = [torch.tensor([True, True, True], device=device), torch.tensor([[True, True]], device=device)]
    got = pp.magnitude_prune(weights, masks, 3)
    assert got.masks[0].tolist() == [False, False, True]
    assert got.masks[1].tolist() == [[False, True]]
    assert got.threshold.item() == 0.0 and got.ties.item() == 3
    assert_matches_reference(weights, masks, 3)


def test_nan_counts_as_largest(device):
    nan, inf = float("nan"), float("inf")
    weights = [torch.tensor([nan, 1.0, -inf, -nan, 2.0], device=device), torch.tensor([nan, 0.5], device=device)]
    masks = [torch.ones(5, dtype=torch.bool, device=device), torch.ones(2, dtype=torch.bool, device=device)]
    for k in range(8):
        assert_matches_reference(weights, masks, k)
    got = pp.magnitude_prune(weights, masks, 5)  # 0.5, 1, 2, inf, then the first NaN
    assert got.masks[0].tolist() == [False, False, False, True, False]
    assert got.masks[1].tolist() == [True, False]
    assert got.threshold.isnan() and got.ties.item() == 1


# NaNs of every payload, with and without the sign bit, largest payload first.
NAN_BITS = {
    torch.float16: (torch.int16, [0x7FFF, 0x7E00, 0x7C01, -1]),
    torch.bfloat16: (torch.int16, [0x7FFF, 0x7FC0, 0x7F81, -1]),
    torch.float32: (torch.int32, [0x7FFFFFFF, 0x7FC00000, 0x7F800001, -1]),
    torch.float64: (torch.int64, [0x7FFFFFFFFFFFFFFF, 0x7FF8000000000000, 0x7FF0000000000001, -1]),
}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nan_payloads_all_tie(dtype, device):
    """Every NaN ties with every other, whatever its bits: they go in index order."""
    int_type, bits = NAN_BITS[dtype]
    nans = torch.tensor(bits, dtype=int_type).view(dtype)
    assert nans.isnan().all()
    weights = [torch.cat([torch.tensor([1.0, float("inf")], dtype=dtype), nans]).to(device)]
    masks = [torch.ones(6, dtype=torch.bool, device=device)]
    for k in range(7):
        got = assert_matches_reference(weights, masks, k)
    got = pp.magnitude_prune(weights, masks, 4)
    assert got.masks[0].tolist() == [False, False, False, False, True, True]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_neighbouring_floats_need_every_pass(dtype, device):
    """Values one ulp apart: only the last radix digit tells them apart."""
    base = torch.tensor(0.75, dtype=dtype)
    vals = [base]
    for _ in range(40):
        vals.append(torch.nextafter(vals[-1], torch.tensor(2.0, dtype=dtype)))
    v = torch.stack(vals)
    perm = torch.randperm(len(v), generator=torch.Generator().manual_seed(0))
    signs = torch.where(torch.arange(len(v)) % 3 == 0, -1.0, 1.0).to(dtype)
    weights = [(v[perm] * signs).to(device)]
    masks = [torch.ones(len(v), dtype=torch.bool, device=device)]
    for k in [1, 2, 17, 40, 41]:
        got = assert_matches_reference(weights, masks, k)
        assert got.threshold.item() == v[k - 1].item()


def test_pruned_weights_stay_pruned_and_are_not_counted(device):
    """Already-pruned weights are the smallest here: a selection that counted them
    would prune fewer kept weights."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1000, generator=gen).to(device)
    mask = (w.abs() > 0.5).to(device)
    kept = int(mask.sum())
    got = pp.magnitude_prune([w], [mask], 100)
    assert not (got.masks[0] & ~mask).any()
    assert int(got.masks[0].sum()) == kept - 100
    assert got.threshold.item() > 0.5
    assert_matches_reference([w], [mask], 100)


def test_inputs_not_modified_and_outputs_fresh(device):
    weights, masks = random_set([(6, 7), (11,)], 0.6, torch.float32, device, seed=2)
    before = [m.clone() for m in masks]
    w_before = [w.clone() for w in weights]
    for k in [0, 3]:
        got = pp.magnitude_prune(weights, masks, k)
        for g, m, b in zip(got.masks, masks, before):
            assert torch.equal(m, b) and g.data_ptr() != m.data_ptr()
        for w, b in zip(weights, w_before):
            assert torch.equal(w, b)
    got0 = pp.magnitude_prune(weights, masks, 0)
    assert all(torch.equal(g, m) for g, m in zip(got0.masks, masks))
    assert got0.threshold.item() == 0.0 and got0.ties.item() == 0


def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(8, 6, 5, 5, generator=gen).to(device)
    weights = [base.to(memory_format=torch.channels_last), torch.randn(9, 12, generator=gen).to(device).t(),
               torch.randn(40, generator=gen).to(device)[::3]]
    masks = [(torch.rand(w.shape, generator=gen) < 0.7).to(device) for w in weights]
    masks[1] = masks[1].t().contiguous().t()  # a transposed mask too
    assert not weights[1].is_contiguous() and not masks[1].is_contiguous()
    k = kept_count(masks) // 3
    got = assert_matches_reference(weights, masks, k)
    dense = pp.magnitude_prune([w.contiguous() for w in weights], [m.contiguous() for m in masks], k)
    for a, b in zip(got.masks, dense.masks):
        assert torch.equal(a, b) and a.is_contiguous()


def test_empty_lists_and_empty_tensors(device):
    got = pp.magnitude_prune([], [], 0)
    assert got.masks == [] and got.threshold.item() == 0.0 and got.ties.item() == 0
    assert pp.magnitude_threshold([], [], 0).ties.item() == 0
    weights = [torch.empty(0, 3, device=device), torch.randn(4, device=device), torch.empty(0, device=device)]
    masks = [torch.empty(0, 3, dtype=torch.bool, device=device), torch.ones(4, dtype=torch.bool, device=device),
             torch.empty(0, dtype=torch.bool, device=device)]
    got = assert_matches_reference(weights, masks, 2)
    assert got.masks[0].shape == (0, 3) and got.masks[2].shape == (0,)
    all_pruned = [torch.zeros(4, dtype=torch.bool, device=device)]
    assert_matches_reference(weights[1:2], all_pruned, 0)
    with pytest.raises(RuntimeError, match=r"k=1 is more than the number of kept weights \(0\)"):
        pp.magnitude_prune(weights[1:2], all_pruned, 1)


def test_deterministic_and_thread_count_independent(device):
    shapes = [(300, 300), (1100001,)]
    gen = torch.Generator().manual_seed(11)
    weights = [torch.randint(-3, 4, s, generator=gen).float().to(device) for s in shapes]  # many ties
    masks = [(torch.rand(s, generator=gen) < 0.5).to(device) for s in shapes]
    k = kept_count(masks) // 4
    first = pp.magnitude_prune(weights, masks, k)
    threads = torch.get_num_threads()
    try:
        for n in [1, threads, 3]:
            torch.set_num_threads(n)
            again = pp.magnitude_prune(weights, masks, k)
            assert all(torch.equal(a, b) for a, b in zip(first.masks, again.masks))
            assert torch.equal(first.ties, again.ties)
    finally:
        torch.set_num_threads(threads)


def test_outputs_do_not_require_grad(device):
    weights = [torch.randn(5, 5, device=device, requires_grad=True), torch.randn(3, device=device, requires_grad=True)]
    masks = [torch.ones(5, 5, dtype=torch.bool, device=device), torch.ones(3, dtype=torch.bool, device=device)]
    got = pp.magnitude_prune(weights, masks, 4)
    assert not got.threshold.requires_grad and not any(m.requires_grad for m in got.masks)
    assert not pp.magnitude_threshold(weights, masks, 4).threshold.requires_grad


# --- op contract ------------------------------------------------------------------

def test_opcheck(device):
    for dtype in ALL_DTYPES:
        weights, masks = random_set([(4, 5), (7,), (0, 2)], 0.6, dtype, device, seed=4)
        k = kept_count(masks) // 2
        for op in (torch.ops.pyprune.magnitude_prune.default, torch.ops.pyprune.magnitude_threshold.default):
            torch.library.opcheck(op, (weights, masks, k))
            torch.library.opcheck(op, ([w.clone().requires_grad_() for w in weights], masks, k))
    torch.library.opcheck(torch.ops.pyprune.magnitude_prune.default, ([], [], 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph(device):
    weights, masks = random_set([(6, 8), (30,), (2, 3, 3)], 0.7, torch.float32, device, seed=8)

    def level(ws, ms, fraction: float):
        k = int(fraction * sum(m.numel() for m in ms))  # a Python int at trace time
        cut = pp.magnitude_prune(ws, ms, k)
        return cut.masks, cut.threshold, pp.magnitude_threshold(ws, ms, k).ties

    compiled = torch.compile(level, fullgraph=True)
    masks_c, threshold_c, ties_c = compiled(weights, masks, 0.25)
    masks_e, threshold_e, ties_e = level(weights, masks, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(masks_c, masks_e))
    assert torch.equal(threshold_c, threshold_e) and torch.equal(ties_c, ties_e)


# --- bad input ------------------------------------------------------------------

def test_bad_input(device):
    w = [torch.randn(3, 4, device=device), torch.randn(5, device=device)]
    m = [torch.ones(3, 4, dtype=torch.bool, device=device), torch.ones(5, dtype=torch.bool, device=device)]
    cases = [
        ((w, m[:1], 1), "same length, got 2 weights and 1 masks"),
        ((w, m, -1), "k .* must be >= 0, got -1"),
        ((w, m, 18), r"k=18 is more than the number of kept weights \(17\)"),
        ((w, [m[0], torch.ones(4, dtype=torch.bool, device=device)], 1),
         r"masks\[1\] must have the shape of weights\[1\] \[5\], got \[4\]"),
        ((w, [m[0], m[1].float()], 1), r"masks\[1\] must be a bool tensor, got Float"),
        (([w[0], torch.arange(5, device=device)], m, 1), r"weights\[1\] must be float32, float64, float16 or "
                                                         r"bfloat16, got Long"),
        (([w[0], w[1].double()], m, 1), "all weights must have the same dtype"),
        (([w[0].to_sparse(), w[1]], m, 1), r"must be dense \(strided\) tensors"),
    ]
    for op in (pp.magnitude_prune, pp.magnitude_threshold):
        for args, message in cases:
            with pytest.raises(RuntimeError, match=message):
                op(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    w = [torch.randn(3, device="cuda"), torch.randn(3)]
    m = [torch.ones(3, dtype=torch.bool, device="cuda"), torch.ones(3, dtype=torch.bool)]
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        pp.magnitude_prune(w, m, 1)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        pp.magnitude_prune(w[:1], [m[1]], 1)
