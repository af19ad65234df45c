"""Lottery-ticket reproduction: LeNet-300-100 winning tickets against random
re-initialisation and random pruning, level by level (Frankle & Carbin 2019, Fig. 3/4).

    python -m benchmarks.lottery [--dataset fashion-mnist|digits] [--levels 10] [--seeds 2]
                                 [--iterations 50000] [--eval-every 500] [--out DIR]
                                 [--threads N] [--json FILE] [--quick] [--steps-only]

Setup (the paper's LeNet recipe): Gaussian Glorot initialisation, Adam 1.2e-3,
batch 60, per-layer pruning of 20% of the remaining weights per level (output
layer 10%), rewinding to the initialisation; 5000 training images held out for
validation; early-stopping iteration = minimum validation loss. Controls on the
ticket masks of each level: random re-initialisation (same mask, new init) and
random pruning (per-layer counts kept, original init).

Prints: a table per level of remaining %, early-stop iteration and test accuracy
at early stop (mean over seeds, and the spread) for ticket / reinit / random; the
time per level; and the training-step time of LeNet-300-100 with pyprune_ext.nn
masked modules against the torch.nn.utils.prune way (and plain dense layers) at
the masks of this run. Runs live in --out (default: a temporary folder) and
resume: rerunning the same command continues where it stopped.

--quick: digits, 2 levels, 2 seeds, 100 iterations (a smoke test, not a result).
--steps-only: only the training-step timings, on random masks at the paper's
per-layer densities of levels 0, levels/2 and levels (seconds, no training).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.nn.utils import prune

from pyprune_ext.bench.common import machine_name, median_seconds, print_table, write_json
from pyprune_ext.data import load_dataset
from pyprune_ext.optim import build_optimizer
from pyprune_ext.lottery import (LotteryConfig, LotteryRun, MaskSet, classification_evaluator,
                                 classification_step)
from pyprune_ext.models import lenet300

VARIANTS = ("ticket", "reinit", "random")


# --------------------------------------------------------------------------- runs

def config_for(args, seed: int, variant: str, ticket_dir: Path) -> LotteryConfig:
    """The paper's LeNet recipe; controls read the ticket run of the same seed."""
    control = {"ticket": "none", "reinit": "reinit", "random": "random"}[variant]
    return LotteryConfig(
        levels=args.levels, rate=0.2, output_rate=0.1, scope="layer", rewind_iteration=0,
        iterations=args.iterations, batch_size=60, optimizer="adam", lr=1.2e-3,
        eval_every=args.eval_every, seed=seed, device=args.device, control=control,
        control_source=None if control == "none" else str(ticket_dir), control_scope="layer")


def run_all(args, splits, out: Path) -> Dict[str, Dict[int, List[dict]]]:
    """Runs (or resumes) every seed's ticket run, then its controls.
    Returns ``variant -> seed -> per-level metrics``."""
    in_features = 1
    for size in splits.input_shape:
        in_features *= size
    evaluate = classification_evaluator({"val": splits.val, "test": splits.test})
    results: Dict[str, Dict[int, List[dict]]] = {v: {} for v in VARIANTS}
    for seed in range(args.seeds):
        ticket_dir = out / f"seed{seed}" / "ticket"
        for variant in VARIANTS:
            run_dir = out / f"seed{seed}" / variant
            run = LotteryRun(lambda: lenet300(in_features, splits.num_classes), classification_step, evaluate,
                             config_for(args, seed, variant, ticket_dir), run_dir, train_data=splits.train,
                             progress=not args.no_progress)
            results[variant][seed] = run.run()
    return results


# -------------------------------------------------------------------------- tables

def mean_spread(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def _by_level(per_seed: Dict[int, List[dict]]) -> Dict[int, List[dict]]:
    levels: Dict[int, List[dict]] = {}
    for metrics in per_seed.values():
        for m in metrics:
            levels.setdefault(m["level"], []).append(m)
    return levels


def ticket_table(results) -> List[dict]:
    """Rows per level: remaining %, then early-stop iteration and test accuracy
    at early stop for each variant (lists over seeds)."""
    by_variant = {v: _by_level(results[v]) for v in VARIANTS}
    rows = []
    for level, tickets in sorted(by_variant["ticket"].items()):
        row = {"level": level, "remaining_pct": 100 * tickets[0]["remaining"]}
        for variant in VARIANTS:
            runs = by_variant[variant].get(level, [])
            row[f"{variant}_early_stop_iteration"] = [m["early_stop"]["iteration"] for m in runs]
            row[f"{variant}_test_accuracy"] = [100 * m["early_stop"]["test_accuracy"] for m in runs]
            row[f"{variant}_wall_time_s"] = [m["wall_time_s"] for m in runs]
            row[f"{variant}_step_time_ms"] = [m["step_time_ms"] for m in runs]
        rows.append(row)
    return rows


def print_tables(rows: List[dict], title: str) -> None:
    headers = ["level", "remaining %"]
    for variant in VARIANTS:
        headers += [f"{variant} early-stop it.", f"{variant} test acc. % at early stop"]
    print_table(title, headers, [
        [str(r["level"]), f"{r['remaining_pct']:.1f}"]
        + sum(([mean_spread(r[f"{v}_early_stop_iteration"]), mean_spread(r[f"{v}_test_accuracy"])]
               for v in VARIANTS), [])
        for r in rows])
    headers = ["level", "remaining %"] + [f"{v} s/level" for v in VARIANTS] + [f"{v} ms/step" for v in VARIANTS]
    print_table("Time per level (mean over seeds; training, evaluations, pruning and saving)", headers, [
        [str(r["level"]), f"{r['remaining_pct']:.1f}"]
        + [mean_spread(r[f"{v}_wall_time_s"]) for v in VARIANTS]
        + [mean_spread(r[f"{v}_step_time_ms"]) for v in VARIANTS]
        for r in rows])


# ---------------------------------------------------------------- masked step time

def lenet_masks(run_masks: MaskSet, seed: int = 0) -> MaskSet:
    """Masks for the 784-input LeNet-300-100: the run's own when they fit, else
    random masks with the run's per-layer kept fractions."""
    ones = MaskSet.ones(lenet300(784, 10))
    if all(run_masks[n].shape == m.shape for n, m in ones.items()):
        return run_masks
    return random_lenet_masks(run_masks.remaining().per_layer, seed)


def random_lenet_masks(fractions: Dict[str, float], seed: int = 0) -> MaskSet:
    """Random masks for the 784-input LeNet-300-100 keeping `fractions[layer]` of each layer."""
    g = torch.Generator().manual_seed(seed)
    shaped = {}
    for name, mask in MaskSet.ones(lenet300(784, 10)).items():
        kept = round(fractions[name] * mask.numel())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=g)[:kept]] = True
        shaped[name] = flat.view(mask.shape)
    return MaskSet(shaped)


def paper_masks(level: int, seed: int = 0) -> MaskSet:
    """Random masks at the paper's per-layer densities after `level` levels:
    0.8^level for the hidden layers, 0.9^level for the output layer."""
    names = MaskSet.ones(lenet300(784, 10)).keys()
    return random_lenet_masks({n: (0.9 if n == "fc3.weight" else 0.8) ** level for n in names}, seed)


def _step_fn(model, device):
    x = torch.randn(60, 784, device=device)
    y = torch.randint(0, 10, (60,), device=device)
    # as pyprune lottery builds it (fused Adam where torch has the kernel)
    optimizer = build_optimizer(torch.optim.Adam, model.parameters(), lr=1.2e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def step_times(masks: MaskSet, device: str, min_run_time: float) -> Dict[str, float]:
    """Median ms of one training step (forward, backward, Adam) at batch 60."""
    torch.manual_seed(0)
    dense = lenet300(784, 10).to(device)
    masked = masks.apply(lenet300(784, 10).to(device))
    pruned = lenet300(784, 10).to(device)
    for name, mask in masks.items():
        prune.custom_from_mask(pruned.get_submodule(name.rpartition(".")[0]), "weight", mask.to(device))
    return {label: 1e3 * median_seconds(_step_fn(model, device), device, min_run_time)
            for label, model in (("dense", dense), ("masked", masked), ("prune", pruned))}


def step_time_rows(results, args) -> List[dict]:
    """Step times at the masks of seed 0's ticket levels: dense, middle, sparsest."""
    gc.collect()  # drop the runs' models: the masked modules' step hook visits every live one
    out = Path(args.out_dir)
    levels = sorted({m["level"] for m in results["ticket"][0]})
    chosen = sorted({levels[0], levels[len(levels) // 2], levels[-1]})
    rows = []
    for level in chosen:
        run_masks = MaskSet.load(out / "seed0" / "ticket" / f"level_{level:02d}" / "mask.pt")
        masks = lenet_masks(run_masks)
        times = step_times(masks, args.device, 0.2 if args.quick else 1.0)
        rows.append({"level": level, "remaining_pct": 100 * masks.remaining().total,
                     "own_masks": masks is run_masks, **{f"{k}_ms": v for k, v in times.items()}})
    return rows


def steps_only_rows(args) -> List[dict]:
    """Step times at random paper-density masks of levels 0, levels/2 and levels."""
    rows = []
    for level in sorted({0, args.levels // 2, args.levels}):
        masks = paper_masks(level)
        times = step_times(masks, args.device, 0.2 if args.quick else 2.0)
        rows.append({"level": level, "remaining_pct": 100 * masks.remaining().total, "own_masks": False,
                     "masks": "random, the paper's per-layer density", **{f"{k}_ms": v for k, v in times.items()}})
    return rows


def print_step_times(rows: List[dict], machine: str) -> None:
    print_table(f"LeNet-300-100 training step (batch 60, forward + backward + Adam), median ms, {machine}",
                ["level", "remaining %", "masks", "dense nn.Linear (no mask)", "pyprune masked modules",
                 "torch.nn.utils.prune", "masked speed-up over prune"],
                [[str(r["level"]), f"{r['remaining_pct']:.1f}", r.get("masks") or ("this run's" if r["own_masks"] else
                  "random, this run's per-layer density"), f"{r['dense_ms']:.3f}", f"{r['masked_ms']:.3f}",
                  f"{r['prune_ms']:.3f}", f"{r['prune_ms'] / r['masked_ms']:.2f}x"] for r in rows])


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=None, choices=["fashion-mnist", "digits", "mnist"],
                        help="default fashion-mnist (digits with --quick)")
    parser.add_argument("--levels", type=int, default=None, help="pruning levels after the dense one (default 10)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1 (default 2)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training iterations per level (default 50000, the paper's)")
    parser.add_argument("--eval-every", type=int, default=None, help="iterations between evaluations (default 500)")
    parser.add_argument("--out", default=None, help="run folder (kept; rerun to resume); default: temporary")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--quick", action="store_true", help="digits, 2 levels, 2 seeds, 100 iterations")
    parser.add_argument("--steps-only", action="store_true",
                        help="only the training-step timings, on random masks at the paper's per-layer "
                             "densities of levels 0, levels/2 and levels (no training runs)")
    args = parser.parse_args(argv)
    quick = dict(dataset="digits", levels=2, seeds=2, iterations=100, eval_every=20)
    full = dict(dataset="fashion-mnist", levels=10, seeds=2, iterations=50000, eval_every=500)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.levels < 1:
        parser.error("--seeds and --levels must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_name(args.device)
    if args.steps_only:
        steps = steps_only_rows(args)
        print_step_times(steps, machine)
        if args.json:
            write_json(args.json, {"benchmark": "lottery-steps", "machine": machine, "step_times": steps})
        return
    splits = load_dataset(args.dataset)
    with tempfile.TemporaryDirectory(prefix="lottery-") as tmp:
        args.out_dir = args.out or tmp
        print(f"LeNet-300-100 lottery tickets on {args.dataset} {splits.sizes()}: {args.levels} levels, "
              f"{args.seeds} seeds, {args.iterations} iterations/level, eval every {args.eval_every}; "
              f"runs in {args.out_dir}; {machine}", flush=True)
        started = time.perf_counter()
        results = run_all(args, splits, Path(args.out_dir))
        total = time.perf_counter() - started
        rows = ticket_table(results)
        print_tables(rows, f"LeNet-300-100 on {args.dataset}: winning tickets vs random re-init vs random "
                     f"pruning (mean ± std over {args.seeds} seeds; test accuracy at the early-stop iteration)")
        steps = step_time_rows(results, args)
        print_step_times(steps, machine)
        print(f"\nwall time of the runs (this invocation): {total:.1f} s")
        if args.json:
            write_json(args.json, {"benchmark": "lottery", "machine": machine, "settings": {
                k: getattr(args, k) for k in ("dataset", "levels", "seeds", "iterations", "eval_every", "device")},
                "levels": rows, "step_times": steps, "wall_time_s": total})


if __name__ == "__main__":
    main()
