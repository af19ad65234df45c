"""``pyprune lottery``: iterative magnitude pruning with rewinding (winning
tickets), then the controls on the same masks, with a summary per level; rerun
the same command to resume.

Output folder::

    ticket/              the ticket run (a pyprune_ext.lottery run directory: config.json,
                         level_NN/{mask.pt, rewind.pt, final.pt, metrics.json, done}, summary.csv)
    reinit/, random/     the controls asked for with --control (same layout, levels 1..N)
    summary.csv          one row per variant and level: remaining %, early-stop iteration,
                         accuracies, time
    summary.json         the same rows, plus the options
    accuracy_vs_remaining.png, early_stop_vs_remaining.png
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List

import torch

from ..lottery import LotteryConfig, LotteryRun, classification_evaluator, classification_step
from ..lottery.io import atomic_write_json
from ..lottery.training import NonFiniteLossError
from ..nn import unmask_model
from . import plots
from .common import (Console, UsageError, check_model_runs, format_table, is_writer, load_splits, model_factory,
                     model_label, output_dir, percent, resolve_device, set_threads, write_csv)
from .export import export_model

CONTROL_CHOICES = ("reinit", "random")


def parse_controls(text: str) -> List[str]:
    """``"reinit,random"`` -> ``["reinit", "random"]``; ``"none"`` -> ``[]``."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in CONTROL_CHOICES]
    if unknown or not names:
        raise UsageError(f"--control takes a comma-separated list of {', '.join(CONTROL_CHOICES)}, or none; "
                         f"got {text!r}")
    return list(dict.fromkeys(names))


def _config(args, device: torch.device, control: str, ticket_dir: Path) -> LotteryConfig:
    training = {"iterations": args.iterations} if args.iterations is not None else {"epochs": args.epochs}
    try:
        return LotteryConfig(
            levels=args.levels, rate=args.rate, output_rate=args.output_rate, scope=args.scope,
            pattern=args.pattern, pattern_incompatible=args.pattern_incompatible,
            rewind_iteration=args.rewind, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            eval_every=args.eval_every, seed=args.seed, device=str(device), control=control,
            control_source=None if control == "none" else str(ticket_dir), **training)
    except ValueError as err:
        raise UsageError(str(err).replace("LotteryConfig: ", "")) from None


def _levels_text(args) -> str:
    unstructured = f"{100 * args.rate:g}% ({args.scope})"
    if not args.pattern:
        return f"{args.levels} levels of {unstructured}"
    later = f", then {args.levels - 1} of {unstructured}" if args.levels > 1 else ""
    return f"{args.levels} levels: {args.pattern}{later}"


def _check_export_options(args) -> None:
    """What --export-level asks for is known before any training."""
    if args.export_level is None:
        return
    if not args.export:
        raise UsageError(f"--export-level {args.export_level} needs --export FILE (where to save the ticket)")
    if args.export_level > args.levels:
        raise UsageError(f"--export-level {args.export_level}: the ticket run has levels 0..{args.levels} "
                         f"(--levels {args.levels})")


@contextmanager
def _run_errors(out: Path):
    """What the lottery runs raise about their folders and their training, as one
    line each: a damaged or missing run file (RunFileError, a ValueError, naming the
    file), a folder holding another run, a diverged training."""
    try:
        yield
    except NonFiniteLossError as err:
        raise UsageError(f"{err} (--lr; use another --out: {out} keeps the settings it was started with)") from None
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def _runs(args, controls: List[str], device, splits, build, out: Path, console: Console) -> Dict[str, LotteryRun]:
    evaluate = classification_evaluator({"val": splits.val, "test": splits.test})
    runs = {}
    for variant in ["ticket"] + controls:
        control = "none" if variant == "ticket" else variant
        runs[variant] = LotteryRun(build, classification_step, evaluate,
                                   _config(args, device, control, out / "ticket"), out / variant,
                                   train_data=splits.train, progress=console.progress)
    return runs


def _run_all(runs: Dict[str, LotteryRun], console: Console) -> Dict[str, List[Dict[str, Any]]]:
    from tqdm.auto import tqdm
    # In a --nproc run LotteryRun trains under DDP by itself (rank 0 writes and shows progress).
    total = sum(len(run.levels) for run in runs.values())
    results = {}
    with tqdm(total=total, desc="levels", unit="level", disable=not console.progress, dynamic_ncols=True) as bar:
        for variant, run in runs.items():
            run.run(on_level=lambda metrics: bar.update(1))
            results[variant] = run.summary()
    return results


def _rows(results: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    rows = []
    for variant, levels in results.items():
        for row in levels:
            rows.append({"variant": variant, **{k: v for k, v in row.items() if not k.startswith("remaining_pct[")}})
    return rows


def _summary_table(results: Dict[str, List[Dict[str, Any]]]) -> str:
    variants = list(results)
    by_level = {v: {r["level"]: r for r in rows} for v, rows in results.items()}
    headers = ["level", "remaining"] + [f"{v} acc (stop it)" for v in variants] + ["ticket time"]
    table = []
    for level, ticket in sorted(by_level["ticket"].items()):
        row = [str(level), f"{ticket['remaining_pct']:.1f}%"]
        for v in variants:
            r = by_level[v].get(level)
            row.append("-" if r is None else
                       f"{percent(r['early_stop_test_accuracy'], 2)} ({r['early_stop_iteration']})")
        row.append(f"{ticket['wall_time_s']:.1f} s")
        table.append(row)
    return ("test accuracy at the early-stop iteration (minimum validation loss), by level\n"
            + format_table(headers, table))


def _export(args, run: LotteryRun, example, console: Console) -> Dict[str, Any]:
    level = run.levels[-1] if args.export_level is None else args.export_level
    if level not in run.levels:
        raise UsageError(f"--export-level {level}: the ticket run has levels {run.levels[0]}..{run.levels[-1]}")
    model = unmask_model(run.final_model(level))
    info = export_model(model, example, Path(args.export).expanduser())
    info["level"] = level
    console.note(f"exported the level-{level} ticket to {args.export} (load with {info['load_with']})")
    return info


def run(args, console: Console) -> Dict[str, Any]:
    _check_export_options(args)
    set_threads(args.threads)
    device = resolve_device(args.device)
    controls = parse_controls(args.control)
    splits = load_splits(args.dataset, args.data_dir, args.seed)
    build = model_factory(args, splits)
    example = splits.train.tensors[0][:2]
    check_model_runs(build(), example, splits.num_classes)
    out = output_dir(args, "lottery")
    console.out_dir = out
    with _run_errors(out):
        return _run_and_report(args, controls, device, splits, build, example, out, console)


def _run_and_report(args, controls, device, splits, build, example, out: Path, console: Console) -> Dict[str, Any]:
    runs = _runs(args, controls, device, splits, build, out, console)
    ticket = runs["ticket"]
    console.note(f"lottery: {model_label(args)} on {splits.name} {splits.sizes()} train/val/test, "
                 f"{_levels_text(args)}, rewind to iteration {args.rewind}, "
                 f"{ticket.total_iterations} iterations per level, output in {out}")
    results = _run_all(runs, console)
    if not is_writer():  # the other ranks of a --nproc run: rank 0 reports
        return {}
    rows = _rows(results)
    write_csv(out / "summary.csv", rows)
    plots.lottery_curves(results, "early_stop_test_accuracy", "test accuracy at early stop (%)",
                         "Lottery tickets vs controls", out / "accuracy_vs_remaining.png")
    plots.lottery_curves(results, "early_stop_iteration", "early-stop iteration",
                         "Early-stop iteration (minimum validation loss)", out / "early_stop_vs_remaining.png")
    payload: Dict[str, Any] = {"command": "lottery", "model": model_label(args), "dataset": splits.name,
                               "iterations_per_level": ticket.total_iterations, "levels": rows,
                               "options": vars(args)}
    if args.export:
        payload["export"] = _export(args, ticket, example, console)
    atomic_write_json(out / "summary.json", payload)
    console.result(_summary_table(results) + f"\n\nresults in {out} (rerun the same command to resume or extend "
                   "with more --levels)")
    console.emit_json(payload)
    return payload
