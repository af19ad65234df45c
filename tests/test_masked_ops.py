"""masked_linear / masked_conv2d / mask_pack / sparse_masked_linear against a
float64 plain-PyTorch reference, with opcheck, compile, gradcheck and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

import pyprune_ext as pp

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def dtypes_for(device):
    if device == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float16, torch.bfloat16]


def make_layer(out_f, in_f, density, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    mask = torch.rand(out_f, in_f, generator=gen) < density
    b = torch.randn(out_f, generator=gen, dtype=torch.float64)
    return w.to(device, dtype), mask.to(device), b.to(device, dtype)


def reference_linear(x, w, mask, b):
    y = x.double() @ (w.double() * mask).T
    return y if b is None else y + b.double()


def assert_close_rel(got, want, dtype):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-12
    assert err <= TOL[dtype] * scale, (err, scale)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.02, 0.0])
@pytest.mark.parametrize("x_shape", [(33,), (5, 33), (2, 3, 33)])
def test_masked_linear_both_paths_match_reference(x_shape, density, device):
    for dtype in dtypes_for(device):
        w, mask, b = make_layer(17, 33, density, dtype, device)
        x = torch.randn(x_shape, dtype=torch.float64).to(device, dtype)
        want = reference_linear(x, w, mask, b)
        got = pp.masked_linear(x, w, mask, b)
        assert got.shape == want.shape and got.dtype == dtype
        assert_close_rel(got, want, dtype)
        sparse = pp.sparse_masked_linear(x, w, pp.mask_pack(mask), b)
        assert sparse.shape == want.shape
        assert_close_rel(sparse, want, dtype)


def test_all_false_mask_gives_bias(device):
    w, _, b = make_layer(6, 9, 1.0, torch.float32, device)
    mask = torch.zeros_like(w, dtype=torch.bool)
    x = torch.randn(4, 9, device=device)
    assert torch.equal(pp.masked_linear(x, w, mask, b), b.expand(4, 6))
    assert torch.equal(pp.sparse_masked_linear(x, w, pp.mask_pack(mask), b), b.expand(4, 6))
    assert torch.equal(pp.sparse_masked_linear(x, w, pp.mask_pack(mask)), torch.zeros(4, 6, device=device))


def test_mask_pack_structure():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    packed = pp.mask_pack(mask)
    assert packed.row_ptr.tolist() == [0, 2, 2, 5]
    assert packed.col_idx.tolist() == [0, 2, 0, 1, 3]
    assert packed.col_ptr.tolist() == [0, 2, 3, 4, 5]
    assert packed.row_idx.tolist() == [0, 2, 2, 0, 2]
    assert packed.nnz == 5


@pytest.mark.parametrize("density", [0.5, 0.05])
def test_gradients_exact_zero_at_pruned_and_gradcheck(density, device):
    w, mask, b = make_layer(6, 8, density, torch.float64, device, seed=2)
    x = torch.randn(5, 8, dtype=torch.float64, device=device)
    packed = pp.mask_pack(mask)
    paths = [lambda x, w, b: pp.masked_linear(x, w, mask, b),
             lambda x, w, b: pp.sparse_masked_linear(x, w, packed, b)]
    for fn in paths:
        args = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        assert torch.autograd.gradcheck(fn, args)
        fn(*args).pow(2).sum().backward()
        assert (args[1].grad[~mask] == 0).all()
        ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        F.linear(ref[0], ref[1] * mask, ref[2]).pow(2).sum().backward()
        for got, want in zip(args, ref):
            torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("rows", [1, 7, 9, 33, 45, 77])
@pytest.mark.parametrize("shape", [(19, 23), (21, 4100)])
def test_sparse_ops_match_reference_across_batch_sizes(rows, shape, device):
    # The CPU kernels cut the batch into tiles of 8/16/32 rows (float; 4/8/16 for
    # double), narrower when a tile of a wide layer would not fit in L2 (4100
    # inputs), transpose them in 8x8 (4x4) blocks with scalar tails, split the
    # output features into chunks, and sum the sampled gradient's dot products
    # 8 (4) at a time with a scalar tail: these sizes reach every case.
    out_f, in_f = shape
    for dtype in dtypes_for(device):
        w, mask, b = make_layer(out_f, in_f, 0.3, dtype, device, seed=rows)
        x = torch.randn(rows, in_f, dtype=torch.float64, device=device).to(dtype)
        gy = torch.randn(rows, out_f, dtype=torch.float64, device=device).to(dtype)
        packed = pp.mask_pack(mask)
        grad_w = torch.ops.pyprune.sparse_masked_linear_grad_weight(gy, x, w, packed.row_ptr, packed.col_idx)
        assert_close_rel(grad_w, (gy.double().T @ x.double()) * mask, dtype)
        assert torch.all(grad_w[~mask] == 0)
        grad_x = torch.ops.pyprune.sparse_masked_linear_grad_input(gy, w, packed.col_ptr, packed.row_idx)
        assert_close_rel(grad_x, gy.double() @ (w.double() * mask), dtype)
        assert_close_rel(pp.sparse_masked_linear(x, w, packed, b), reference_linear(x, w, mask, b), dtype)


def test_sparse_ops_are_deterministic_across_threads_and_batches():
    # Each output value is summed in an order fixed by the shapes alone: the
    # same bits with 1 or 2 threads, and a sample's output does not depend on
    # the rest of its batch.
    w, mask, b = make_layer(300, 784, 0.1, torch.float32, "cpu", seed=3)
    x = torch.randn(60, 784)
    gy = torch.randn(60, 300)
    packed = pp.mask_pack(mask)

    def run():
        return (pp.sparse_masked_linear(x, w, packed, b),
                torch.ops.pyprune.sparse_masked_linear_grad_input(gy, w, packed.col_ptr, packed.row_idx),
                torch.ops.pyprune.sparse_masked_linear_grad_weight(gy, x, w, packed.row_ptr, packed.col_idx))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two):
        assert torch.equal(a, c)
    assert torch.equal(pp.sparse_masked_linear(x[37:41], w, packed, b), one[0][37:41])


def test_sparse_ops_read_non_contiguous_packed_masks(device):
    # Index tensors that are views with a stride (e.g. one column of a stacked
    # pair) must be read by value, not as raw memory.
    w, mask, b = make_layer(6, 8, 0.4, torch.float64, device, seed=4)
    x = torch.randn(5, 8, dtype=torch.float64, device=device, requires_grad=True)
    strided = pp.ops.PackedMask(*(torch.stack([t, t.flip(0)], 1)[:, 0] for t in pp.mask_pack(mask)))
    assert not strided.col_idx.is_contiguous()
    got = pp.sparse_masked_linear(x, w, strided, b)
    torch.testing.assert_close(got, reference_linear(x.detach(), w, mask, b))
    got.sum().backward()
    torch.testing.assert_close(x.grad, (w * mask).sum(0).expand(5, 8))


@pytest.fixture
def row_blocks():
    """masked_linear's CPU kernels with blocks of a few weight rows / columns,
    so small test layers run the blocked code (17 x 33 fp64: 4 blocks)."""
    previous = pp.ops.masked_tile_bytes(7 * 33 * 8)
    yield
    pp.ops.masked_tile_bytes(previous)


@pytest.mark.parametrize("density", [0.5, 0.0])
@pytest.mark.parametrize("x_shape", [(33,), (5, 33), (2, 3, 33), (0, 33)])
def test_masked_linear_row_blocks_match_reference(x_shape, density, row_blocks):
    for dtype in (torch.float64, torch.float32):
        w, mask, b = make_layer(17, 33, density, dtype, "cpu")
        x = torch.randn(x_shape, dtype=torch.float64).to(dtype)
        for bias in (b, None):
            got = pp.masked_linear(x, w, mask, bias)
            want = reference_linear(x, w, mask, bias)
            assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
            if want.numel():
                assert_close_rel(got, want, dtype)


def test_masked_linear_row_blocks_gradients(row_blocks):
    w, mask, b = make_layer(17, 33, 0.3, torch.float64, "cpu", seed=3)
    x = torch.randn(2, 4, 33, dtype=torch.float64)
    args = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: pp.masked_linear(x, w, mask, b), args)
    pp.masked_linear(*args[:2], mask, args[2]).pow(2).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    F.linear(ref[0], ref[1] * mask, ref[2]).pow(2).sum().backward()
    for got, want in zip(args, ref):
        torch.testing.assert_close(got.grad, want.grad)
    assert (args[1].grad[~mask] == 0).all()
    torch.library.opcheck(torch.ops.pyprune.masked_linear.default, (x, w.requires_grad_(), mask, b))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_masked_linear_split_between_threads(threads):
    """Weights over 16 KB are split into at least one block per thread even
    when they fit in one block: forward and both gradient ops at 1-3 threads
    (3 blocks of 40 x 70 fp64 = 22 KB, odd row and column splits)."""
    w, mask, b = make_layer(40, 70, 0.5, torch.float64, "cpu", seed=5)
    x = torch.randn(6, 70, dtype=torch.float64)
    gy = torch.randn(6, 40, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = pp.masked_linear(x, w, mask, b)
        gx = torch.ops.pyprune.masked_linear_grad_input.default(gy, w, mask)
        gw = torch.ops.pyprune.masked_linear_grad_weight.default(gy, x, mask)
    finally:
        torch.set_num_threads(previous)
    assert_close_rel(got, reference_linear(x, w, mask, b), torch.float64)
    assert_close_rel(gx, gy @ (w * mask), torch.float64)
    assert_close_rel(gw, (gy.T @ x) * mask, torch.float64)
    assert (gw[~mask] == 0).all()


def test_masked_linear_gradient_ops_match_reference(device):
    for dtype in dtypes_for(device):
        w, mask, _ = make_layer(9, 13, 0.4, dtype, device, seed=4)
        x = torch.randn(2, 5, 13, dtype=torch.float64).to(device, dtype)
        gy = torch.randn(2, 5, 9, dtype=torch.float64).to(device, dtype)
        gx = torch.ops.pyprune.masked_linear_grad_input.default(gy, w, mask)
        gw = torch.ops.pyprune.masked_linear_grad_weight.default(gy, x, mask)
        assert_close_rel(gx, gy.double() @ (w.double() * mask), dtype)
        assert_close_rel(gw, (gy.double().reshape(-1, 9).T @ x.double().reshape(-1, 13)) * mask, dtype)
        assert (gw[~mask] == 0).all()
        torch.library.opcheck(torch.ops.pyprune.masked_linear_grad_input.default, (gy, w, mask))
        torch.library.opcheck(torch.ops.pyprune.masked_linear_grad_weight.default, (gy, x, mask))


def test_masked_tile_bytes_roundtrip():
    previous = pp.ops.masked_tile_bytes(12345)
    try:
        assert pp.ops.masked_tile_bytes() == 12345
    finally:
        pp.ops.masked_tile_bytes(previous)
    assert pp.ops.masked_tile_bytes() == previous > 0


def test_apply_mask_inplace_matches_reference(device):
    dtypes = dtypes_for(device) + ([torch.float16] if device == "cpu" else [torch.float64])
    for dtype in dtypes:
        w, mask, _ = make_layer(37, 29, 0.4, dtype, device, seed=5)
        w[0, 0] = float("inf")
        mask[0, 0] = False  # a pruned inf becomes 0, not NaN
        want = torch.where(mask, w, torch.zeros((), dtype=dtype, device=device))
        got = w.clone()
        assert pp.ops.apply_mask_(got, mask) is got
        assert torch.equal(got, want)
        strided = w.clone().t()  # non-contiguous weight and mask
        pp.ops.apply_mask_(strided, mask.t())
        assert torch.equal(strided, want.t())
    torch.library.opcheck(torch.ops.pyprune.apply_mask_.default, (w.clone(), mask),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="mask must have weight's shape"):
        pp.ops.apply_mask_(w.clone(), mask[:, :3])
    with pytest.raises(RuntimeError, match="mask must be a bool tensor"):
        pp.ops.apply_mask_(w.clone(), mask.float())


CONV_CASES = [
    dict(in_c=4, out_c=6, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(in_c=4, out_c=8, k=3, stride=2, padding=0, dilation=2, groups=2),
    dict(in_c=6, out_c=6, k=3, stride=1, padding=1, dilation=1, groups=6),  # depthwise
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_masked_conv2d_matches_reference(case, device):
    c = CONV_CASES[case]
    for dtype in dtypes_for(device):
        gen = torch.Generator().manual_seed(case)
        w = torch.randn(c["out_c"], c["in_c"] // c["groups"], c["k"], c["k"], generator=gen, dtype=torch.float64)
        mask = torch.rand(w.shape, generator=gen) < 0.4
        b = torch.randn(c["out_c"], generator=gen, dtype=torch.float64)
        x = torch.randn(2, c["in_c"], 9, 9, generator=gen, dtype=torch.float64)
        args = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
        want = F.conv2d(x, w * mask, b, **args)
        got = pp.masked_conv2d(*(t.to(device, dtype) for t in (x, w)), mask.to(device), b.to(device, dtype), **args)
        assert_close_rel(got.cpu(), want, dtype)


def test_masked_conv2d_gradcheck(device):
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(w.shape, device=device) < 0.5
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x, w: pp.masked_conv2d(x, w, mask, None, padding=1, groups=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    fn(x, w).sum().backward()
    assert (w.grad[~mask] == 0).all() and (w.grad[mask] != 0).any()


def test_opcheck_masked_ops(device):
    w, mask, b = make_layer(5, 7, 0.4, torch.float32, device)
    x = torch.randn(3, 7, device=device)
    torch.library.opcheck(torch.ops.pyprune.masked_linear.default, (x, w, mask, b))
    torch.library.opcheck(torch.ops.pyprune.masked_linear.default, (x, w.requires_grad_(), mask, None))
    wc = torch.randn(4, 3, 3, 3, device=device)
    torch.library.opcheck(torch.ops.pyprune.masked_conv2d.default,
                          (torch.randn(2, 3, 6, 6, device=device), wc, torch.rand(wc.shape, device=device) < 0.5,
                           None, [1, 1], [1, 1], [1, 1], 1))
    torch.library.opcheck(torch.ops.pyprune.mask_pack.default, (mask,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_sparse_ops(device):
    w, mask, b = make_layer(5, 7, 0.4, torch.float64, device)
    packed = pp.mask_pack(mask)
    x = torch.randn(3, 7, dtype=torch.float64, device=device)
    gy = torch.randn(3, 5, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.pyprune.sparse_masked_linear.default, (x, w, *packed, b))
    torch.library.opcheck(torch.ops.pyprune.sparse_masked_linear.default,
                          (x.requires_grad_(), w.requires_grad_(), *packed, b.requires_grad_()))
    torch.library.opcheck(torch.ops.pyprune.sparse_masked_linear_grad_input.default,
                          (gy, w.detach(), packed.col_ptr, packed.row_idx))
    torch.library.opcheck(torch.ops.pyprune.sparse_masked_linear_grad_weight.default,
                          (gy, x.detach(), w.detach(), packed.row_ptr, packed.col_idx))


def test_masked_linear_prezeroed_matches_masked_linear_on_a_zeroed_weight(device):
    w, mask, b = make_layer(9, 13, 0.4, torch.float64, device, seed=6)
    w = (w * mask).requires_grad_()
    x = torch.randn(2, 5, 13, dtype=torch.float64, device=device, requires_grad=True)
    got = pp.ops.masked_linear_prezeroed(x, w, mask, b)
    torch.testing.assert_close(got, reference_linear(x, w, mask, b))
    gy = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, w), gy)
    want = torch.autograd.grad(pp.masked_linear(x, w, mask, b), (x, w), gy)
    torch.testing.assert_close(grads[0], want[0])
    assert torch.equal(grads[1], want[1]) and not grads[1][~mask].any()
    # x and bias only: a numerical derivative in w moves pruned weights off zero, outside the op's promise
    bias = b.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: pp.ops.masked_linear_prezeroed(x, w.detach(), mask, b), (x, bias))
    torch.library.opcheck(torch.ops.pyprune.masked_linear_prezeroed.default, (x.detach(), w.detach(), mask, b))
    torch.library.opcheck(torch.ops.pyprune.masked_linear_prezeroed.default, (x, w, mask, None))
    compiled = torch.compile(lambda x: pp.ops.masked_linear_prezeroed(x, w, mask, b), fullgraph=True)
    torch.testing.assert_close(compiled(x), got)
    with pytest.raises(RuntimeError, match="masked_linear_prezeroed: x's last dim must be in_features = 13"):
        pp.ops.masked_linear_prezeroed(x[..., :5], w, mask, b)


def test_compile_fullgraph_sparse_and_dense():
    w, mask, b = make_layer(9, 12, 0.3, torch.float32, "cpu")
    packed = pp.mask_pack(mask)

    def both(x, w, b):
        return pp.sparse_masked_linear(x, w, packed, b) - pp.masked_linear(x, w, mask, b)

    x = torch.randn(4, 12)
    out = torch.compile(both, fullgraph=True)(x, w, b)
    assert out.abs().max() < 1e-5


# --- bad input ------------------------------------------------------------------

def test_masked_linear_bad_input(device):
    w, mask, b = make_layer(4, 6, 0.5, torch.float32, device)
    x = torch.randn(3, 6, device=device)
    cases = [
        ((x, w, mask[:, :5], b), "mask must have weight's shape"),
        ((x, w, mask.float(), b), "mask must be a bool tensor"),
        ((torch.randn(3, 5, device=device), w, mask, b), "last dim must be in_features = 6"),
        ((x, w, mask, b[:3]), r"bias must have shape \[4\]"),
        ((x.double(), w, mask, b), "same dtype"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            pp.masked_linear(*args)
    with pytest.raises(RuntimeError, match="mask must have weight's shape"):
        pp.masked_conv2d(torch.randn(1, 2, 4, 4, device=device), torch.randn(3, 2, 3, 3, device=device),
                         torch.ones(3, 2, 3, 2, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="C = 2 channels"):
        pp.masked_conv2d(torch.randn(1, 5, 4, 4, device=device), torch.randn(3, 2, 3, 3, device=device),
                         torch.ones(3, 2, 3, 3, dtype=torch.bool, device=device))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_linear_device_mismatch():
    w, mask, b = make_layer(4, 6, 0.5, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="mask must be on weight's device"):
        pp.masked_linear(torch.randn(2, 6, device="cuda"), w, mask.cpu(), b)
    with pytest.raises(RuntimeError, match="x must be on weight's device"):
        pp.masked_linear(torch.randn(2, 6), w, mask, b)


def test_sparse_bad_input():
    w, mask, b = make_layer(4, 6, 0.5, torch.float32, "cpu")
    x = torch.randn(3, 6)
    packed = pp.mask_pack(mask)
    other = pp.mask_pack(torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="was the mask packed for another layer"):
        pp.sparse_masked_linear(x, w, other)
    bad_cols = packed._replace(col_idx=packed.col_idx + 6)
    with pytest.raises(RuntimeError, match="outside"):
        pp.sparse_masked_linear(x, w, bad_cols)
    bad_ptr = packed._replace(row_ptr=packed.row_ptr.flip(0))
    with pytest.raises(RuntimeError, match="row_ptr must start at 0"):
        pp.sparse_masked_linear(x, w, bad_ptr)
    middle = packed.row_ptr.clone()
    middle[2] = packed.nnz + 5  # ends right, a middle entry past the end
    with pytest.raises(RuntimeError, match=r"row_ptr\[\d+\] = .*must be non-decreasing"):
        pp.sparse_masked_linear(x, w, packed._replace(row_ptr=middle))
    negative = packed.col_idx.clone()
    negative[-1] = -1
    with pytest.raises(RuntimeError, match=r"col_idx\[\d+\] = -1 \(row \d+\) is outside \[0, 6\)"):
        pp.sparse_masked_linear(x, w, packed._replace(col_idx=negative))
    gy = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"row_idx\[\d+\] = \d+ \(column \d+\) is outside \[0, 4\)"):
        torch.ops.pyprune.sparse_masked_linear_grad_input(gy, w, packed.col_ptr, packed.row_idx + 4)
    with pytest.raises(RuntimeError, match=r"col_idx\[\d+\] = -1 .* is outside \[0, 6\)"):
        torch.ops.pyprune.sparse_masked_linear_grad_weight(gy, x, w, packed.row_ptr, negative)
    with pytest.raises(RuntimeError, match="int64"):
        pp.sparse_masked_linear(x, w, packed._replace(col_idx=packed.col_idx.int()))
    with pytest.raises(RuntimeError, match="last dim must be in_features"):
        pp.sparse_masked_linear(torch.randn(3, 5), w, packed)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        pp.sparse_masked_linear(x.half(), w.half(), packed)
    with pytest.raises(RuntimeError, match="2-d bool"):
        pp.mask_pack(mask.float())


def test_apply_mask_large_odd_sizes_with_pruned_infs(device):
    # Larger than one parallel chunk (65536) and not a multiple of any vector
    # width: the vectorised body, its tail and the thread split all run.
    for dtype in dtypes_for(device):
        w = torch.randn(301, 263, device=device, dtype=dtype)
        mask = torch.rand(301, 263, device=device) < 0.3
        w[~mask & (torch.rand_like(w) < 0.1)] = float("inf")  # pruned infs must become 0
        want = torch.where(mask, w, torch.zeros((), dtype=dtype, device=device))
        assert torch.equal(pp.ops.apply_mask(w, mask), want)
        got = w.clone()
        pp.ops.apply_mask_(got, mask)
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_apply_mask_matches_where(layout, device):
    for dtype in dtypes_for(device) + ([torch.bfloat16] if device == "cpu" else []):
        w = torch.randn(37, 29, device=device).to(dtype)
        mask = torch.rand(37, 29, device=device) < 0.4
        if layout == "transposed":
            w, mask = w.t(), mask.t()
        out = pp.ops.apply_mask(w, mask)
        assert torch.equal(out, torch.where(mask, w, torch.zeros((), dtype=dtype, device=device)))
    w = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(6, 5, device=device) < 0.5
    assert torch.autograd.gradcheck(lambda w: pp.ops.apply_mask(w, mask), (w,))
    torch.library.opcheck(torch.ops.pyprune.apply_mask.default, (w, mask))
    with pytest.raises(RuntimeError, match="mask must be a bool tensor"):
        pp.ops.apply_mask(w, mask.double())
    with pytest.raises(RuntimeError, match="mask must have weight's shape"):
        pp.ops.apply_mask(w, mask[:3])


def test_nonfinite_inputs_same_on_every_path(device):
    # One semantics (IEEE on where(mask, weight, 0)) on the dense and sparse paths of
    # this device; tests/bad_input_cases.py covers the CPU in depth, this the CUDA twin.
    dtype = torch.float64 if device == "cpu" else torch.float32
    w, mask, b = make_layer(6, 8, 0.3, dtype, device)
    x = torch.randn(5, 8, dtype=dtype, device=device)
    x[0, 1], x[2, 4], x[3, 7] = float("inf"), float("-inf"), float("nan")
    gy = torch.randn(5, 6, dtype=dtype, device=device)
    gy[1, 2] = float("inf")
    ref_x, ref_w = x.clone().requires_grad_(), torch.where(mask, w, 0).requires_grad_()
    ref_y = ref_x @ ref_w.T
    ref_y.backward(gy)
    for path in ("dense", "sparse"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = pp.masked_linear(xi, wi, mask) if path == "dense" else pp.sparse_masked_linear(xi, wi, pp.mask_pack(mask))
        y.backward(gy)
        for got, want in ((y.detach(), ref_y.detach()), (xi.grad, ref_x.grad),
                          (wi.grad, torch.where(mask, ref_w.grad, 0))):
            assert torch.equal(got.isnan(), want.isnan()), path
            finite = want.isfinite()
            torch.testing.assert_close(got[finite], want[finite])


def test_inplace_ops_bump_versions_and_refuse_grad_outputs(device):
    w = torch.randn(4, 5, device=device)
    mask = torch.rand(4, 5, device=device) < 0.5
    before = w._version
    pp.ops.apply_mask_(w, mask)
    assert w._version > before
    leaf = torch.randn(4, 5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        torch.ops.pyprune.apply_mask_(leaf, mask)
    with pytest.raises(RuntimeError, match="share memory"):
        pp.ops.apply_mask_(torch.zeros(1, 5, device=device).expand(4, 5), mask)
