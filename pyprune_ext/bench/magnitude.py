"""Global magnitude pruning benchmark: our radix-select op against torch's ways
of finding one threshold over many weight tensors, time and peak extra memory.

    pyprune bench magnitude [--device cpu|cuda] [--dtype ...] [--threads N] [--quick] [--methods M,...] [--json FILE]
    python -m pyprune_ext.bench.magnitude [same options]

Sets: ResNet-50's 54 conv/fc weights (25.5M) and LeNet-300-100's 3 (266K),
with 100% and 20% of the weights kept (random masks); every method prunes 20%
of the kept weights (one IMP level). Methods:
  ours       pyprune magnitude_prune: histogram passes in place, new masks
  ours thr   pyprune magnitude_threshold: the cut only, no masks
  kthvalue   torch.cat of the kept |w|, torch.kthvalue, then m & (|w| > t) per
             tensor (prunes every weight tied at the threshold: not always k)
  topk       the core of torch.nn.utils.prune.global_unstructured (L1): cat of
             the kept |w|, torch.topk(k, largest=False), indices scattered into
             the concatenated mask, split back
  sort       cat of the kept |w|, stable argsort, the first k scattered back:
             exactly our rule (the tests' reference); checked equal to ours
  read       physical reference: every weight and mask read once
             (w.sum(), m.count_nonzero()), no selection
Peak extra memory: bytes above the inputs at the method's peak, outputs
included (the new masks are 1 byte per weight for every method that makes
them). CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident
size (VmHWM, reset through /proc/self/clear_refs) with glibc's mmap threshold
fixed at 64 KiB and malloc_trim before each measurement, so that freed memory
leaves the resident set and every new allocation shows.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import time

import torch

import pyprune_ext as pp
from pyprune_ext.ops import kept_count

from .common import machine_name, median_seconds, print_table, write_json

PRUNE_FRACTION = 0.2
DENSITIES = [1.0, 0.2]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Conv and fc weight shapes of torchvision's ResNet-50 (bottleneck blocks 3-4-6-3)."""
    shapes = [(64, 3, 7, 7)]
    in_c = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(width, in_c, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, in_c, 1, 1))  # downsample
            in_c = 4 * width
    shapes.append((1000, 2048))
    return shapes


SETS = {
    "resnet50": resnet50_shapes(),
    "lenet-300-100": [(300, 784), (100, 300), (10, 100)],
}


# ---------------------------------------------------------------------------
# The methods. Each returns new masks (or a threshold) for k pruned weights.


def kept_abs(weights, masks):
    """All kept |w| in (tensor, flat index) order: the concatenation we avoid."""
    return torch.cat([w.abs().reshape(-1)[m.reshape(-1)] for w, m in zip(weights, masks)])


def scatter_pruned(masks, drop):
    """New masks with the kept entries at positions `drop` (indices into the
    concatenation of the kept weights) set False."""
    flat = torch.cat([m.reshape(-1) for m in masks])
    kept_positions = flat.nonzero().squeeze(1)
    flat[kept_positions[drop]] = False
    return [part.view(m.shape) for part, m in zip(flat.split([m.numel() for m in masks]), masks)]


def by_kthvalue(weights, masks, k):
    threshold = kept_abs(weights, masks).kthvalue(k).values
    return [m & (w.abs() > threshold) for w, m in zip(weights, masks)]


def by_topk(weights, masks, k):
    drop = torch.topk(kept_abs(weights, masks), k, largest=False).indices
    return scatter_pruned(masks, drop)


def by_sort(weights, masks, k):
    drop = torch.argsort(kept_abs(weights, masks), stable=True)[:k]
    return scatter_pruned(masks, drop)


def read_once(weights, masks, k):
    return [(w.sum(), m.count_nonzero()) for w, m in zip(weights, masks)]


METHODS = {
    "ours": lambda w, m, k: pp.magnitude_prune(w, m, k).masks,
    "ours thr": lambda w, m, k: pp.magnitude_threshold(w, m, k),
    "kthvalue": by_kthvalue,
    "topk": by_topk,
    "sort": by_sort,
    "read": read_once,
}


# ---------------------------------------------------------------------------
# Measurement.


def timed_ms(fn, device: str) -> float:
    """Median ms. Slow methods (seconds on a CPU) get 3 plain runs instead of
    the Timer's warm-up and autorange."""
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    once = time.perf_counter() - start
    if once < 0.2:
        return median_seconds(fn, device, min_run_time=0.5) * 1e3
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return sorted(runs)[1] * 1e3


class CpuPeak:
    """Peak resident-size growth of this process around a call (Linux)."""

    def __init__(self):
        self.ok = False
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            m_mmap_threshold = -3
            self._libc.mallopt(m_mmap_threshold, 64 * 1024)  # also turns off glibc's dynamic threshold
            self._reset()
            self.ok = True
        except (OSError, AttributeError):
            pass

    @staticmethod
    def _reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(field)

    def measure(self, fn) -> float | None:
        if not self.ok:
            return None
        gc.collect()
        # Hands free heap pages back to the OS: a later allocation served from
        # the heap faults its pages in again, so it shows in the peak.
        self._libc.malloc_trim(0)
        self._reset()
        before = self._status("VmRSS")
        out = fn()
        peak = self._status("VmHWM")
        del out
        return max(0, peak - before)


def peak_extra_bytes(fn, device: str, cpu_peak: CpuPeak) -> float | None:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return peak - base
    return cpu_peak.measure(fn)


def make_set(shapes, density, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    weights, masks = [], []
    for s in shapes:  # Kaiming-like scale per layer
        fan_in = math.prod(s[1:])
        weights.append(torch.randn(s, generator=gen, device=device, dtype=dtype) * math.sqrt(2 / fan_in))
        masks.append(torch.rand(s, generator=gen, device=device) < density)
    return weights, masks


def time_case(name, density, device, dtype, methods):
    weights, masks = make_set(SETS[name], density, device, dtype)
    kept = kept_count(masks)
    k = round(PRUNE_FRACTION * kept)
    ours = pp.magnitude_prune(weights, masks, k).masks
    results = {}
    for method in methods:
        fn = lambda: METHODS[method](weights, masks, k)  # noqa: E731
        out = fn()
        pruned = None
        if isinstance(out, list) and isinstance(out[0], torch.Tensor):
            pruned = kept - kept_count(out)
            if method == "sort":  # the exact rule: must agree with ours bit for bit
                assert all(torch.equal(a, b) for a, b in zip(out, ours)), "sort and ours disagree"
        del out
        results[method] = {"ms": timed_ms(fn, device), "pruned": pruned}
    return {"set": name, "density": density, "weights": sum(w.numel() for w in weights),
            "tensors": len(weights), "kept": kept, "k": k, "methods": results}


def measure_memory(case, device, dtype, cpu_peak):
    weights, masks = make_set(SETS[case["set"]], case["density"], device, dtype)
    for method, m in case["methods"].items():
        fn = lambda: METHODS[method](weights, masks, case["k"])  # noqa: E731
        m["peak_extra_bytes"] = peak_extra_bytes(fn, device, cpu_peak)


def fmt_mib(b):
    return "n/a" if b is None else f"{b / 2**20:.2f}"


def print_case(r, dtype_name, machine):
    ours_ms = r["methods"]["ours"]["ms"] if "ours" in r["methods"] else None
    rows = []
    for method, m in r["methods"].items():
        rows.append([
            method, f"{m['ms']:.2f}",
            f"{m['ms'] / ours_ms:.2f}x" if ours_ms else "-",
            fmt_mib(m.get("peak_extra_bytes")),
            "-" if m["pruned"] is None else f"{m['pruned']:,}",
        ])
    title = (f"{r['set']}: {r['weights']:,} weights in {r['tensors']} tensors, {100 * r['density']:g}% kept "
             f"({r['kept']:,}), prune k = {r['k']:,}; {dtype_name}, {machine}")
    print_table(title, ["method", "ms", "time vs ours", "peak extra MiB", "pruned"], rows)


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="LeNet set only")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {sorted(unknown)}")
    machine = machine_name(args.device)
    names = ["lenet-300-100"] if args.quick else list(SETS)
    # Times first, with the allocator as users have it; then memory, with the
    # allocator settings that make the peak resident size exact (CPU).
    results = [time_case(name, density, args.device, dtype, methods) for name in names for density in DENSITIES]
    cpu_peak = CpuPeak() if args.device == "cpu" else None
    if cpu_peak is not None and not cpu_peak.ok:
        print("note: peak memory needs Linux /proc/self/clear_refs; reported as n/a")
    for r in results:
        measure_memory(r, args.device, dtype, cpu_peak)
        print_case(r, args.dtype, machine)
    if args.json:
        write_json(args.json, {"benchmark": "magnitude", "machine": machine, "dtype": args.dtype,
                               "prune_fraction": PRUNE_FRACTION, "results": results})


if __name__ == "__main__":
    main()
