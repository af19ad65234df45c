"""The bad-input suite's cases: generated calls of every op and masked module with
wrong shapes, dtypes and devices, odd strides, aliased outputs, non-finite values,
extreme integers, corrupted packed masks and zero-size layers.

Each case is a name and a function. An error case must raise an error whose
message contains every listed fragment (it names the argument and the problem);
an "ok" case must return, its function asserting the result against a plain
PyTorch float64 reference. tests/bad_input_worker.py runs them in a subprocess,
so that a crash is a failed case, not a dead test run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import pyprune_ext  # noqa: F401  (registers the ops)
from pyprune_ext import nn as pnn
from pyprune_ext import ops

P = torch.ops.pyprune
INT32_MAX = 2**31 - 1


@dataclass
class Case:
    name: str
    run: Callable[[], None]
    error: Optional[List[str]] = field(default=None)  # fragments the message must contain; None: must succeed


CASES: List[Case] = []


def error_case(name: str, *fragments: str):
    def register(fn):
        CASES.append(Case(name, fn, list(fragments)))
        return fn
    return register


def ok_case(name: str):
    def register(fn):
        CASES.append(Case(name, fn))
        return fn
    return register


def layer(out_f=6, in_f=8, density=0.5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, dtype=dtype, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) < density
    x = torch.randn(5, in_f, dtype=dtype, generator=g)
    return x, w, mask


def conv_layer(out_c=4, in_c=3, k=3, density=0.5, dtype=torch.float64, hw=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_c, in_c, k, k, dtype=dtype, generator=g)
    mask = torch.rand(out_c, in_c, k, k, generator=g) < density
    x = torch.randn(2, in_c, hw, hw, dtype=dtype, generator=g)
    return x, w, mask


def same_values(got, want):
    """Equal up to rounding, with NaN and infinities at the same places."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got.isnan(), want.isnan()), "NaN at different places"
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()]), "infinities differ"
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# Shapes, dtypes, devices of every op.

def _linear_ops():
    """(name, call(x, w, mask, bias)) for the linear family's forward paths."""
    return [
        ("masked_linear", lambda x, w, m, b=None: P.masked_linear(x, w, m, b)),
        ("sparse_masked_linear", lambda x, w, m, b=None: ops.sparse_masked_linear(x, w, ops.mask_pack(m), b)),
    ]


for op_name, call in _linear_ops():
    x, w, m = layer()
    error_case(f"{op_name}: x's last dim wrong", "x's last dim", "8")(lambda c=call, x=x, w=w, m=m: c(x[:, :7], w, m))
    error_case(f"{op_name}: x int", "dtype")(lambda c=call, x=x, w=w, m=m: c(x.long(), w, m))
    error_case(f"{op_name}: bias wrong shape", "bias", "[6]")(
        lambda c=call, x=x, w=w, m=m: c(x, w, m, torch.zeros(5, dtype=w.dtype)))
    error_case(f"{op_name}: bias on meta", "bias", "device")(
        lambda c=call, x=x, w=w, m=m: c(x, w, m, torch.zeros(6, dtype=w.dtype, device="meta")))
    error_case(f"{op_name}: x on meta", "x", "device")(lambda c=call, x=x, w=w, m=m: c(x.to("meta"), w, m))

x, w, m = layer()
error_case("masked_linear: mask float", "mask", "bool")(lambda: P.masked_linear(x, w, m.double(), None))
error_case("masked_linear: mask shape", "mask", "shape")(lambda: P.masked_linear(x, w, m[:, :7], None))
error_case("masked_linear: mask on meta", "mask", "device", "meta")(lambda: P.masked_linear(x, w, m.to("meta"), None))
error_case("masked_linear: weight 1-d", "weight", "2-d")(lambda: P.masked_linear(x, w[0], m[0], None))
error_case("masked_linear_grad_input: grad_y's last dim", "grad_y")(
    lambda: P.masked_linear_grad_input(torch.randn(5, 5, dtype=w.dtype), w, m))
error_case("masked_linear_grad_input: mask on meta", "mask", "meta")(
    lambda: P.masked_linear_grad_input(torch.randn(5, 6, dtype=w.dtype), w, m.to("meta")))
error_case("masked_linear_grad_weight: x's last dim", "x")(
    lambda: P.masked_linear_grad_weight(torch.randn(5, 6, dtype=w.dtype), x[:, :7], m))
error_case("apply_mask: mask shape", "mask", "shape")(lambda: ops.apply_mask(w, m[:, :7]))
error_case("apply_mask: mask int", "mask", "bool")(lambda: ops.apply_mask(w, m.int()))
error_case("apply_mask: mask on meta", "mask", "device", "meta")(lambda: ops.apply_mask(w, m.to("meta")))
error_case("apply_mask_: mask on meta", "mask", "device", "meta")(lambda: ops.apply_mask_(w.clone(), m.to("meta")))
error_case("mask_pack: 3-d mask", "mask_pack", "2-d")(lambda: P.mask_pack(m.view(2, 3, 8)))
error_case("mask_pack: float mask", "mask_pack", "bool")(lambda: P.mask_pack(m.float()))
error_case("sparse_masked_linear: half on the CPU", "float32 and float64")(
    lambda: ops.sparse_masked_linear(x.half(), w.half(), ops.mask_pack(m)))
error_case("sparse_masked_linear: int32 packed mask", "row_ptr", "int64")(
    lambda: ops.sparse_masked_linear(x, w, ops.PackedMask(*[t.int() for t in ops.mask_pack(m)])))
error_case("sparse_masked_linear: mask packed for another layer", "row_ptr", "entries")(
    lambda: ops.sparse_masked_linear(x, w, ops.mask_pack(torch.ones(7, 8, dtype=torch.bool))))

xc, wc, mc = conv_layer()
error_case("masked_conv2d: x has wrong channels", "x", "channels")(lambda: ops.masked_conv2d(xc[:, :2], wc, mc))
error_case("masked_conv2d: mask on meta", "mask", "meta")(lambda: ops.masked_conv2d(xc, wc, mc.to("meta")))
error_case("sparse_masked_conv2d: x 3-d", "x", "[N, C, H, W]")(
    lambda: ops.sparse_masked_conv2d(xc[0], wc, ops.mask_pack(mc)))
error_case("sparse_masked_conv2d: input smaller than the kernel", "smaller than the dilated kernel")(
    lambda: ops.sparse_masked_conv2d(xc[:, :, :2, :2], wc, ops.mask_pack(mc)))
error_case("sparse_masked_conv2d: x on meta", "x", "device")(
    lambda: ops.sparse_masked_conv2d(xc.to("meta"), wc, ops.mask_pack(mc)))

a = torch.randn(4, 6, 5, 5)
error_case("taylor_channel_stats: shapes differ", "same shape")(lambda: ops.taylor_channel_stats(a, a[:, :5]))
error_case("taylor_channel_stats: int input", "float32")(lambda: ops.taylor_channel_stats(a.long(), a.long()))
error_case("taylor_channel_stats: channel_dim huge", "channel_dim")(
    lambda: ops.taylor_channel_stats(a, a, channel_dim=2**40))
error_case("taylor_channel_stats: g on meta", "device")(lambda: ops.taylor_channel_stats(a, a.to("meta")))
error_case("taylor_channel_stats_: first on meta", "first", "device")(
    lambda: P.taylor_channel_stats_(a, a, torch.zeros(6, device="meta"), torch.zeros(6), 1))
error_case("taylor_channel_stats_: first wrong length", "first", "[6]")(
    lambda: P.taylor_channel_stats_(a, a, torch.zeros(5), torch.zeros(6), 1))
error_case("taylor_weight_stats: 0-d", "0-d")(lambda: ops.taylor_weight_stats(torch.tensor(1.0), torch.tensor(1.0)))

mw = [torch.randn(5, 4), torch.randn(3)]
mm = [torch.ones(5, 4, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]
error_case("magnitude_prune: k negative", "k")(lambda: ops.magnitude_prune(mw, mm, -1))
error_case("magnitude_prune: k above the kept count", "k")(lambda: ops.magnitude_prune(mw, mm, 2**62))
error_case("magnitude_prune: mask shape", "mask")(lambda: ops.magnitude_prune(mw, [mm[0], mm[0]], 1))
error_case("magnitude_prune: mask on meta", "device")(lambda: ops.magnitude_prune(mw, [mm[0].to("meta"), mm[1]], 1))
error_case("magnitude_threshold: lists differ in length", "masks")(lambda: ops.magnitude_threshold(mw, mm[:1], 1))


# ---------------------------------------------------------------------------
# Strides: non-contiguous inputs give the reference result.

@ok_case("masked_linear and sparse_masked_linear: transposed weight and strided x")
def _():
    x, w, m = layer(8, 8)
    wt, mt, xs = w.t(), m.t(), torch.randn(5, 16, dtype=w.dtype)[:, ::2]
    want = xs @ torch.where(mt, wt, 0).T
    same_values(ops.masked_linear(xs, wt, mt), want)
    same_values(ops.sparse_masked_linear(xs, wt, ops.mask_pack(mt)), want)


@ok_case("apply_mask_: strided (non-overlapping) weight")
def _():
    base = torch.randn(6, 16, dtype=torch.float64)
    view = base[:, ::2]
    mask = torch.rand(6, 8) < 0.5
    want = torch.where(mask, view, 0)
    with torch.no_grad():
        ops.apply_mask_(view, mask)
    same_values(view, want)
    same_values(base[:, 1::2], base.clone()[:, 1::2])  # the other columns untouched


@ok_case("sparse_masked_conv2d: channels_last x")
def _():
    x, w, m = conv_layer()
    got = ops.sparse_masked_conv2d(x.contiguous(memory_format=torch.channels_last), w, ops.mask_pack(m), padding=1)
    same_values(got, F.conv2d(x, torch.where(m, w, 0), padding=1))


# ---------------------------------------------------------------------------
# Aliasing and autograd safety of the in-place ops.

error_case("apply_mask_: expanded weight", "share memory", "clone()")(
    lambda: ops.apply_mask_(torch.zeros(1, 8).expand(6, 8), torch.ones(6, 8, dtype=torch.bool)))
error_case("apply_mask_: self-overlapping as_strided weight", "share memory")(
    lambda: ops.apply_mask_(torch.zeros(20).as_strided((4, 4), (2, 1)), torch.ones(4, 4, dtype=torch.bool)))
error_case("apply_mask_: leaf requiring grad", "leaf", "torch.no_grad()")(
    lambda: P.apply_mask_(torch.randn(3, requires_grad=True), torch.ones(3, dtype=torch.bool)))
error_case("apply_mask_: non-leaf requiring grad", "requires grad", "torch.no_grad()")(
    lambda: P.apply_mask_(torch.randn(3, requires_grad=True) * 2, torch.ones(3, dtype=torch.bool)))
error_case("taylor_channel_stats_: first is second", "different")(
    lambda: (lambda f: P.taylor_channel_stats_(a, a, f, f, 1))(torch.zeros(6)))
error_case("taylor_channel_stats_: first expanded", "share memory")(
    lambda: P.taylor_channel_stats_(a, a, torch.zeros(1).expand(6), torch.zeros(6), 1))
error_case("taylor_channel_stats_: first aliases a", "first", "share memory with a")(
    lambda: (lambda a2: P.taylor_channel_stats_(a2, a2.clone(), a2[0], torch.zeros(6), 1))(torch.randn(3, 6)))
error_case("taylor_channel_stats_: first requires grad", "first", "leaf")(
    lambda: P.taylor_channel_stats_(a, a, torch.zeros(6, requires_grad=True), torch.zeros(6), 1))


def _modified_after_save(mutate):
    """A tensor saved for backward, then mutated: backward must refuse."""
    w = torch.randn(4, 5, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = x @ w  # saves w
    mutate(w)
    y.sum().backward()


error_case("apply_mask_ on a tensor saved for backward", "modified by an inplace operation")(
    lambda: _modified_after_save(lambda w: ops.apply_mask_(w, torch.rand(4, 5) < 0.5)))


def _stats_buffer_saved():
    first, second = torch.zeros(6), torch.zeros(6)
    s = torch.randn(6, requires_grad=True)
    y = s * first  # saves first
    P.taylor_channel_stats_(a, a, first, second, 1)
    y.sum().backward()


error_case("taylor_channel_stats_ on a buffer saved for backward", "modified by an inplace operation")(
    _stats_buffer_saved)


@ok_case("apply_mask_ and taylor_channel_stats_ bump version counters (also in inference mode)")
def _():
    w = torch.randn(4, 5)
    first, second = torch.zeros(6), torch.zeros(6)
    versions = (w._version, first._version, second._version)
    ops.apply_mask_(w, torch.rand(4, 5) < 0.5)
    P.taylor_channel_stats_(a, a, first, second, 1)
    assert w._version > versions[0] and first._version > versions[1] and second._version > versions[2]
    v = w._version
    with torch.inference_mode():
        ops.apply_mask_(w, torch.rand(4, 5) < 0.5)
    assert w._version > v


# ---------------------------------------------------------------------------
# Non-finite values: every path returns what PyTorch returns on where(mask, weight, 0).

def _with_nonfinite(t, seed):
    g = torch.Generator().manual_seed(seed)
    t = t.clone()
    flat = t.view(-1)
    picks = torch.randperm(flat.numel(), generator=g)[:3]
    flat[picks[0]], flat[picks[1]], flat[picks[2]] = float("inf"), float("-inf"), float("nan")
    return t


for seed, density in itertools.product(range(3), (0.1, 0.5)):
    @ok_case(f"non-finite x and grad_y, linear, density {density}, seed {seed}: dense == sparse == reference")
    def _(seed=seed, density=density):
        x, w, m = layer(density=density, seed=seed)
        w = torch.where(m, w, torch.full_like(w, float("inf")))  # pruned infinities are zeros
        x = _with_nonfinite(x, seed)
        gy = _with_nonfinite(torch.randn(5, 6, dtype=w.dtype), seed + 10)
        ref_w = torch.where(m, w, 0).requires_grad_()
        ref_x = x.clone().requires_grad_()
        ref_y = ref_x @ ref_w.T
        ref_y.backward(gy)
        for path in ("dense", "sparse"):
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = ops.masked_linear(xi, wi, m) if path == "dense" else ops.sparse_masked_linear(xi, wi, ops.mask_pack(m))
            y.backward(gy)
            same_values(y.detach(), ref_y.detach())
            same_values(xi.grad, ref_x.grad)
            same_values(wi.grad, torch.where(m, ref_w.grad, 0))


for seed, stride in itertools.product(range(8), (1, 2)):
    @ok_case(f"non-finite x and grad_y, conv2d stride {stride}, seed {seed}: dense == sparse == reference")
    def _(seed=seed, stride=stride):
        x, w, m = conv_layer(density=0.3, seed=seed)
        x = _with_nonfinite(x, seed)
        ref_x = x.clone().requires_grad_()
        ref_w = torch.where(m, w, 0).requires_grad_()
        ref_y = F.conv2d(ref_x, ref_w, stride=stride, padding=1)
        g = torch.Generator().manual_seed(seed)
        gy = _with_nonfinite(torch.randn(ref_y.shape, dtype=ref_y.dtype, generator=g), seed + 10)
        ref_y.backward(gy)
        for path in ("dense", "sparse"):
            xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = (ops.masked_conv2d(xi, wi, m, stride=stride, padding=1) if path == "dense"
                 else ops.sparse_masked_conv2d(xi, wi, ops.mask_pack(m), stride=stride, padding=1))
            y.backward(gy)
            same_values(y.detach(), ref_y.detach())
            same_values(xi.grad, ref_x.grad)
            same_values(wi.grad, torch.where(m, ref_w.grad, 0))


@ok_case("MaskedLinear and MaskedConv2d: the same non-finite output on either path")
def _():
    lin = pnn.MaskedLinear(8, 6, mask=torch.rand(6, 8) < 0.1).double()
    x = _with_nonfinite(torch.randn(5, 8, dtype=torch.float64), 0)
    outs = []
    for threshold in (0.0, 1.0):  # 0: dense-masked always, 1: sparse always
        lin.sparse_threshold = threshold
        outs.append(lin(x).detach())
    same_values(outs[0], outs[1])
    conv = pnn.MaskedConv2d(3, 4, 3, padding=1, mask=torch.rand(4, 3, 3, 3) < 0.2).double()
    xc = _with_nonfinite(torch.randn(2, 3, 9, 9, dtype=torch.float64), 1)
    outs = []
    for threshold in (0.0, 1.0):
        conv.sparse_threshold = threshold
        outs.append(conv(xc).detach())
    same_values(outs[0], outs[1])


# ---------------------------------------------------------------------------
# Corrupted packed masks: refused, naming the entry.

def _corrupt(field_name, edit):
    x, w, m = layer(density=0.6)
    packed = ops.mask_pack(m)
    t = getattr(packed, field_name).clone()
    edit(t)
    return x, w, packed._replace(**{field_name: t})


def _dup(t):
    t[1] = t[0]


def _swap(t):
    t[0], t[1] = t[1].clone(), t[0].clone()


CORRUPTIONS = {
    "duplicate index": (_dup, ["duplicate"]),
    "unsorted indices": (_swap, ["increasing"]),
    "negative index": (lambda t: t.__setitem__(0, -1), ["outside"]),
    "huge index": (lambda t: t.__setitem__(0, 2**62), ["outside"]),
}
for what, (edit, fragments) in CORRUPTIONS.items():
    def forward(edit=edit):
        x, w, packed = _corrupt("col_idx", edit)
        ops.sparse_masked_linear(x, w, packed)

    def grad_input(edit=edit):
        x, w, packed = _corrupt("row_idx", edit)
        P.sparse_masked_linear_grad_input(torch.randn(5, 6, dtype=w.dtype), w, packed.col_ptr, packed.row_idx)

    def grad_weight(edit=edit):
        x, w, packed = _corrupt("col_idx", edit)
        P.sparse_masked_linear_grad_weight(torch.randn(5, 6, dtype=w.dtype), x, w, packed.row_ptr, packed.col_idx)

    def conv(edit=edit):
        x, w, m = conv_layer(density=0.6)
        packed = ops.mask_pack(m)
        ci = packed.col_idx.clone()
        edit(ci)
        ops.sparse_masked_conv2d(x, w, packed._replace(col_idx=ci))

    error_case(f"sparse_masked_linear: {what} in col_idx", "col_idx[", *fragments)(forward)
    error_case(f"sparse_masked_linear_grad_input: {what} in row_idx", "row_idx[", *fragments)(grad_input)
    error_case(f"sparse_masked_linear_grad_weight: {what} in col_idx", "col_idx[", *fragments)(grad_weight)
    error_case(f"sparse_masked_conv2d: {what} in col_idx", "col_idx[", *fragments)(conv)


@error_case("sparse_masked_linear: row_ptr decreasing", "row_ptr[", "non-decreasing")
def _():
    x, w, packed = _corrupt("row_ptr", lambda t: t.__setitem__(1, t[-1] + 5))
    ops.sparse_masked_linear(x, w, packed)


@error_case("sparse_masked_linear: row_ptr ends short", "row_ptr", "must start at 0 and end at")
def _():
    x, w, packed = _corrupt("row_ptr", lambda t: t.__setitem__(-1, t[-1] - 1))
    ops.sparse_masked_linear(x, w, packed)


@error_case("sparse_masked_linear: CSC half of another mask (same nnz)", "different masks", "row ", "column ")
def _():
    x, w, m = layer(density=0.5)
    packed = ops.mask_pack(m)
    flat = m.flatten().clone()
    on, off = flat.nonzero()[0], (~flat).nonzero()[0]
    flat[on], flat[off] = False, True  # one entry moved: same count, another mask
    other = ops.mask_pack(flat.view_as(m))
    ops.sparse_masked_linear(x, w, packed._replace(col_ptr=other.col_ptr, row_idx=other.row_idx))


@error_case("sparse_masked_linear: CSC half with fewer entries", "CSR half has", "CSC half")
def _():
    x, w, m = layer(density=0.5)
    packed = ops.mask_pack(m)
    other = ops.mask_pack(m & (torch.rand(m.shape) < 0.5))
    ops.sparse_masked_linear(x, w, packed._replace(col_ptr=other.col_ptr, row_idx=other.row_idx))


# ---------------------------------------------------------------------------
# Extreme integers.

CONV_INTS = {
    "stride 2**32": dict(stride=2**32), "stride 2**63-1": dict(stride=2**63 - 1), "stride 0": dict(stride=0),
    "padding -1": dict(padding=-1), "padding 2**40": dict(padding=2**40), "dilation 0": dict(dilation=0),
    "dilation 2**33": dict(dilation=2**33), "groups 0": dict(groups=0), "groups -3": dict(groups=-3),
    "groups 2**40": dict(groups=2**40),
}
for what, kwargs in CONV_INTS.items():
    arg = next(iter(kwargs))
    xc, wc, mc = conv_layer()
    error_case(f"sparse_masked_conv2d: {what}", arg)(
        lambda kw=kwargs: ops.sparse_masked_conv2d(xc, wc, ops.mask_pack(mc), **kw))
    error_case(f"masked_conv2d: {what}", arg)(lambda kw=kwargs: ops.masked_conv2d(xc, wc, mc, **kw))


@error_case("MaskedConv2d(stride=2**32): forward", "stride")
def _():
    conv = pnn.MaskedConv2d(3, 4, 3, stride=2**32, mask=torch.rand(4, 3, 3, 3) < 0.1)
    conv(torch.randn(1, 3, 9, 9))


@ok_case("sparse_masked_conv2d: stride INT32_MAX (one output) == conv2d")
def _():
    x, w, m = conv_layer()
    for stride in ((INT32_MAX, INT32_MAX), (INT32_MAX, 1), (1, INT32_MAX)):
        got = ops.sparse_masked_conv2d(x, w, ops.mask_pack(m), stride=stride, padding=1)
        same_values(got, F.conv2d(x, torch.where(m, w, 0), stride=stride, padding=1))


# ---------------------------------------------------------------------------
# Zero-size layers work (empty output, or the bias) on every path.

@ok_case("zero-size linear: in_features 0, out_features 0, batch 0")
def _():
    for out_f, in_f, batch in ((4, 0, 3), (0, 5, 3), (4, 5, 0), (0, 0, 0)):
        w = torch.randn(out_f, in_f, dtype=torch.float64)
        m = torch.ones(out_f, in_f, dtype=torch.bool)
        b = torch.randn(out_f, dtype=torch.float64)
        x = torch.randn(batch, in_f, dtype=torch.float64, requires_grad=True)
        want = F.linear(x.detach(), w, b)
        for y in (ops.masked_linear(x, w, m, b), ops.sparse_masked_linear(x, w, ops.mask_pack(m), b)):
            same_values(y.detach(), want)
            y.sum().backward()
        for module in (pnn.MaskedLinear(in_f, out_f).double(),):
            for threshold in (0.0, 1.0):
                module.sparse_threshold = threshold
                assert module(x.detach()).shape == (batch, out_f)


@ok_case("zero-size conv: batch 0")
def _():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    m = torch.ones_like(w, dtype=torch.bool)
    x = torch.randn(0, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(x.detach(), w)
    for y in (ops.masked_conv2d(x, w, m), ops.sparse_masked_conv2d(x, w, ops.mask_pack(m))):
        same_values(y.detach(), want)
        y.sum().backward()


_empty_bank = torch.randn(0, 3, 3, 3, dtype=torch.float64)
error_case("masked_conv2d: out_channels 0 (refused, as by torch's conv2d)", "0 output channels")(
    lambda: ops.masked_conv2d(torch.randn(2, 3, 8, 8, dtype=torch.float64), _empty_bank,
                              torch.ones_like(_empty_bank, dtype=torch.bool)))
error_case("sparse_masked_conv2d: out_channels 0 (refused, as by torch's conv2d)", "0 output channels")(
    lambda: ops.sparse_masked_conv2d(torch.randn(2, 3, 8, 8, dtype=torch.float64), _empty_bank,
                                     ops.mask_pack(torch.ones_like(_empty_bank, dtype=torch.bool))))
