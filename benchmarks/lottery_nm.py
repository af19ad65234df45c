"""2:4 lottery tickets against unstructured tickets and random 2:4 masks.

    python -m benchmarks.lottery_nm [--model lenet300|conv4|all] [--seeds 2] [--iterations 3000]
                                    [--rewind 0] [--out DIR] [--threads N] [--json FILE] [--quick]

For each model (LeNet-300-100 and Conv-4 on Fashion-MNIST) and seed, three runs
of iterative magnitude pruning with rewinding (``--rewind``: 0 = to the
initialisation), all with the same initialisation and data order:

* ``unstructured``: 20% of the remaining weights of every layer per level;
* ``2:4``: level 1 makes every layer 2:4 (50%; a layer whose input is not a
  multiple of 4, Conv-4's first convolution, stays dense), later levels prune 20%
  unstructured on top, which keeps the pattern;
* ``2:4 random``: random 2:4 masks with the 2:4 tickets' per-layer counts, on
  the same initialisation (the random-pruning control).

Compared at about 50%, 20% and 10% of the weights: unstructured levels 3, 7 and
10 (51.2%, 21.0%, 10.7%) and 2:4 levels 1, 5 and 8 (50%, 20.5%, 10.5%). Prints
the test accuracy at the early-stop iteration (minimum validation loss), mean
and spread over seeds. Runs live in --out and resume.

--quick: digits, LeNet only, 1 seed, 100 iterations (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.lottery import mean_spread
from pyprune_ext.bench.common import machine_name, print_table, write_json
from pyprune_ext.data import load_dataset
from pyprune_ext.lottery import LotteryConfig, LotteryRun, classification_evaluator, classification_step
from pyprune_ext.models import conv4, lenet300

RATE = 0.2
# variant -> (pattern, levels, levels compared at ~50 / ~20 / ~10% of the weights)
VARIANTS = {
    "unstructured": (None, 10, (3, 7, 10)),
    "2:4": ("2:4", 8, (1, 5, 8)),
    "2:4 random": ("2:4", 8, (1, 5, 8)),
}
TARGETS = ("~50%", "~20%", "~10%")
MODELS = {
    "lenet300": lambda shape, classes: lenet300(int(torch.tensor(shape).prod()), classes),
    "conv4": lambda shape, classes: conv4(tuple(shape), classes),
}


def levels_to_train(variant: str, max_levels: int) -> int:
    """The variant's last compared level within ``max_levels`` (no level is trained past it)."""
    _, levels, compared = VARIANTS[variant]
    within = [level for level in compared if level <= max_levels]
    return max(within) if within else min(levels, max_levels)


def config_for(args, seed: int, variant: str, source: Path) -> LotteryConfig:
    pattern = VARIANTS[variant][0]
    control = "random" if variant == "2:4 random" else "none"
    return LotteryConfig(levels=levels_to_train(variant, args.max_levels), rate=RATE, scope="layer", pattern=pattern,
                         rewind_iteration=args.rewind, iterations=args.iterations, batch_size=60,
                         optimizer="adam", lr=args.lr, eval_every=args.eval_every, seed=seed, device=args.device,
                         control=control, control_source=str(source) if control != "none" else None)


def run_model(name: str, args, splits, out: Path) -> Dict[str, Dict[int, List[dict]]]:
    """variant -> seed -> per-level metrics (runs resumed where they stopped)."""
    build = MODELS[name]
    evaluate = classification_evaluator({"val": splits.val, "test": splits.test})
    results: Dict[str, Dict[int, List[dict]]] = {v: {} for v in VARIANTS}
    for seed in range(args.seeds):
        for variant in VARIANTS:
            run_dir = out / name / f"seed{seed}" / variant.replace(" ", "_").replace(":", "to")
            source = out / name / f"seed{seed}" / "2to4"
            run = LotteryRun(lambda: build(splits.input_shape, splits.num_classes), classification_step, evaluate,
                             config_for(args, seed, variant, source), run_dir, train_data=splits.train,
                             progress=not args.no_progress)
            results[variant][seed] = run.run()
    return results


def comparison_rows(results) -> List[dict]:
    """One row per target density: per variant the level, its remaining % and the
    test accuracies (%) at early stop over seeds."""
    rows = []
    for k, target in enumerate(TARGETS):
        row = {"target": target}
        for variant, (_, _, compared) in VARIANTS.items():
            runs = [next((m for m in per_seed if m["level"] == compared[k]), None)
                    for per_seed in results[variant].values()]
            runs = [m for m in runs if m is not None]
            row[variant] = {"level": compared[k],
                            "remaining_pct": 100 * runs[0]["remaining"] if runs else None,
                            "test_accuracy": [100 * m["early_stop"]["test_accuracy"] for m in runs],
                            "early_stop_iteration": [m["early_stop"]["iteration"] for m in runs]}
        rows.append(row)
    dense = [100 * per_seed[0]["early_stop"]["test_accuracy"] for per_seed in results["unstructured"].values()]
    rows.insert(0, {"target": "dense", "dense_test_accuracy": dense})
    return rows


def print_rows(rows: List[dict], title: str) -> None:
    headers = ["weights left"] + sum(([f"{v} level (remaining %)", f"{v} test acc. %"] for v in VARIANTS), [])
    table = [[rows[0]["target"]] + ["0 (100.0)", mean_spread(rows[0]["dense_test_accuracy"])] * len(VARIANTS)]
    for row in rows[1:]:
        cells = [row["target"]]
        for variant in VARIANTS:
            r = row[variant]
            remaining = "—" if r["remaining_pct"] is None else f"{r['remaining_pct']:.1f}"
            cells += [f"{r['level']} ({remaining})", mean_spread(r["test_accuracy"])]
        table.append(cells)
    print_table(title, headers, table)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all", choices=[*MODELS, "all"])
    parser.add_argument("--dataset", default=None, choices=["fashion-mnist", "digits", "mnist"],
                        help="default fashion-mnist (digits with --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 2)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per level (default 3000)")
    parser.add_argument("--eval-every", type=int, default=None, help="iterations between evaluations (default 250)")
    parser.add_argument("--rewind", type=int, default=0, help="rewind iteration (default 0: the initialisation)")
    parser.add_argument("--lr", type=float, default=1.2e-3, help="Adam learning rate (default 1.2e-3)")
    parser.add_argument("--max-levels", type=int, default=10,
                        help="train no run past this level (each stops at its last compared level within it)")
    parser.add_argument("--out", default=None, help="run folder (kept; rerun to resume); default: temporary")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--quick", action="store_true", help="digits, LeNet, 1 seed, 100 iterations, 2 levels")
    args = parser.parse_args(argv)
    defaults = (dict(dataset="digits", seeds=1, iterations=100, eval_every=50) if args.quick
                else dict(dataset="fashion-mnist", seeds=2, iterations=3000, eval_every=250))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.model, args.max_levels = "lenet300", min(args.max_levels, 2)
    if args.seeds < 1 or args.iterations < 1 or args.max_levels < 1:
        parser.error("--seeds, --iterations and --max-levels must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_name(args.device)
    splits = load_dataset(args.dataset)
    names = list(MODELS) if args.model == "all" else [args.model]
    payload = {"benchmark": "lottery_nm", "machine": machine, "settings": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="lottery-nm-") as tmp:
        out = Path(args.out or tmp)
        for name in names:
            print(f"{name} on {args.dataset} {splits.sizes()}: {args.seeds} seeds, {args.iterations} iterations/level, "
                  f"rewind to {args.rewind}; runs in {out}; {machine}", flush=True)
            started = time.perf_counter()
            rows = comparison_rows(run_model(name, args, splits, out))
            seconds = time.perf_counter() - started
            print_rows(rows, f"{name} on {args.dataset}: 2:4 tickets vs unstructured tickets vs random 2:4 masks "
                             f"(test accuracy at early stop, mean ± std over {args.seeds} seeds; {seconds:.0f} s)")
            payload["models"][name] = {"rows": rows, "seconds": seconds}
    if args.json:
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
