"""Masked-layer benchmark: our masked / sparse ops against dense layers, the
torch.nn.utils.prune way and torch.sparse CSR, in one run on the same inputs.

    pyprune bench masked [--device cpu|cuda] [--dtype ...] [--quick] [--only TEXT] [--forward-only] [--json FILE]
    python -m pyprune_ext.bench.masked [same options]

Methods, for y = x @ (w * m)^T (+ its backward where timed):
  dense      F.linear / F.conv2d on the unmasked weight: the speed to beat
  prune      the torch.nn.utils.prune way: an nn.Linear / nn.Conv2d pruned with
             prune.custom_from_mask (weight_orig * weight_mask in a forward pre-hook)
  csr        torch.sparse: (w * m) as a CSR tensor built once, then sparse @ dense
             (forward only; values frozen, which flatters it)
  masked     pyprune masked_linear / masked_conv2d (dense-masked path)
  zeroed     pyprune masked_linear_prezeroed on a weight already zero at pruned
             positions (the dense-masked path MaskedLinear takes while its weight
             is unchanged since it was zeroed, i.e. in training after every step)
  sparse     pyprune sparse_masked_linear / sparse_masked_conv2d with the mask
             packed once
  auto       pyprune.nn.MaskedLinear / MaskedConv2d: the path the module picks
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import pyprune_ext as pp
from pyprune_ext.nn import MaskedConv2d, MaskedLinear

from .common import machine_name, median_seconds, print_table, write_json

DENSITIES = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02]
LINEAR_CASES = [  # (name, out, in, batch)
    ("lenet fc1 300x784", 300, 784, 60),
    ("lenet fc2 100x300", 100, 300, 60),
    ("lenet fc3 10x100", 10, 100, 60),
    ("1024x1024", 1024, 1024, 64),
    ("1024x1024", 1024, 1024, 256),
    ("4096x4096", 4096, 4096, 64),
    ("4096x4096", 4096, 4096, 256),
]
CONV_CASES = [  # (name, in, out, size, batch, stride): the conv, and a ResNet-style downsampling one
    ("conv3x3 64->64 56x56", 64, 64, 56, 32, 1),
    ("conv3x3 stride 2 64->128 56x56", 64, 128, 56, 32, 2),
]


def timed(fn, device, backward, params):
    """Median ms of fn() (forward) or of fn().sum().backward() (forward+backward)."""
    if not backward:
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            for p in params:
                p.grad = None
            fn().sum().backward()
    return median_seconds(run, device, min_run_time=0.3) * 1e3


def torch_pruned(module, w, b, mask):
    """The torch.nn.utils.prune way, on a copy of the layer's values."""
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    return prune.custom_from_mask(module, "weight", mask)


def linear_methods(x, w, b, mask, backward):
    packed = pp.mask_pack(mask)
    module = MaskedLinear.from_dense(torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype), mask)
    with torch.no_grad():
        module.weight.copy_(w * mask)
        module.bias.copy_(b)
    module.apply_mask_()  # as after an optimizer step: the module knows its weight is zeroed
    pruned = torch_pruned(torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype), w, b, mask)
    methods = {
        "dense": lambda: F.linear(x, w, b),
        "prune": lambda: pruned(x),
        "masked": lambda: pp.masked_linear(x, w, mask, b),
        "zeroed": lambda: pp.ops.masked_linear_prezeroed(x, module.weight, mask, module.bias),
        "sparse": lambda: pp.sparse_masked_linear(x, w, packed, b),
        "auto": lambda: module(x),
    }
    if not backward and x.dtype != torch.float16 and x.dtype != torch.bfloat16:
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        csr = (w * mask).detach().to_sparse_csr()
        methods["csr"] = lambda: torch.sparse.mm(csr, x.t()).t() + b
    return methods, [w, b, module.weight, module.bias, pruned.weight_orig, pruned.bias, x]


def conv_methods(x, w, b, mask, backward, stride=1):
    layer = dict(kernel_size=3, stride=stride, padding=1, device=w.device, dtype=w.dtype)
    module = MaskedConv2d.from_dense(torch.nn.Conv2d(w.shape[1], w.shape[0], **layer), mask)
    with torch.no_grad():
        module.weight.copy_(w * mask)
        module.bias.copy_(b)
    pruned = torch_pruned(torch.nn.Conv2d(w.shape[1], w.shape[0], **layer), w, b, mask)
    methods = {
        "dense": lambda: F.conv2d(x, w, b, stride=stride, padding=1),
        "prune": lambda: pruned(x),
        "masked": lambda: pp.masked_conv2d(x, w, mask, b, stride=stride, padding=1),
        "auto": lambda: module(x),
    }
    if x.device.type == "cuda" or x.dtype in (torch.float32, torch.float64):  # the sparse kernels' dtypes
        packed = pp.mask_pack(mask)
        methods["sparse"] = lambda: pp.sparse_masked_conv2d(x, w, packed, b, stride=stride, padding=1)
    return methods, [w, b, module.weight, module.bias, pruned.weight_orig, pruned.bias, x]


def run_case(kind, shape_args, density, device, dtype, backward):
    gen = torch.Generator(device=device).manual_seed(0)
    if kind == "linear":
        out_f, in_f, batch = shape_args
        w = torch.randn(out_f, in_f, generator=gen, device=device, dtype=dtype)
        x = torch.randn(batch, in_f, generator=gen, device=device, dtype=dtype)
        b = torch.randn(out_f, generator=gen, device=device, dtype=dtype)
    else:
        c_in, c_out, size, batch, stride = shape_args
        w = torch.randn(c_out, c_in, 3, 3, generator=gen, device=device, dtype=dtype)
        x = torch.randn(batch, c_in, size, size, generator=gen, device=device, dtype=dtype)
        b = torch.randn(c_out, generator=gen, device=device, dtype=dtype)
    mask = torch.rand(w.shape, generator=gen, device=device) < density
    for t in (w, b, x):
        t.requires_grad_(backward)
    make = linear_methods if kind == "linear" else functools.partial(conv_methods, stride=stride)
    methods, params = make(x, w, b, mask, backward)
    reference = methods["prune"]().detach()
    times = {}
    for name, fn in methods.items():
        if name != "dense":  # every other method computes the masked layer: check it does
            with torch.no_grad():
                error = (fn() - reference).abs().max().item()
            # float32: accumulated rounding; 16-bit types: a few ulps of the output
            relative = 1e-4 * math.sqrt(w[0].numel()) if dtype == torch.float32 else 0.05
            if error > relative * (reference.abs().max().item() + 1e-6):
                raise RuntimeError(f"{name} disagrees with the reference at density {density}: {error}")
        times[name] = timed(fn, device, backward, params)
    return times


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="two linear shapes, forward only")
    parser.add_argument("--only", metavar="TEXT", help="only the cases whose name contains TEXT (e.g. 4096)")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cases = [("linear", (o, i, b), f"{name} batch {b}") for name, o, i, b in LINEAR_CASES]
    cases += [("conv", c[1:], f"{c[0]} batch {c[4]}") for c in CONV_CASES]
    modes = [False] if args.forward_only else [False, True]
    if args.only:
        cases = [c for c in cases if args.only in c[2]]
    if args.quick:
        cases, modes = [cases[0], cases[5]], [False]

    machine = machine_name(args.device)
    results = []
    for kind, shape_args, label in cases:
        for backward in modes:
            rows = []
            for density in DENSITIES:
                times = run_case(kind, shape_args, density, args.device, dtype, backward)
                results.append({"case": label, "backward": backward, "density": density, "ms": times})
                cols = [f"{100 * density:g}%"]
                for name in ["dense", "prune", "csr", "masked", "zeroed", "sparse", "auto"]:
                    cols.append(f"{times[name]:.3f}" if name in times else "-")
                cols.append(f"{times['prune'] / times['auto']:.2f}x")
                cols.append(f"{times['dense'] / times['auto']:.2f}x")
                rows.append(cols)
                # progress on stderr, so the tables on stdout can be saved as they are
                print(f"  {label} {'fwd+bwd' if backward else 'fwd'} {100 * density:g}%: auto {times['auto']:.3f} ms",
                      file=sys.stderr, flush=True)
            print_table(f"{label}, {'forward+backward' if backward else 'forward'}, {args.dtype}, {machine}",
                        ["density", "dense ms", "prune ms", "csr ms", "masked ms", "zeroed ms", "sparse ms", "auto ms",
                         "auto vs prune", "auto vs dense"], rows)
    if args.json:
        write_json(args.json, {"benchmark": "masked", "machine": machine, "dtype": args.dtype, "results": results})


if __name__ == "__main__":
    main()
