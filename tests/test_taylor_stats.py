"""taylor_channel_stats / taylor_channel_stats_ / taylor_weight_stats against a
float64 plain-PyTorch reference, over shapes, layouts, dtypes and devices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyprune_ext as pp
from pyprune_ext.ops import stats_dtype

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Accumulation error allowed, relative to the sum of |a*g| it came from.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def reference(a, g, channel_dim=1):
    """float64 (first, second) and the magnitudes their errors are measured against."""
    a64 = a.double().movedim(channel_dim, 1)
    g64 = g.double().movedim(channel_dim, 1)
    prod = (a64 * g64).reshape(a64.shape[0], a64.shape[1], math.prod(a64.shape[2:]))
    s = prod.sum(-1)  # (N, C)
    s_abs = prod.abs().sum(-1)
    return s.sum(0), (s * s).sum(0), s_abs.sum(0), 2 * (s_abs * s_abs).sum(0)


def assert_stats_close(first, second, a, g, channel_dim=1):
    ref_first, ref_second, scale_first, scale_second = reference(a, g, channel_dim)
    assert first.dtype == stats_dtype(a.dtype) and second.dtype == stats_dtype(a.dtype)
    assert first.shape == ref_first.shape and second.shape == ref_second.shape
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    tol = TOLERANCE[a.dtype]
    err_first = (first.double().cpu() - ref_first.cpu()).abs()
    err_second = (second.double().cpu() - ref_second.cpu()).abs()
    assert (err_first <= tol * scale_first.cpu() + 1e-30).all(), err_first.max()
    assert (err_second <= tol * scale_second.cpu() + 1e-30).all(), err_second.max()


def random_pair(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return a, g


# Each case: (name, builder(dtype, device) -> (a, g), channel_dim)
def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _cl3d(t):
    return t.contiguous(memory_format=torch.channels_last_3d)


LAYOUTS = {
    "N,C": (lambda dt, dev: random_pair((37, 19), dt, dev), 1),
    "N,C wide": (lambda dt, dev: random_pair((5, 1029), dt, dev), 1),
    "N,C,L": (lambda dt, dev: random_pair((6, 11, 53), dt, dev), 1),
    "N,C,H,W": (lambda dt, dev: random_pair((4, 16, 9, 13), dt, dev), 1),
    "N,C,H,W big runs": (lambda dt, dev: random_pair((2, 3, 67, 71), dt, dev), 1),
    "N,C,D,H,W": (lambda dt, dev: random_pair((3, 5, 4, 6, 7), dt, dev), 1),
    "channels_last": (lambda dt, dev: tuple(map(_cl, random_pair((4, 24, 7, 5), dt, dev))), 1),
    "channels_last odd C": (lambda dt, dev: tuple(map(_cl, random_pair((3, 13, 6, 6), dt, dev))), 1),
    "channels_last_3d": (lambda dt, dev: tuple(map(_cl3d, random_pair((2, 8, 3, 4, 5), dt, dev))), 1),
    "N,L,C dim -1": (lambda dt, dev: random_pair((4, 33, 40), dt, dev), -1),
    "N,L,C dim 2": (lambda dt, dev: random_pair((3, 17, 24), dt, dev), 2),
    "channel in the middle": (lambda dt, dev: random_pair((3, 5, 6, 7), dt, dev), 2),
    "transposed N,C": (lambda dt, dev: tuple(t.t() for t in random_pair((21, 9), dt, dev)), 1),
    "transposed H,W": (lambda dt, dev: tuple(t.transpose(2, 3) for t in random_pair((3, 8, 5, 6), dt, dev)), 1),
    "sliced channels": (lambda dt, dev: tuple(t[:, 1:12:2] for t in random_pair((3, 14, 5, 5), dt, dev)), 1),
    "sliced spatial": (lambda dt, dev: tuple(t[:, :, ::2, 1:] for t in random_pair((3, 6, 9, 8), dt, dev)), 1),
    "sliced batch": (lambda dt, dev: tuple(t[1::2] for t in random_pair((7, 6, 4, 4), dt, dev)), 1),
    "expanded spatial": (lambda dt, dev: tuple(t.expand(4, 6, 5, 5) for t in random_pair((4, 6, 1, 1), dt, dev)), 1),
    "a and g in different layouts": (
        lambda dt, dev: (lambda p: (_cl(p[0]), p[1]))(random_pair((3, 10, 6, 7), dt, dev)), 1),
    "unaligned storage offset": (lambda dt, dev: tuple(t.flatten()[1:].view(4, 8, 31) for t in random_pair((993,), dt, dev)), 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_channel_stats_matches_reference(layout, dtype, device):
    build, channel_dim = LAYOUTS[layout]
    a, g = build(dtype, device)
    first, second = pp.taylor_channel_stats(a, g, channel_dim)
    assert first.device == a.device
    assert_stats_close(first, second, a, g, channel_dim)


@pytest.mark.parametrize("layout", ["N,C,H,W", "channels_last", "N,L,C dim -1", "N,C"])
def test_inplace_accumulates_over_minibatches(layout, device):
    build, channel_dim = LAYOUTS[layout]
    pairs = [build(torch.float32, device) for _ in range(3)]
    pairs = [(a * (i + 1), g - i) for i, (a, g) in enumerate(pairs)]  # three different batches
    channels = pairs[0][0].shape[channel_dim]
    first = torch.full((channels,), 0.5, device=device)  # starts non-zero: must add, not overwrite
    second = torch.full((channels,), 2.0, device=device)
    for a, g in pairs:
        pp.taylor_channel_stats_(a, g, first, second, channel_dim)
    expect_first = 0.5 + sum(pp.taylor_channel_stats(a, g, channel_dim)[0] for a, g in pairs)
    expect_second = 2.0 + sum(pp.taylor_channel_stats(a, g, channel_dim)[1] for a, g in pairs)
    torch.testing.assert_close(first, expect_first, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(second, expect_second, rtol=1e-5, atol=1e-4)


def test_inplace_into_strided_buffers(device):
    a, g = random_pair((4, 6, 5, 5), torch.float32, device)
    store = torch.zeros(2, 6, device=device)
    first, second = store[0], store[1]
    noncontig_first = torch.zeros(12, device=device)[::2]
    pp.taylor_channel_stats_(a, g, noncontig_first, second)
    ref_first, ref_second = pp.taylor_channel_stats(a, g)
    torch.testing.assert_close(noncontig_first, ref_first)
    torch.testing.assert_close(second, ref_second)
    assert (first == 0).all()  # the neighbouring row of the store is untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [
    ((16, 8, 3, 3), None), ((16, 8, 3, 3), "channels_last"), ((10, 33), None),
    ((7,), None), ((4, 6, 5), None), ((6, 4, 2, 3, 3), None), ((12, 700), None)])
def test_weight_stats_matches_reference(shape, layout, dtype, device):
    w, g = random_pair(shape, dtype, device, seed=3)
    if layout == "channels_last":
        w, g = _cl(w), _cl(g)
    first, second = pp.taylor_weight_stats(w, g)
    prod = (w.double() * g.double()).reshape(shape[0], -1)
    scale = prod.abs().sum(1)
    tol = TOLERANCE[dtype]
    assert first.dtype == stats_dtype(dtype) and first.shape == (shape[0],)
    assert ((first.double() - prod.sum(1)).abs() <= tol * scale + 1e-30).all()
    assert ((second.double() - (prod ** 2).sum(1)).abs() <= tol * (prod ** 2).sum(1) + 1e-30).all()


def test_weight_stats_transposed_weight(device):
    w, g = random_pair((9, 14), torch.float32, device, seed=4)
    first, second = pp.taylor_weight_stats(w.t(), g.t())
    prod = (w.double() * g.double()).t()
    torch.testing.assert_close(first.double(), prod.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), (prod ** 2).sum(1), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 5),
    channels=st.integers(1, 12),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    channel_pos=st.integers(1, 4),
    memory_order_seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_channel_stats_random_shapes_and_layouts(batch, channels, spatial, channel_pos,
                                                 memory_order_seed, dtype):
    """Random shapes, a random channel position and a random memory order of the dims."""
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        shape = [batch] + spatial
        channel_dim = min(channel_pos, len(shape))
        shape.insert(channel_dim, channels)
        order = torch.randperm(len(shape), generator=torch.Generator().manual_seed(memory_order_seed)).tolist()
        a, g = random_pair([shape[d] for d in order], dtype, device, seed=memory_order_seed)
        inverse = [order.index(d) for d in range(len(shape))]
        a, g = a.permute(inverse), g.permute(inverse)
        assert list(a.shape) == shape
        first, second = pp.taylor_channel_stats(a, g, channel_dim)
        assert_stats_close(first, second, a, g, channel_dim)


def test_empty_batch_gives_zeros(device):
    for shape, cd in [((0, 5, 3, 3), 1), ((0, 7), 1), ((0, 4, 6), -1)]:
        a, g = random_pair(shape, torch.float32, device)
        first, second = pp.taylor_channel_stats(a, g, cd)
        assert first.shape == (shape[cd],) and (first == 0).all() and (second == 0).all()
    a, g = random_pair((3, 5, 0, 2), torch.float32, device)  # nothing to reduce
    first, second = pp.taylor_channel_stats(a, g)
    assert (first == 0).all() and (second == 0).all()
    a, g = random_pair((3, 0, 4), torch.float32, device)  # no channels
    assert pp.taylor_channel_stats(a, g)[0].shape == (0,)
    w, gw = random_pair((0, 3, 3, 3), torch.float32, device)
    assert pp.taylor_weight_stats(w, gw)[0].shape == (0,)


@pytest.mark.parametrize("layout", ["N,C,H,W big runs", "channels_last", "N,L,C dim -1", "N,C wide"])
def test_bit_identical_on_repeated_calls(layout, device):
    build, channel_dim = LAYOUTS[layout]
    a, g = build(torch.float32, device)
    first, second = pp.taylor_channel_stats(a, g, channel_dim)
    for _ in range(5):
        f, s = pp.taylor_channel_stats(a, g, channel_dim)
        assert torch.equal(f, first) and torch.equal(s, second)


def test_cpu_result_does_not_depend_on_thread_count():
    a, g = random_pair((32, 48, 20, 20), torch.float32, "cpu", seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pp.taylor_channel_stats(a, g)
        torch.set_num_threads(max(2, before))
        many = pp.taylor_channel_stats(a, g)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_large_values_keep_fp32_accumulation_for_half(device):
    """float16 products would overflow a float16 accumulator; ours is float32."""
    a = torch.full((8, 4, 32, 32), 30.0, dtype=torch.float16, device=device)
    g = torch.full_like(a, 20.0)
    first, second = pp.taylor_channel_stats(a, g)
    expected = 8 * 32 * 32 * 600.0
    torch.testing.assert_close(first.cpu(), torch.full((4,), expected))
    torch.testing.assert_close(second.cpu(), torch.full((4,), 8 * (32 * 32 * 600.0) ** 2))
