"""Taylor-prunes a torchvision ResNet to fractions of its MACs with
pyprune_ext's own TaylorPruner and times the dense and pruned models: the
speed-up users get from structure.

    python tools/gpu_check_resnet.py --json FILE [--device cuda] [--model resnet50] [--keep 0.5,0.3]
        [--batches 1,64,256] [--dtypes fp32,bf16_channels_last] [--image 224]

Random weights and random data are enough: the gradients only rank the channels,
and the latency of a pruned architecture does not depend on its values. The
ranking is local (every channel group loses the same share per step): on an
untrained network a global ranking has nothing meaningful to compare across
layers and drains the last stage to its minimum width (seen on ResNet-18:
6% of the parameters left at 50% of the MACs), an architecture no user gets. On CUDA
each latency is the median of CUDA-event timings of single forward passes after
a warm-up, under torch.inference_mode; on the CPU a wall-clock timer.
The scripts/gpu_check.sh driver runs this in a subprocess with a timeout.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {
    # name -> (dtype, memory format)
    "fp32": (torch.float32, torch.contiguous_format),
    "bf16_channels_last": (torch.bfloat16, torch.channels_last),
}
# Channels removed per pruning step: about this share of what reaching the target
# takes, so a target is reached in a handful of steps (MACs of a conv scale with
# in x out channels, so keeping a fraction k of MACs removes about 1 - sqrt(k)).
STEPS = 12


def build_model(name: str, device: str, seed: int) -> torch.nn.Module:
    import torchvision
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).to(device)


def prune_to_macs(name: str, keep: float, *, image: int, batch: int, device: str, seed: int = 0):
    """(pruned model, facts): a fresh `name` Taylor-pruned (fo_bn, round_to=8) until
    `keep` of its MACs are left, then finalized (channels removed)."""
    from pyprune_ext.graph import dependency_groups
    from pyprune_ext.taylor import Target, TaylorPruner

    model = build_model(name, device, seed)
    example = torch.randn(1, 3, image, image, device=device)
    groups = dependency_groups(model, (example,))
    prunable = sum(g.size for g in groups if g.prunable)
    per_step = max(8, math.ceil((1 - math.sqrt(keep)) * prunable / STEPS))
    started = time.perf_counter()
    pruner = TaylorPruner(model, example, "fo_bn", target=Target.flops(keep), every=1, round_to=8,
                          scope="local", prune_per_step=per_step, groups=groups)
    gen = torch.Generator(device=device).manual_seed(seed)
    minibatches = 0
    model.train()
    while not pruner.done and minibatches < 4 * STEPS:
        x = torch.randn(batch, 3, image, image, device=device, generator=gen)
        y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        pruner.step()
        minibatches += 1
    pruned = pruner.finalize().eval()
    report = pruner.report()
    facts = {"target_macs_kept": keep, "macs_kept": report.flops_kept,
             "params_kept": report.params_after / max(report.params_before, 1),
             "macs_before": report.macs_before, "macs_after": report.macs_after,
             "params_before": report.params_before, "params_after": report.params_after,
             "steps": len(pruner.history), "minibatches": minibatches, "reached": bool(pruner.done),
             "prune_per_step": per_step, "seconds": time.perf_counter() - started}
    return pruned, facts


def median_latency_ms(model, batch: int, image: int, dtype_name: str, device: str,
                      warmup: int, repeats: int) -> float:
    """Median ms of one forward pass of a copy of `model` in dtype_name's dtype and layout."""
    dtype, memory_format = DTYPES[dtype_name]
    model = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=memory_format).eval()
    x = torch.randn(batch, 3, image, image, device=device).to(dtype=dtype, memory_format=memory_format)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
            pairs = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                pairs.append((start, end))
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in pairs]
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def latency_table(models: dict, batches, dtypes, image, device, warmup, repeats) -> list:
    """One row per (model, dtype, batch): median ms and the speed-up over dense."""
    rows = []
    for dtype_name in dtypes:
        for batch in batches:
            dense_ms = None
            for label, model in models.items():
                ms = median_latency_ms(model, batch, image, dtype_name, device, warmup, repeats)
                dense_ms = ms if label == "dense" else dense_ms
                rows.append({"model": label, "dtype": dtype_name, "batch": batch, "ms": round(ms, 4),
                             "speedup_vs_dense": round(dense_ms / ms, 3) if dense_ms else None})
                print(f"  {label} {dtype_name} batch {batch}: {ms:.3f} ms", flush=True)
    return rows


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        # the pruned widths (multiples of 8) are new shapes: let cuDNN pick its algorithms
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    models = {"dense": build_model(args.model, args.device, args.seed).eval()}
    pruning = []
    for keep in args.keep:
        model, facts = prune_to_macs(args.model, keep, image=args.image, batch=args.prune_batch,
                                     device=args.device, seed=args.seed)
        models[f"macs{round(100 * keep)}"] = model
        pruning.append(facts)
        print(f"  pruned to {100 * facts['macs_kept']:.1f}% MACs in {facts['steps']} steps "
              f"({facts['seconds']:.1f} s)", flush=True)
    latency = latency_table(models, args.batches, args.dtypes, args.image, args.device, args.warmup, args.repeats)
    return {
        "model": args.model, "weights": "random", "image": args.image, "device": args.device,
        "timer": "CUDA events" if args.device == "cuda" else "time.perf_counter",
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
                     "mode": "torch.inference_mode, eval", "criterion": "fo_bn", "scope": "local", "round_to": 8,
                     "prune_batch": args.prune_batch,
                     "cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "threads": torch.get_num_threads()},
        "pruning": pruning, "latency": latency, "seconds": round(time.perf_counter() - started, 2),
    }


def csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, metavar="FILE", help="where to write the results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--keep", type=csv(float), default=[0.5, 0.3], help="MACs fractions to keep (default 0.5,0.3)")
    p.add_argument("--batches", type=csv(int), default=[1, 64, 256])
    p.add_argument("--dtypes", type=csv(str), default=list(DTYPES))
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--prune-batch", type=int, default=32, help="minibatch of random data per pruning step")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    unknown = set(args.dtypes) - set(DTYPES)
    if unknown:
        p.error(f"unknown dtypes {sorted(unknown)}; choose from {', '.join(DTYPES)}")
    if any(not 0 < k < 1 for k in args.keep):
        p.error("--keep fractions must be strictly between 0 and 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU")
    from pyprune_ext.lottery.io import atomic_write_json

    atomic_write_json(args.json, run(args))


if __name__ == "__main__":
    main()
