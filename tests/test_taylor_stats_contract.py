"""The op contract of the Taylor-statistics ops: opcheck, torch.compile,
autograd, argument errors and build information."""

import pytest
import torch

import pyprune_ext as pp

from test_taylor_stats import random_pair


def opcheck_inputs(device):
    a, g = random_pair((3, 6, 5, 4), torch.float32, device)
    a_cl, g_cl = (t.contiguous(memory_format=torch.channels_last) for t in (a, g))
    b, h = random_pair((2, 9, 12), torch.float64, device)
    return [(a, g, 1), (a_cl, g_cl, 1), (b, h, -1), (b.to(torch.bfloat16), h.to(torch.bfloat16), 2)]


def test_opcheck_channel_stats(device):
    for a, g, cd in opcheck_inputs(device):
        torch.library.opcheck(torch.ops.pyprune.taylor_channel_stats.default, (a, g, cd))
        a_req = a.detach().clone().requires_grad_(a.dtype == torch.float64)
        torch.library.opcheck(torch.ops.pyprune.taylor_channel_stats.default, (a_req, g, cd))


def test_opcheck_channel_stats_inplace(device):
    for a, g, cd in opcheck_inputs(device):
        dtype = pp.ops.stats_dtype(a.dtype)
        first = torch.rand(a.shape[cd], dtype=dtype, device=device)
        second = torch.rand(a.shape[cd], dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.pyprune.taylor_channel_stats_.default, (a, g, first, second, cd))


def test_opcheck_weight_stats(device):
    for shape in [(8, 3, 3, 3), (10, 7), (5,)]:
        w, g = random_pair(shape, torch.float64, device)
        torch.library.opcheck(torch.ops.pyprune.taylor_weight_stats.default, (w, g))
        torch.library.opcheck(torch.ops.pyprune.taylor_weight_stats.default, (w.requires_grad_(), g))


def test_compile_fullgraph(device):
    def scores(a, g, w, gw):
        first, second = pp.taylor_channel_stats(a, g)
        wf, ws = pp.taylor_weight_stats(w, gw)
        return first ** 2, second, wf ** 2 + ws

    compiled = torch.compile(scores, fullgraph=True)
    a, g = random_pair((4, 8, 6, 6), torch.float32, device)
    w, gw = random_pair((8, 3, 3, 3), torch.float32, device, seed=1)
    for got, want in zip(compiled(a, g, w, gw), scores(a, g, w, gw)):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_inplace(device):
    def accumulate(a, g, first, second):
        pp.taylor_channel_stats_(a, g, first, second, -1)
        return first * 2

    compiled = torch.compile(accumulate, fullgraph=True)
    a, g = random_pair((3, 10, 16), torch.float32, device)
    first, second = torch.zeros(16, device=device), torch.zeros(16, device=device)
    out = compiled(a, g, first, second)
    ref_first, ref_second = pp.taylor_channel_stats(a, g, -1)
    torch.testing.assert_close(first, ref_first)  # the mutation reached the caller's buffer
    torch.testing.assert_close(second, ref_second)
    torch.testing.assert_close(out, 2 * ref_first)


def test_gradcheck_channel_stats(device):
    for shape, cd in [((3, 4, 5), 1), ((2, 3, 4, 2), 1), ((3, 5, 4), -1)]:
        a, g = random_pair(shape, torch.float64, device)
        a.requires_grad_()
        g.requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: pp.taylor_channel_stats(x, y, cd), (a, g))


def test_gradcheck_weight_stats(device):
    w, g = random_pair((4, 3, 2, 2), torch.float64, device)
    assert torch.autograd.gradcheck(pp.taylor_weight_stats, (w.requires_grad_(), g.requires_grad_()))


# --- bad input: a RuntimeError that names the problem ---------------------------

def bad_channel_stats_cases(device):
    a, g = random_pair((2, 3, 4, 4), torch.float32, device)
    return [
        ((a, g[:, :2]), {}, "same shape"),
        ((a, g.double()), {}, "same dtype"),
        ((a, g), {"channel_dim": 4}, "out of range"),
        ((a, g), {"channel_dim": -5}, "out of range"),
        ((a, g), {"channel_dim": 0}, "batch dim"),
        ((a, g), {"channel_dim": -4}, "batch dim"),
        ((a.to(torch.int32), g.to(torch.int32)), {}, "float32, float64, float16 or bfloat16"),
        ((a[0, 0, 0], g[0, 0, 0]), {}, "at least 2 dims"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_channel_stats_bad_input(case, device):
    args, kwargs, message = bad_channel_stats_cases(device)[case]
    with pytest.raises(RuntimeError, match=message):
        pp.taylor_channel_stats(*args, **kwargs)


def test_sparse_input_rejected():
    a, g = random_pair((4, 3), torch.float32, "cpu")
    with pytest.raises((RuntimeError, NotImplementedError), match="(?i)sparse|layout"):
        pp.taylor_channel_stats(a.to_sparse(), g.to_sparse())
    with pytest.raises((RuntimeError, NotImplementedError), match="(?i)sparse|layout"):
        pp.taylor_weight_stats(a.to_sparse(), g.to_sparse())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_rejected():
    a, g = random_pair((2, 3, 4), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="same device"):
        pp.taylor_channel_stats(a, g.cuda())
    first = torch.zeros(3, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        pp.taylor_channel_stats_(a, g, first, torch.zeros(3))


def test_inplace_bad_buffers(device):
    a, g = random_pair((2, 3, 4), torch.float32, device)
    good = torch.zeros(3, device=device)
    with pytest.raises(RuntimeError, match=r"first must have shape \[3\]"):
        pp.taylor_channel_stats_(a, g, torch.zeros(4, device=device), good.clone())
    with pytest.raises(RuntimeError, match="second must be Float"):
        pp.taylor_channel_stats_(a, g, good.clone(), good.double())
    with pytest.raises(RuntimeError, match="different buffers"):
        pp.taylor_channel_stats_(a, g, good, good)


def test_weight_stats_bad_input(device):
    w, g = random_pair((4, 3, 3), torch.float32, device)
    with pytest.raises(RuntimeError, match="same shape"):
        pp.taylor_weight_stats(w, g[:3])
    with pytest.raises(RuntimeError, match="0-d"):
        pp.taylor_weight_stats(w[0, 0, 0], g[0, 0, 0])
    with pytest.raises(RuntimeError, match="float32, float64"):
        pp.taylor_weight_stats(w.long(), g.long())


def test_build_info():
    info = pp.build_info()
    assert set(info) == {"cuda", "cuda_arch_list", "torch_version", "openmp", "cpu_only_reason"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["openmp"] is True
    if info["cuda"]:
        assert info["cuda_arch_list"] and all(arch[0].isdigit() for arch in info["cuda_arch_list"].split(";"))
    else:
        assert info["cuda_arch_list"] == ""


def test_torch_version_mismatch_is_explained():
    from pyprune_ext import _check_torch_version

    _check_torch_version("2.14.1", "2.14.1+cu130")  # local version suffixes do not matter
    _check_torch_version(None, "2.14.1")  # unknown build version: nothing to compare
    with pytest.raises(ImportError, match=r"built against torch 2\.11\.0 but torch 2\.14\.1 is installed.*no-build-isolation"):
        _check_torch_version("2.11.0", "2.14.1")
