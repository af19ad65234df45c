"""``pyprune taylor``: train (or load) a model, prune its channels with Taylor
importance to a target while training, fine-tune, remove the channels, evaluate,
write the report and plots, optionally export.

Output folder::

    config.json          the options of the run
    dense.pt, dense.json the trained dense model and what trained it (reused by a
                         rerun with the same training settings)
    pruned_state.pt      state_dict of the pruned model
    plan.json            channels kept per group: pyprune_ext.taylor.apply_plan rebuilds
                         the pruned architecture from a fresh model to load the state_dict
    metrics.json         everything below, plus the options
    summary.csv          dense vs pruned: accuracy, parameters, MACs, latency
    steps.csv            one row per pruning step (FLOPs/params kept, validation accuracy)
    layers.csv           per layer: channels, parameters, MACs before and after
    accuracy_vs_flops.png, channels_per_layer.png
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List

import torch

from ..lottery import classification_evaluator
from ..lottery.io import atomic_write_json, load_json, load_tensors, save_tensors
from ..taylor import Target, TaylorPruner
from . import plots
from .common import (Console, UsageError, check_model_runs, format_table, is_writer, load_splits, model_factory,
                     model_label, output_dir, percent, resolve_device, set_threads, write_csv)
from .export import export_model
from .training import ddp, evaluate, inference_ms, make_optimizer, train_loader, train_steps

# Options that shape the dense model: a rerun with the same ones reuses dense.pt.
_DENSE_KEYS = ("dataset", "data_dir", "model", "model_file", "seed", "epochs", "iterations", "batch_size",
               "lr", "optimizer")


# What train_steps returns and dense.json keeps of the dense training.
_TRAINING_KEYS = ("steps", "mean_loss", "seconds")


def _target(args) -> Target:
    if args.channels is not None:
        return Target.channels(args.channels)
    if args.target_params is not None:
        return Target.params(args.target_params)
    return Target.flops(args.target_flops if args.target_flops is not None else 0.5)


def _dense_settings(args) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in _DENSE_KEYS}


def _pretrain_steps(args, batches_per_epoch: int) -> int:
    if args.iterations is not None:
        return args.iterations
    return round(args.epochs * batches_per_epoch)


def _dense_record(path: Path):
    """dense.json's content, or None when it is damaged (not UTF-8 JSON, not an
    object with the settings and the training statistics). It is a cache, like
    dense.pt: a damaged one is rebuilt by training again, never an error that
    blocks every rerun."""
    try:
        saved = load_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return None
    training = saved.get("training")
    if not isinstance(training, dict) or not all(isinstance(training.get(k), (int, float)) for k in _TRAINING_KEYS):
        return None
    return saved


def _dense_model(args, model, trainable, train, device, out: Path, console: Console) -> Dict[str, Any]:
    """Loads --load, reuses the folder's dense.pt, or trains; returns what happened."""
    if args.load:
        try:
            model.load_state_dict(load_tensors(args.load, map_location=device))
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            raise UsageError(f"--load {args.load}: {err}") from None
        console.note(f"loaded the dense model from {args.load}")
        return {"source": str(args.load), "seconds": 0.0, "steps": 0}
    settings = _dense_settings(args)
    if (out / "dense.pt").is_file() and (out / "dense.json").is_file():
        saved = _dense_record(out / "dense.json")
        if saved is None:
            console.note(f"{out / 'dense.json'} is damaged: training again")
        elif saved["settings"] == settings:
            try:
                model.load_state_dict(load_tensors(out / "dense.pt", map_location=device))
                console.note(f"reusing the dense model trained earlier: {out / 'dense.pt'}")
                return {**saved["training"], "source": "reused"}
            except (ValueError, RuntimeError):
                console.note(f"{out / 'dense.pt'} does not fit this model: training again")
    steps = _pretrain_steps(args, len(train))
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    training = train_steps(trainable, train, optimizer, device, steps, desc="training (dense)",
                           progress=console.progress)
    if is_writer():
        save_tensors({k: v.cpu() for k, v in model.state_dict().items()}, out / "dense.pt")
        atomic_write_json(out / "dense.json", {"settings": settings, "training": training})
    return {**training, "source": "trained"}


def _prune(args, model, trainable, pruner, train, device, evaluator, console: Console):
    """Trains with the pruner until it reaches its target; returns the accuracy
    curve (validation accuracy after each pruning step), the training statistics
    and the optimizer."""
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    curve: List[Dict[str, Any]] = []

    def after_backward():
        step = pruner.step()
        if step is not None:
            val = evaluate(evaluator, model, "val")
            curve.append({"step": step.step, "minibatch": step.minibatch, "channels_removed": step.channels_removed,
                          "flops_kept": step.flops_kept, "params_kept": step.params_kept,
                          "val_accuracy": val["accuracy"], "val_loss": val["loss"]})
        if pruner.history:
            last = pruner.history[-1]
            return (f"step {last.step}, FLOPs kept {100 * last.flops_kept:.1f}%, "
                    f"val acc {100 * curve[-1]['val_accuracy']:.1f}%")
        return None

    # An upper bound for the bar: every pruning step removes at least one channel.
    bound = args.every * (sum(pruner.groups[i].size for i in pruner.prunable) + 1)
    stats = train_steps(trainable, train, optimizer, device, bound, desc="pruning",
                        progress=console.progress, after_backward=after_backward, stop=lambda: pruner.done,
                        bar_total=False)
    console.note(f"pruned in {len(pruner.history)} steps over {stats['steps']} minibatches "
                 f"({stats['seconds']:.1f} s)")
    return curve, stats, optimizer


def _layer_rows(report) -> List[Dict[str, Any]]:
    return [dataclasses.asdict(layer) for layer in report.layers]


def _summary_table(m: Dict[str, Any]) -> str:
    d, p = m["dense"], m["pruned"]
    speed = d["latency_ms"] / p["latency_ms"] if p["latency_ms"] else float("nan")
    rows = [
        ("test accuracy", percent(d["test_accuracy"], 2), percent(p["test_accuracy"], 2),
         f"{100 * (p['test_accuracy'] - d['test_accuracy']):+.2f} pt"),
        ("parameters", f"{d['params']:,}", f"{p['params']:,}", f"{percent(m['params_kept'])} kept"),
        ("MACs / example", f"{d['macs']:,}", f"{p['macs']:,}", f"{percent(m['flops_kept'])} kept"),
        (f"latency, batch {m['latency_batch']}", f"{d['latency_ms']:.2f} ms", f"{p['latency_ms']:.2f} ms",
         f"{speed:.2f}x faster"),
    ]
    t = m["times_s"]
    return (format_table(("", "dense", "pruned", "change"), rows)
            + f"\n\ntime: training {t['train']:.1f} s, pruning {t['prune']:.1f} s ({m['pruning_steps']} steps), "
              f"fine-tuning {t['finetune']:.1f} s")


def run(args, console: Console) -> Dict[str, Any]:
    set_threads(args.threads)
    device = resolve_device(args.device)
    target = _target(args)
    torch.manual_seed(args.seed)
    splits = load_splits(args.dataset, args.data_dir, args.seed)
    build = model_factory(args, splits)
    out = output_dir(args, "taylor")
    console.out_dir = out
    if is_writer():
        atomic_write_json(out / "config.json", vars(args))
    train = train_loader(splits.train, args.batch_size, args.seed)
    evaluator = classification_evaluator({"val": splits.val, "test": splits.test})
    example = splits.train.tensors[0][:2]
    model = build()
    check_model_runs(model, example, splits.num_classes)
    model.to(device)
    trainable = ddp(model, device)  # the model itself in a single process
    console.note(f"taylor: {model_label(args)} on {splits.name} {splits.sizes()} train/val/test, "
                 f"target {target.kind} {target.value}, criterion {args.criterion}, output in {out}")

    dense_training = _dense_model(args, model, trainable, train, device, out, console)
    dense_eval = evaluate(evaluator, model, "test")
    dense_model = copy.deepcopy(model) if is_writer() else None
    console.note(f"dense test accuracy {percent(dense_eval['accuracy'], 2)}")

    try:
        pruner = TaylorPruner(trainable, example.to(device), args.criterion, target=target, every=args.every,
                              prune_per_step=args.prune_per_step, scope=args.scope, round_to=args.round_to,
                              normalize=False if args.normalize == "none" else args.normalize)
    except ValueError as err:
        raise UsageError(f"cannot prune this model: {err}") from None
    # A data order of its own for pruning and fine-tuning, so that they go the same
    # way whether the dense model was trained just now or reused from dense.pt.
    train = train_loader(splits.train, args.batch_size, args.seed + 1)
    curve, prune_stats, optimizer = _prune(args, model, trainable, pruner, train, device, evaluator, console)
    finetune = train_steps(trainable, train, optimizer, device, args.finetune_epochs * len(train),
                           desc="fine-tuning", progress=console.progress)
    pruned = pruner.finalize()
    if not is_writer():  # the other ranks of a --nproc run: rank 0 reports
        return {}
    pruned_eval = evaluate(evaluator, pruned, "test")
    report = pruner.report()

    latency_inputs = splits.test.tensors[0][:args.batch_size].to(device)
    dense_ms, pruned_ms = inference_ms([dense_model, pruned], latency_inputs)
    metrics: Dict[str, Any] = {
        "command": "taylor", "model": model_label(args), "dataset": splits.name, "criterion": args.criterion,
        "target": {"kind": target.kind, "value": target.value},
        "flops_kept": report.flops_kept, "params_kept": report.params_kept,
        "pruning_steps": len(pruner.history), "latency_batch": len(latency_inputs),
        "dense": {"test_accuracy": dense_eval["accuracy"], "test_loss": dense_eval["loss"],
                  "params": report.params_before, "macs": report.macs_before,
                  "latency_ms": dense_ms},
        "pruned": {"test_accuracy": pruned_eval["accuracy"], "test_loss": pruned_eval["loss"],
                   "params": report.params_after, "macs": report.macs_after,
                   "latency_ms": pruned_ms},
        "times_s": {"train": dense_training["seconds"], "prune": prune_stats["seconds"],
                    "finetune": finetune["seconds"]},
        "dense_training": dense_training, "steps": curve, "layers": _layer_rows(report),
        "options": vars(args),
    }
    _write_outputs(out, metrics, pruner, pruned, example, args, console)
    console.result(report.format_table() + "\n\n" + _summary_table(metrics) + f"\n\nresults in {out}")
    console.emit_json(metrics)
    return metrics


def _write_outputs(out: Path, metrics, pruner, pruned, example, args, console: Console) -> None:
    save_tensors({k: v.cpu() for k, v in pruned.state_dict().items()}, out / "pruned_state.pt")
    atomic_write_json(out / "plan.json", pruner.plan())
    if args.export:
        metrics["export"] = export_model(pruned, example, Path(args.export).expanduser())
        console.note(f"exported the pruned model to {args.export} "
                     f"(load with {metrics['export']['load_with']})")
    write_csv(out / "steps.csv", metrics["steps"])
    write_csv(out / "layers.csv", metrics["layers"])
    write_csv(out / "summary.csv", [{"model": name, **{k: v for k, v in metrics[name].items()}}
                                    for name in ("dense", "pruned")])
    final = {"flops_kept": metrics["flops_kept"], "test_accuracy": metrics["pruned"]["test_accuracy"],
             "dense_test_accuracy": metrics["dense"]["test_accuracy"]}
    plots.taylor_accuracy_vs_flops(metrics["steps"], final, out / "accuracy_vs_flops.png")
    plots.taylor_channels_per_layer(metrics["layers"], out / "channels_per_layer.png")
    atomic_write_json(out / "metrics.json", json.loads(json.dumps(metrics, default=str)))
