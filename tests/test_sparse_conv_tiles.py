"""The tiled scheme of the CUDA sparse convolution kernels (csrc/include/pyprune/sparse_conv_tiles.h).

On every machine: its CPU emulation (the same index functions, block by block
and lane by lane) against a float64 conv2d on weight * mask and its gradients,
at geometries that cross every tile edge (pixel tiles, column tiles, line tiles
of 16, source chunks, entry batches of 32) and the transposed entries of
grad_input. On a GPU: the CUDA ops themselves at the same geometries, through
autograd, their non-finite semantics, their run-to-run bits and MaskedConv2d
on the sparse path.
"""

import pytest
import torch
import torch.nn.functional as F

import pyprune_ext as pp

E = torch.ops.pyprune
STAGE = 48 * 1024  # the CUDA kernels' shared memory per block
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# (N, C, H, W, out, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (2, 3, 7, 9, 4, 3, 1, 1, 1, 1),                         # one tile
    (2, 4, 8, 8, 6, 3, 2, 1, 1, 2),                         # stride 2, groups
    (1, 6, 11, 10, 6, 3, 1, 2, 2, 6),                       # depthwise, dilation
    (3, 5, 6, 37, 7, 1, 1, 0, 1, 1),                        # 1x1
    (2, 3, 13, 13, 5, (3, 5), (2, 1), (0, 2), (1, 2), 1),   # mixed strides, padding, dilation
    (1, 20, 9, 300, 20, 3, 1, 1, 1, 1),                     # column tiles (300 > 256), 2 line tiles
    (2, 40, 6, 6, 3, 3, 1, 1, 1, 1),                        # > 32 entries of a line per chunk
    (1, 8, 28, 28, 18, 3, 2, 1, 1, 1),                      # several pixel tiles at stride 2
    (2, 3, 6, 7, 4, 3, 1, 3, 1, 1),                         # padding > kernel reach: grad_input's is negative
    (1, 4, 11, 12, 5, (3, 2), (3, 2), (1, 0), (2, 1), 1),   # stride 3 with dilation 2: phases of 1-2 taps
    (2, 4, 9, 9, 6, 1, 2, 0, 1, 1),                         # 1x1 stride 2: phases no tap reaches
]


def pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def make_conv(geometry, density, dtype, device="cpu", seed=0):
    N, C, H, W, out, k, stride, padding, dilation, groups = geometry
    kh, kw = pair(k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(out, C // groups, kh, kw, generator=gen, dtype=torch.float64)
    b = torch.randn(out, generator=gen, dtype=torch.float64)
    mask = torch.rand(w.shape, generator=gen) < density
    args = dict(stride=pair(stride), padding=pair(padding), dilation=pair(dilation), groups=groups)
    return [t.to(device, dtype) for t in (x, w, b)] + [mask.to(device), args]


def reference(x, w, b, mask, args, gy=None):
    """The float64 forward and, given grad_y, grad_x and the masked grad_w."""
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    y = F.conv2d(xd, wd * mask, None if b is None else b.double(), **args)
    if gy is None:
        return y.detach()
    y.backward(gy.double())
    return y.detach(), xd.grad, wd.grad * mask


def assert_close_rel(got, want, dtype):
    assert got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * (want.abs().max().item() + 1e-12), err


def grad_args(args):
    return args["padding"], args["dilation"], args["groups"], args["stride"]


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_forward_matches_reference(geometry, density, dtype):
    x, w, b, mask, args = make_conv(GEOMETRIES[geometry], density, dtype, seed=geometry)
    packed = pp.mask_pack(mask)
    got = E._sparse_conv2d_tiles_emulated(x, w, packed.row_ptr, packed.col_idx, b, *args.values(), STAGE)
    assert_close_rel(got, reference(x, w, b, mask, args), dtype)


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
def test_emulated_gradients_match_reference(geometry, density):
    # every stride: grad_input one direct convolution per stride phase of grad_x
    x, w, b, mask, args = make_conv(GEOMETRIES[geometry], density, torch.float64, seed=geometry)
    packed = pp.mask_pack(mask)
    gy = torch.randn(reference(x, w, b, mask, args).shape, dtype=torch.float64)
    _, want_gx, want_gw = reference(x, w, b, mask, args, gy)
    gx = E._sparse_conv2d_grad_input_tiles_emulated(gy, x, w, packed.row_ptr, packed.col_idx, *grad_args(args), STAGE)
    assert_close_rel(gx, want_gx, torch.float64)
    for sms in (1, 132):  # one split, and one per image
        gw = E._sparse_conv2d_grad_weight_tiles_emulated(gy, x, w, packed.row_ptr, packed.col_idx, *grad_args(args),
                                                         sms)
        assert_close_rel(gw, want_gw, torch.float64)
        assert not gw[~mask].any()


@pytest.mark.parametrize("channels_per_chunk", [1, 2, 3])
def test_emulated_source_chunks(channels_per_chunk):
    # A small stage: the sources in chunks of 1-3 channels, the last one partial
    # (7 channels), entries of a line split across chunks.
    x, w, b, mask, args = make_conv((2, 7, 9, 30, 5, 3, 1, 1, 1, 1), 0.4, torch.float64, seed=1)
    packed = pp.mask_pack(mask)
    window = (8 + 2) * (30 + 2)  # tiles of 8 rows x 30 (256 pixels at most): 10 x 32 input values per channel
    stage = 8 * window * channels_per_chunk
    got = E._sparse_conv2d_tiles_emulated(x, w, packed.row_ptr, packed.col_idx, b, *args.values(), stage)
    assert_close_rel(got, reference(x, w, b, mask, args), torch.float64)
    gy = torch.randn(got.shape, dtype=torch.float64)
    _, want_gx, _ = reference(x, w, b, mask, args, gy)
    gx = E._sparse_conv2d_grad_input_tiles_emulated(gy, x, w, packed.row_ptr, packed.col_idx, *grad_args(args), stage)
    assert_close_rel(gx, want_gx, torch.float64)
    with pytest.raises(RuntimeError, match="does not fit in"):
        E._sparse_conv2d_tiles_emulated(x, w, packed.row_ptr, packed.col_idx, b, *args.values(), 8 * window - 8)


def test_emulated_bfloat16_and_empty_masks():
    x, w, b, mask, args = make_conv(GEOMETRIES[5], 0.2, torch.bfloat16, seed=4)
    packed = pp.mask_pack(mask)
    got = E._sparse_conv2d_tiles_emulated(x, w, packed.row_ptr, packed.col_idx, b, *args.values(), STAGE)
    assert got.dtype == torch.bfloat16
    assert_close_rel(got, reference(x, w, b, mask, args), torch.bfloat16)
    mask[:17] = False  # a whole line tile without entries
    packed = pp.mask_pack(mask)
    got = E._sparse_conv2d_tiles_emulated(x, w, packed.row_ptr, packed.col_idx, b, *args.values(), STAGE)
    assert_close_rel(got, reference(x, w, b, mask, args), torch.bfloat16)
    none = pp.mask_pack(torch.zeros_like(mask))
    got = E._sparse_conv2d_tiles_emulated(x, w, none.row_ptr, none.col_idx, b, *args.values(), STAGE)
    assert torch.equal(got, b[None, :, None, None].expand_as(got))


def test_emulation_refuses_unsorted_entries():
    x, w, b, mask, args = make_conv(GEOMETRIES[0], 0.6, torch.float64)
    packed = pp.mask_pack(mask)
    col_idx = packed.col_idx.clone()
    first = int(packed.row_ptr[0])
    col_idx[first], col_idx[first + 1] = col_idx[first + 1].item(), col_idx[first].item()
    with pytest.raises(RuntimeError, match="out of range or out of order"):
        E._sparse_conv2d_tiles_emulated(x, w, packed.row_ptr, col_idx, b, *args.values(), STAGE)


# The CUDA kernels themselves (run by the GPU check; skipped without a GPU).

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("geometry", list(range(len(GEOMETRIES))) +
                         [pytest.param((32, 64, 56, 56, 64, 3, 1, 1, 1, 1), id="slow_under_sanitizer")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
def test_cuda_sparse_conv_ops_match_reference(geometry, dtype, density):
    shape = GEOMETRIES[geometry] if isinstance(geometry, int) else geometry
    x, w, b, mask, args = make_conv(shape, density, dtype, "cuda", seed=7)
    packed = pp.mask_pack(mask)
    y = pp.sparse_masked_conv2d(x, w, packed, b, **args)
    assert y.dtype == dtype
    assert_close_rel(y, reference(x, w, b, mask, args), dtype)
    assert torch.equal(y, pp.sparse_masked_conv2d(x, w, packed, b, **args))  # the same bits run to run
    # the backward, at every geometry on CUDA
    gy = torch.randn(y.shape, device="cuda", dtype=torch.float64).to(dtype)
    _, want_gx, want_gw = reference(x, w, b, mask, args, gy)
    op_args = (gy, x, w, packed.row_ptr, packed.col_idx, *grad_args(args))
    gx = E.sparse_masked_conv2d_grad_input(*op_args)
    gw = E.sparse_masked_conv2d_grad_weight(*op_args)
    assert_close_rel(gx, want_gx, dtype)
    assert_close_rel(gw, want_gw, dtype)
    assert not gw[~mask].any()
    assert torch.equal(gw, E.sparse_masked_conv2d_grad_weight(*op_args))
    if isinstance(geometry, int) and dtype == torch.float32:  # the kernels agree with their CPU emulation
        cpu = [t.cpu() for t in (x, w, packed.row_ptr, packed.col_idx, b)]
        emulated = E._sparse_conv2d_tiles_emulated(*cpu, *args.values(), STAGE)
        torch.testing.assert_close(y.cpu(), emulated, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("geometry", [0, 2, 4])
def test_cuda_sparse_conv_gradcheck_and_opcheck(geometry):
    x, w, b, mask, args = make_conv(GEOMETRIES[geometry], 0.5, torch.float64, "cuda", seed=3)
    packed = pp.mask_pack(mask)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: pp.sparse_masked_conv2d(x, w, packed, b, **args), inputs)
    conv_args = (x, w, packed.row_ptr, packed.col_idx, b, *args.values())
    torch.library.opcheck(E.sparse_masked_conv2d.default, conv_args)
    compiled = torch.compile(lambda x, w, b: pp.sparse_masked_conv2d(x, w, packed, b, **args), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), pp.sparse_masked_conv2d(x, w, packed, b, **args))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sparse_conv_gives_the_dense_paths_nan():
    x, w, b, mask, args = make_conv(GEOMETRIES[0], 0.3, torch.float32, "cuda", seed=5)
    x[0, 1, 3, 4] = float("inf")
    packed = pp.mask_pack(mask)
    got, want = pp.sparse_masked_conv2d(x, w, packed, b, **args), pp.masked_conv2d(x, w, mask, b, **args)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sparse_conv_window_too_large_takes_the_dense_path():
    # dilation 200 on a 3x3: one tile's input window (~400 x 660 values) exceeds the stage
    x, w, b, mask, args = make_conv((1, 2, 420, 420, 3, 3, 1, 200, 200, 1), 0.5, torch.float32, "cuda")
    packed = pp.mask_pack(mask)
    assert_close_rel(pp.sparse_masked_conv2d(x, w, packed, b, **args), reference(x, w, b, mask, args), torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masked_conv2d_module_takes_the_sparse_path_when_asked():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).cuda()
    mask = torch.rand(conv.weight.shape, device="cuda") < 0.1
    masked = pp.nn.MaskedConv2d.from_dense(conv, mask)
    masked.sparse_threshold = 1.0
    x = torch.randn(4, 16, 20, 20, device="cuda", requires_grad=True)
    y = masked(x)
    y.square().sum().backward()
    xr = x.detach().double().requires_grad_()
    wr = conv.weight.detach().double().requires_grad_()
    F.conv2d(xr, wr * mask, conv.bias.double(), padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad.double(), wr.grad * mask, rtol=1e-4, atol=1e-4)
