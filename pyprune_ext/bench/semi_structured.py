"""2:4 MaskedLinear on sparse tensor cores against dense cuBLAS (CUDA only).

    pyprune bench semi_structured [--quick] [--json-dir DIR]
    python -m pyprune_ext.bench.semi_structured [--dtype bfloat16|float16] [--batches 2048,4096,8192] [--json FILE]

For a 4096x4096 layer with a 2:4 mask (magnitude, along in_features), in one run
on the same inputs:
  dense        F.linear on the unmasked weight (cuBLAS): the speed to beat
  2:4 fwd      MaskedLinear's forward on its semi-structured path, the weight
               unchanged since it was compressed (inference)
  2:4 step     forward + backward after a weight change, as in training: the
               weight is zeroed (what the keeper does after each optimizer step),
               compressed again, the sparse forward, then the dense-masked backward
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ..nn import MaskedLinear
from .common import machine_name, median_seconds, print_table, write_json

FEATURES = 4096


def two_four_mask(weight):
    groups = weight.abs().view(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.view_as(weight)


def run_batch(batch, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(FEATURES, FEATURES, generator=gen, device="cuda", dtype=dtype)
    b = torch.randn(FEATURES, generator=gen, device="cuda", dtype=dtype)
    x = torch.randn(batch, FEATURES, generator=gen, device="cuda", dtype=dtype)
    layer = MaskedLinear(FEATURES, FEATURES, device="cuda", dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    layer.set_mask(two_four_mask(w))
    layer.semi_structured = True  # an error naming why, where the GPU or torch cannot run it
    with torch.no_grad():
        reference = F.linear(x, layer.weight, b)  # the weight is zeroed at pruned positions
        error = (layer(x) - reference).abs().max().item()
    if error > 0.05 * reference.abs().max().item():
        raise RuntimeError(f"the 2:4 path disagrees with the dense-masked layer at batch {batch}: {error}")

    def dense_fwd():
        with torch.no_grad():
            F.linear(x, w, b)

    def nm_fwd():
        with torch.no_grad():
            layer(x)

    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()

    def dense_step():
        wg.grad = bg.grad = xg.grad = None
        F.linear(xg, wg, bg).sum().backward()

    def nm_step():
        layer.weight.grad = layer.bias.grad = xg.grad = None
        layer.apply_mask_()  # a changed weight, zeroed as after an optimizer step: compressed again
        layer(xg).sum().backward()

    return {name: median_seconds(fn, "cuda", min_run_time=0.3) * 1e3
            for name, fn in [("dense", dense_fwd), ("2:4 fwd", nm_fwd), ("dense step", dense_step),
                             ("2:4 step", nm_step)]}


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cuda only (the CPU has no 2:4 path)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="batch 2048 only")
    parser.add_argument("--batches", default="2048,4096,8192", help="comma-separated batch sizes")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if args.quick:
        batches = batches[:1]
    if args.device != "cuda" or not torch.cuda.is_available():
        sys.exit("pyprune bench semi_structured: needs a CUDA GPU with 2:4 sparse tensor cores (compute capability 8.0+)")
    dtype = getattr(torch, args.dtype)
    machine = machine_name("cuda")
    results, rows = [], []
    for batch in batches:
        ms = run_batch(batch, dtype)
        results.append({"case": f"{FEATURES}x{FEATURES} batch {batch}", "batch": batch, "dtype": args.dtype, "ms": ms})
        rows.append([str(batch), f"{ms['dense']:.3f}", f"{ms['2:4 fwd']:.3f}", f"{ms['dense'] / ms['2:4 fwd']:.2f}x",
                     f"{ms['dense step']:.3f}", f"{ms['2:4 step']:.3f}", f"{ms['dense step'] / ms['2:4 step']:.2f}x"])
        print(f"  batch {batch}: 2:4 fwd {ms['2:4 fwd']:.3f} ms, dense {ms['dense']:.3f} ms", file=sys.stderr, flush=True)
    print_table(f"2:4 MaskedLinear {FEATURES}x{FEATURES}, {args.dtype}, {machine}",
                ["batch", "dense fwd ms", "2:4 fwd ms", "fwd speed-up", "dense fwd+bwd ms", "2:4 step ms",
                 "step speed-up"], rows)
    if args.json:
        write_json(args.json, {"benchmark": "semi_structured", "machine": machine, "dtype": args.dtype,
                               "results": results})


if __name__ == "__main__":
    main()
