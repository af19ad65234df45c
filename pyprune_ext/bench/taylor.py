"""Taylor-statistics benchmark: our fused op against eager PyTorch, torch.compile
of the same function, and a bandwidth reference measured in the same run.

    pyprune bench taylor [--device cpu|cuda] [--quick] [--no-compile] [--json FILE]
    python -m pyprune_ext.bench.taylor [same options]

Every method computes s = sum over the reduced dims of a*g, then
first = sum_n s and second = sum_n s^2, from the same inputs. Bytes are those
the op must read (a and g once); GB/s = bytes / median time. The reference is
torch.dot over the two flattened tensors (reads both once; float32 over the same bytes) on the CPU and a
device-to-device copy (read + write) on CUDA.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import pyprune_ext as pp

from .common import machine_name, median_seconds, print_table, write_json

CPU_CASES = [
    # (shape, layout, dtype)
    ((64, 256, 28, 28), "NCHW", torch.float32),
    ((64, 64, 56, 56), "NCHW", torch.float32),
    ((64, 256, 28, 28), "channels_last", torch.float32),
    ((64, 196, 768), "NLC", torch.float32),
    ((64, 256, 28, 28), "NCHW", torch.bfloat16),
]
CUDA_CASES = [
    ((64, 256, 28, 28), "NCHW", torch.float32),
    ((64, 64, 56, 56), "NCHW", torch.float32),
    ((256, 256, 56, 56), "NCHW", torch.float32),
    ((256, 256, 56, 56), "NCHW", torch.bfloat16),
    ((256, 256, 56, 56), "channels_last", torch.bfloat16),
    ((256, 256, 56, 56), "channels_last", torch.float32),
    ((64, 196, 768), "NLC", torch.bfloat16),
    ((256, 1024, 4096), "NLC", torch.bfloat16),
]


def eager_stats(a: torch.Tensor, g: torch.Tensor, channel_dim: int):
    """The plain-PyTorch way: product, per-example sums, then the two statistics."""
    dims = [d for d in range(1, a.dim()) if d != channel_dim % a.dim()]
    s = torch.sum(a * g, dim=dims, dtype=torch.float32)
    return s.sum(0), (s * s).sum(0)


def make_inputs(shape, layout, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    g = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    return a, g, (-1 if layout == "NLC" else 1)


def bandwidth_reference(a, g, device):
    """(name, GB/s) of the memory-bound peer measured on the same bytes."""
    if device == "cuda":
        out = torch.empty_like(a)
        t = median_seconds(lambda: out.copy_(a), device)
        return "copy", 2 * a.nbytes / t / 1e9
    # float32 dot over the same bytes: a bfloat16 dot on the CPU is compute-bound.
    a_flat = a.contiguous().view(-1).view(torch.float32)
    g_flat = g.contiguous().view(-1).view(torch.float32)
    t = median_seconds(lambda: torch.dot(a_flat, g_flat), device)
    return "dot", 2 * a.nbytes / t / 1e9


def run_case(shape, layout, dtype, device, with_compile):
    a, g, cd = make_inputs(shape, layout, dtype, device)
    read_bytes = 2 * a.nbytes
    first, second = pp.taylor_channel_stats(a, g, cd)
    ref_first, ref_second = eager_stats(a.double(), g.double(), cd)
    rel_err = ((first.double() - ref_first).norm() / ref_first.norm()).item()

    t_op = median_seconds(lambda: pp.taylor_channel_stats(a, g, cd), device)
    t_eager = median_seconds(lambda: eager_stats(a, g, cd), device)
    t_compiled = math.nan
    if with_compile:
        torch._dynamo.reset()
        compiled = torch.compile(eager_stats, dynamic=False)
        t_compiled = median_seconds(lambda: compiled(a, g, cd), device)
    ref_name, ref_gbps = bandwidth_reference(a, g, device)
    del a, g
    op_gbps = read_bytes / t_op / 1e9
    return {
        "shape": list(shape), "layout": layout, "dtype": str(dtype).replace("torch.", ""),
        "op_ms": t_op * 1e3, "eager_ms": t_eager * 1e3, "compile_ms": t_compiled * 1e3,
        "op_gbps": op_gbps, "reference": ref_name, "reference_gbps": ref_gbps,
        "speedup_vs_eager": t_eager / t_op, "speedup_vs_compile": t_compiled / t_op,
        "fraction_of_reference": op_gbps / ref_gbps, "first_rel_err_vs_fp64": rel_err,
    }


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="first two cases only, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and pp.build_info()["cuda"]):
        parser.error("--device cuda needs a GPU and a CUDA build of pyprune_ext")

    cases = CUDA_CASES if args.device == "cuda" else CPU_CASES
    if args.quick:
        cases = cases[:2]
    with_compile = not (args.quick or args.no_compile)
    results = []
    for shape, layout, dtype in cases:
        results.append(run_case(shape, layout, dtype, args.device, with_compile))
        r = results[-1]
        print(f"  {r['shape']} {layout} {r['dtype']}: op {r['op_ms']:.3f} ms", file=sys.stderr, flush=True)  # progress

    machine = machine_name(args.device)
    headers = ["shape (layout, dtype)", "ours ms", "eager ms", "compile ms", "ours GB/s",
               "reference GB/s", "vs eager", "vs compile", "of reference"]
    rows = [[f"{'x'.join(map(str, r['shape']))} ({r['layout']}, {r['dtype']})",
             f"{r['op_ms']:.3f}", f"{r['eager_ms']:.3f}", f"{r['compile_ms']:.3f}",
             f"{r['op_gbps']:.1f}", f"{r['reference_gbps']:.1f} ({r['reference']})",
             f"{r['speedup_vs_eager']:.1f}x", f"{r['speedup_vs_compile']:.2f}x",
             f"{100 * r['fraction_of_reference']:.0f}%"] for r in results]
    print_table(f"taylor_channel_stats on {machine}", headers, rows)
    if args.json:
        write_json(args.json, {"benchmark": "taylor", "machine": machine, "results": results})


if __name__ == "__main__":
    main()
