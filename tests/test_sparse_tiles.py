"""The tiled scheme of the CUDA sparse linear kernels (csrc/include/pyprune/sparse_tiles.h).

On every machine: its CPU emulation (the same index functions, block by block
and thread by thread) against the float64 product, at shapes that cross every
tile edge (batch, lines, column chunks) and with split-K on and off. On a GPU:
the CUDA ops themselves at the same shapes, their non-finite semantics and
their run-to-run bits.
"""

import pytest
import torch

import pyprune_ext as pp

product_emulated = torch.ops.pyprune._sparse_tiles_product_emulated.default
sampled_emulated = torch.ops.pyprune._sparse_tiles_sampled_emulated.default

# (batch, out_features, in_features): one tile; every edge crossed (batch 64,
# lines 128, column chunks of 64); a thin layer with many chunks.
SHAPES = [(5, 7, 9), (130, 300, 700), (64, 128, 129), (3, 20, 1000)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def layer(batch, out_f, in_f, density, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_f, generator=gen, dtype=torch.float64)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    gy = torch.randn(batch, out_f, generator=gen, dtype=torch.float64)
    mask = torch.rand(out_f, in_f, generator=gen) < density
    bias = torch.randn(out_f, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, w, gy)] + [mask.to(device), bias.to(device, dtype)]


def assert_close_rel(got, want, dtype):
    assert got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * (want.abs().max().item() + 1e-12), err


@pytest.mark.parametrize("sms", [1, 132])  # split-K off (few blocks wanted) and on
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_emulated_products_match_reference(shape, sms, dtype):
    batch, out_f, in_f = shape
    x, w, gy, mask, bias = layer(batch, out_f, in_f, 0.3, dtype, seed=sum(shape))
    packed = pp.mask_pack(mask)
    wm = w.double() * mask
    forward = product_emulated(x, w, packed.row_ptr, packed.col_idx, in_f, 1, out_f, sms, bias)
    assert_close_rel(forward, x.double() @ wm.T + bias.double(), dtype)
    grad_input = product_emulated(gy, w, packed.col_ptr, packed.row_idx, 1, in_f, in_f, sms)
    assert_close_rel(grad_input, gy.double() @ wm, dtype)
    grad_weight = sampled_emulated(gy, x, packed.row_ptr, packed.col_idx, sms)
    assert_close_rel(grad_weight, (gy.double().T @ x.double()) * mask, dtype)
    assert not grad_weight[~mask].any()


def test_emulated_product_gives_the_dense_paths_nan():
    x, w, _, mask, _ = layer(70, 140, 150, 0.2, torch.float32, seed=3)
    x[3, 10] = float("inf")
    x[66, 149] = float("nan")
    packed = pp.mask_pack(mask)
    got = product_emulated(x, w, packed.row_ptr, packed.col_idx, 150, 1, 140, 132)
    want = pp.masked_linear(x, w, mask)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_emulated_empty_lines_and_masks():
    x, w, gy, mask, bias = layer(9, 200, 70, 0.3, torch.float64)
    mask[:130] = False  # a whole line tile without entries
    packed = pp.mask_pack(mask)
    got = product_emulated(x, w, packed.row_ptr, packed.col_idx, 70, 1, 200, 132, bias)
    torch.testing.assert_close(got, x @ (w * mask).T + bias)
    none = pp.mask_pack(torch.zeros_like(mask))
    assert torch.equal(product_emulated(x, w, none.row_ptr, none.col_idx, 70, 1, 200, 132, bias),
                       bias.expand(9, 200))
    assert not sampled_emulated(gy, x, none.row_ptr, none.col_idx, 132).any()


# The CUDA kernels themselves (run by the GPU check; skipped without a GPU).

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES + [pytest.param((256, 1024, 1024), id="slow_under_sanitizer")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
def test_cuda_sparse_ops_match_reference(shape, dtype, density):
    batch, out_f, in_f = shape
    x, w, gy, mask, bias = layer(batch, out_f, in_f, density, dtype, "cuda", seed=sum(shape))
    packed = pp.mask_pack(mask)
    wm = w.double() * mask
    assert_close_rel(pp.sparse_masked_linear(x, w, packed, bias), x.double() @ wm.T + bias.double(), dtype)
    grad_input = torch.ops.pyprune.sparse_masked_linear_grad_input(gy, w, packed.col_ptr, packed.row_idx)
    assert_close_rel(grad_input, gy.double() @ wm, dtype)
    grad_weight = torch.ops.pyprune.sparse_masked_linear_grad_weight(gy, x, w, packed.row_ptr, packed.col_idx)
    assert_close_rel(grad_weight, (gy.double().T @ x.double()) * mask, dtype)
    assert not grad_weight[~mask].any()
    # the same bits run to run, and the CUDA kernels agree with their CPU emulation
    assert torch.equal(pp.sparse_masked_linear(x, w, packed, bias), pp.sparse_masked_linear(x, w, packed, bias))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cpu = [t.cpu() for t in (x, w, packed.row_ptr, packed.col_idx, bias)]
    emulated = product_emulated(cpu[0], cpu[1], cpu[2], cpu[3], in_f, 1, out_f, sms, cpu[4])
    assert_close_rel(pp.sparse_masked_linear(x, w, packed, bias).cpu(), emulated.double(), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sparse_ops_give_the_dense_paths_nan():
    x, w, gy, mask, _ = layer(70, 140, 150, 0.2, torch.float32, "cuda", seed=3)
    x[3, 10] = float("inf")
    gy[5, 7] = float("nan")
    packed = pp.mask_pack(mask)
    for got, want in [(pp.sparse_masked_linear(x, w, packed), pp.masked_linear(x, w, mask)),
                      (torch.ops.pyprune.sparse_masked_linear_grad_input(gy, w, packed.col_ptr, packed.row_idx),
                       torch.ops.pyprune.masked_linear_grad_input(gy, w, mask))]:
        assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
        finite = want.isfinite()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
