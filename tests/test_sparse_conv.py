"""sparse_masked_conv2d (direct sparse convolution on the CPU) against a float64
conv2d on weight * mask: geometries, vector tails, gradients, opcheck, compile,
determinism and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

import pyprune_ext as pp

# (N, C, H, W, out, kernel, stride, padding, dilation, groups). Output widths
# 9, 5, 37, 13, 56 and 3 reach the 4-vector segments, 1-3 vector rests and the
# partly stored last vector; odd output heights the single-row pass; strides
# > 1 (with dilation, odd sizes) the phase-split image; groups and depthwise
# the channel offsets.
GEOMETRIES = [
    (2, 3, 7, 9, 4, 3, 1, 1, 1, 1),
    (2, 4, 8, 8, 6, 3, 2, 1, 1, 2),
    (1, 6, 11, 10, 6, 3, 1, 2, 2, 6),
    (3, 5, 6, 37, 7, 1, 1, 0, 1, 1),
    (2, 3, 13, 13, 5, (3, 5), (2, 1), (0, 2), (1, 2), 1),
    (1, 8, 5, 56, 3, 3, 1, 1, 1, 1),
    (1, 2, 5, 5, 3, 5, 1, 0, 1, 1),
    (1, 3, 17, 23, 4, 3, (3, 2), (1, 2), (2, 1), 1),
]


def make_conv(geometry, density, dtype, seed=0):
    N, C, H, W, out, k, stride, padding, dilation, groups = geometry
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(out, C // groups, kh, kw, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(out, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(w.shape, generator=gen) < density
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, w, b, mask, args


@pytest.mark.parametrize("density", [1.0, 0.4, 0.05, 0.0])
@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_sparse_conv2d_matches_reference(geometry, density):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x, w, b, mask, args = make_conv(GEOMETRIES[geometry], density, dtype, seed=geometry)
        packed = pp.mask_pack(mask)
        for bias in (b, None):
            want = F.conv2d(x.double(), w.double() * mask, None if bias is None else bias.double(), **args)
            got = pp.sparse_masked_conv2d(x, w, packed, bias, **args)
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
def test_sparse_conv2d_gradients_match_masked_conv2d(geometry):
    # Stride 1 (geometries 0, 2, 3, 5, 6) takes the sparse backward kernels,
    # strided ones the dense-masked backward.
    x, w, b, mask, args = make_conv(GEOMETRIES[geometry], 0.3, torch.float64, seed=geometry)
    packed = pp.mask_pack(mask)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    pp.sparse_masked_conv2d(*inputs[:2], packed, inputs[2], **args).pow(2).sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    F.conv2d(ref[0], ref[1] * mask, ref[2], **args).pow(2).sum().backward()
    for got, want in zip(inputs, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)
    assert (inputs[1].grad[~mask] == 0).all()


@pytest.mark.parametrize("geometry", [0, 1, 2])
def test_sparse_conv2d_gradcheck(geometry):
    x, w, b, mask, args = make_conv(GEOMETRIES[geometry], 0.5, torch.float64, seed=7)
    packed = pp.mask_pack(mask)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: pp.sparse_masked_conv2d(x, w, packed, b, **args), inputs)


def test_sparse_conv2d_gradient_ops_match_reference():
    for geometry in (0, 2, 3, 5, 6):  # stride 1
        x, w, _, mask, args = make_conv(GEOMETRIES[geometry], 0.3, torch.float32, seed=geometry)
        packed = pp.mask_pack(mask)
        y_shape = F.conv2d(x, w, **args).shape
        gy = torch.randn(y_shape)
        op_args = (x, w, packed.row_ptr, packed.col_idx, list(args["padding"]) if not isinstance(args["padding"], int)
                   else [args["padding"]] * 2,
                   list(args["dilation"]) if not isinstance(args["dilation"], int) else [args["dilation"]] * 2,
                   args["groups"])
        gx = torch.ops.pyprune.sparse_masked_conv2d_grad_input(gy, *op_args)
        gw = torch.ops.pyprune.sparse_masked_conv2d_grad_weight(gy, *op_args)
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        F.conv2d(xd, wd * mask, **args).backward(gy.double())
        torch.testing.assert_close(gx.double(), xd.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gw.double(), wd.grad, rtol=1e-4, atol=1e-4)
        assert (gw[~mask] == 0).all()
        for op in (torch.ops.pyprune.sparse_masked_conv2d_grad_input.default,
                   torch.ops.pyprune.sparse_masked_conv2d_grad_weight.default):
            torch.library.opcheck(op, (gy, *op_args))


def test_sparse_conv2d_gradient_ops_refuse_other_geometries():
    x, w, _, mask, args = make_conv(GEOMETRIES[0], 0.3, torch.float32)
    packed = pp.mask_pack(mask)
    gy = torch.randn(2, 4, 7, 9)
    with pytest.raises(RuntimeError, match="needs stride 1 and padding <= dilation"):
        torch.ops.pyprune.sparse_masked_conv2d_grad_input(gy, x, w, packed.row_ptr, packed.col_idx, [3, 3], [1, 1], 1)
    with pytest.raises(RuntimeError, match="needs stride 1 and padding <= dilation"):  # the CPU kernels
        torch.ops.pyprune.sparse_masked_conv2d_grad_weight(torch.randn(2, 4, 4, 5), x, w, packed.row_ptr,
                                                           packed.col_idx, [1, 1], [1, 1], 1, [2, 2])
    with pytest.raises(RuntimeError, match="grad_y must be \\[2, 4, 7, 9\\]"):
        torch.ops.pyprune.sparse_masked_conv2d_grad_weight(gy[:, :3], x, w, packed.row_ptr, packed.col_idx,
                                                           [1, 1], [1, 1], 1)


def test_opcheck_and_compile_sparse_conv2d():
    x, w, b, mask, args = make_conv(GEOMETRIES[0], 0.4, torch.float64)
    packed = pp.mask_pack(mask)
    conv_args = (x, w, packed.row_ptr, packed.col_idx, b, [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.pyprune.sparse_masked_conv2d.default, conv_args)
    torch.library.opcheck(torch.ops.pyprune.sparse_masked_conv2d.default,
                          (x.requires_grad_(), w.requires_grad_(), *conv_args[2:4], b.requires_grad_(),
                           *conv_args[5:]))

    def both(x, w, b):
        return pp.sparse_masked_conv2d(x, w, packed, b, **args) - pp.masked_conv2d(x, w, mask, b, **args)

    out = torch.compile(both, fullgraph=True)(x.detach(), w.detach(), b.detach())
    assert out.abs().max() < 1e-10


def test_sparse_conv2d_is_deterministic_across_threads():
    x, w, b, mask, args = make_conv((4, 16, 12, 20, 24, 3, 1, 1, 1, 1), 0.2, torch.float32, seed=3)
    packed = pp.mask_pack(mask)

    def run():
        inputs = [t.clone().requires_grad_() for t in (x, w)]
        y = pp.sparse_masked_conv2d(inputs[0], inputs[1], packed, b, **args)
        y.backward(torch.ones_like(y))
        return y.detach(), inputs[0].grad, inputs[1].grad

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        three = run()
    finally:
        torch.set_num_threads(threads)
    for a, b_ in zip(one, three):
        assert torch.equal(a, b_)
    # and a sample's output does not depend on the rest of its batch
    assert torch.equal(pp.sparse_masked_conv2d(x[1:2], w, packed, b, **args), one[0][1:2])


def test_sparse_conv2d_bad_input():
    x, w, b, mask, args = make_conv(GEOMETRIES[0], 0.4, torch.float32)
    packed = pp.mask_pack(mask)
    conv = lambda *a, **k: pp.sparse_masked_conv2d(*a, **{**args, **k})  # noqa: E731
    with pytest.raises(RuntimeError, match="was the mask packed for another layer"):
        conv(x, w, pp.mask_pack(torch.ones(5, 27, dtype=torch.bool)), b)
    with pytest.raises(RuntimeError, match=r"col_idx\[0\] = 31 \(row 0\) is outside \[0, 27\)"):
        conv(x, w, packed._replace(col_idx=packed.col_idx + 27), b)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        conv(x.half(), w.half(), packed, b.half())
    with pytest.raises(RuntimeError, match="x must be \\[N, C, H, W\\] with C = 3"):
        conv(x[:, :2], w, packed, b)
    with pytest.raises(RuntimeError, match="x must be \\[N, C, H, W\\]"):
        conv(x[0], w, packed, b)
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        conv(x[:, :, :1, :1], w, packed, b, padding=0)
    with pytest.raises(RuntimeError, match=r"(stride|dilation) must be in \[1, "):
        conv(x, w, packed, b, stride=0)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        conv(x, w, packed, b[:2])
    with pytest.raises(RuntimeError, match="groups=3 must divide out_channels=4"):
        conv(x, w, packed, b, groups=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_conv2d_every_row_width(dtype):
    # Every split of an output row into 4-vector segments and a 1-4 vector rest
    # (widths 25-31 floats once lost their last values: a 28-wide row).
    gen = torch.Generator().manual_seed(0)
    for width in range(1, 41):
        x = torch.randn(2, 3, 4, width, generator=gen, dtype=torch.float64).to(dtype)
        w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64).to(dtype)
        mask = torch.rand(w.shape, generator=gen) < 0.6
        packed = pp.mask_pack(mask)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        want = F.conv2d(x.double(), w.double() * mask, padding=1)
        got = pp.sparse_masked_conv2d(x, w, packed, None, padding=1)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item(),
                                   msg=lambda m: f"width {width}: {m}")
        gy = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(dtype)
        gx = torch.ops.pyprune.sparse_masked_conv2d_grad_input(gy, x, w, packed.row_ptr, packed.col_idx, [1, 1],
                                                               [1, 1], 1)
        gw = torch.ops.pyprune.sparse_masked_conv2d_grad_weight(gy, x, w, packed.row_ptr, packed.col_idx, [1, 1],
                                                                [1, 1], 1)
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        F.conv2d(xd, wd * mask, padding=1).backward(gy.double())
        torch.testing.assert_close(gx.double(), xd.grad, rtol=tol, atol=tol * xd.grad.abs().max().item(),
                                   msg=lambda m: f"grad_x, width {width}: {m}")
        torch.testing.assert_close(gw.double(), wd.grad, rtol=tol * 10, atol=tol * 10 * wd.grad.abs().max().item(),
                                   msg=lambda m: f"grad_w, width {width}: {m}")
