"""What the sparse ops' input checks cost: the packed-mask validation (ranges,
order, the CSR/CSC checksum) and the non-finite scan of the input, next to the
sparse forward they guard.

A call with an empty batch runs every check of `sparse_masked_linear` and no
product, so its time is the checks' cost; the scan of a finite input is timed
alone (`torch.isfinite(x).all()`, what the op runs).

    python -m benchmarks.sparse_checks [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from pyprune_ext import ops
from pyprune_ext.bench.common import machine_name, median_seconds, print_table, write_json

LAYERS = [(4096, 4096, 0.02), (4096, 4096, 0.05), (4096, 4096, 0.10), (1024, 1024, 0.05), (300, 784, 0.10)]
BATCHES = [64, 256]


def measure(out_f: int, in_f: int, density: float, min_run_time: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=g)
    packed = ops.mask_pack(torch.rand(out_f, in_f, generator=g) < density)
    empty = torch.randn(0, in_f)
    pack_checks = median_seconds(lambda: ops.sparse_masked_linear(empty, weight, packed), "cpu", min_run_time)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=g)
        scan = median_seconds(lambda: torch.isfinite(x).all(), "cpu", min_run_time)
        forward = median_seconds(lambda: ops.sparse_masked_linear(x, weight, packed), "cpu", min_run_time)
        rows.append({"layer": f"{out_f}x{in_f}", "density": density, "nnz": packed.nnz, "batch": batch,
                     "pack_checks_ms": pack_checks * 1e3, "nonfinite_scan_ms": scan * 1e3,
                     "forward_ms": forward * 1e3, "share": (pack_checks + scan) / forward})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = parser.parse_args(argv)
    min_run_time = 0.1 if args.quick else 0.5
    rows = [row for layer in LAYERS for row in measure(*layer, min_run_time)]
    print_table(f"sparse_masked_linear forward: checks vs the product, {machine_name('cpu')}",
                ["layer", "density", "kept", "batch", "pack checks ms", "non-finite scan ms", "forward ms",
                 "checks' share"],
                [[r["layer"], f"{r['density']:.0%}", str(r["nnz"]), str(r["batch"]), f"{r['pack_checks_ms']:.3f}",
                  f"{r['nonfinite_scan_ms']:.3f}", f"{r['forward_ms']:.3f}", f"{r['share']:.0%}"] for r in rows])
    if args.json:
        write_json(args.json, {"machine": machine_name("cpu"), "rows": rows})


if __name__ == "__main__":
    main()
