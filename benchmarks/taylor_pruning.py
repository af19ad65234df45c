"""Taylor pruning end to end: estimator quality against the oracle, a pruning
run on real data, and the training-step overhead of the pruner's hooks.

    python -m benchmarks.taylor_pruning oracle     # Spearman / Pearson vs the oracle
    python -m benchmarks.taylor_pruning run        # train, prune, fine-tune, finalize
    python -m benchmarks.taylor_pruning overhead   # step time with / without hooks
    python -m benchmarks.taylor_pruning all --quick

Data: Fashion-MNIST from pyprune_ext.data (Debian's dataset-fashion-mnist by
default; --data-dir for another folder). Everything runs on the CPU unless
--device cuda. Each part prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from pyprune_ext import data, models
from pyprune_ext.bench.common import machine_name, median_seconds, print_table, write_json
from pyprune_ext.graph import dependency_groups, zero_channels
from pyprune_ext.taylor import CRITERIA, Target, TaylorImportance, TaylorPruner


def oracle_cnn() -> nn.Module:
    """A small BN CNN for 28x28 grayscale images (256 prunable channels)."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def subset(dataset, n):
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


def train(model, loader, epochs, lr, device, on_step=None):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if on_step is not None:
                on_step()
            optimizer.step()
    return optimizer


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float]:
    model.eval()
    loss = correct = count = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    return loss / count, correct / count


# ---------------------------------------------------------------------------
# Oracle: the loss increase of removing each channel, against each estimator.


def oracle_scores(model, groups, prunable, batches, device) -> list[float]:
    """(loss with channel c zeroed - loss)^2 for every channel of every prunable
    group, in eval mode on the held-out batches."""
    base, _ = evaluate(model, batches, device)
    out = []
    for i in prunable:
        for c in range(groups[i].size):
            probe = copy.deepcopy(model)
            zero_channels(probe, groups[i], torch.tensor([c]))
            loss, _ = evaluate(probe, batches, device)
            out.append((loss - base) ** 2)
    return out


def estimator_scores(model, groups, prunable, batches, criterion, device) -> list[float]:
    """The estimator's mean score per channel over the same held-out batches
    (eval mode, like the oracle)."""
    probe = copy.deepcopy(model)
    probe.eval()
    importance = TaylorImportance(probe, groups, criterion).attach()
    for x, y in batches:
        probe.zero_grad()
        F.cross_entropy(probe(x.to(device)), y.to(device)).backward()
        importance.end_minibatch()
    importance.detach()
    means = importance.means()
    return [v for i in prunable for v in means[i].tolist()]


def run_oracle(args) -> dict:
    torch.manual_seed(args.seed)
    splits = data.load_dataset("fashion-mnist", root=args.data_dir, seed=args.seed)
    train_loader = data.make_loader(subset(splits.train, args.train_examples), 128, shuffle=True, seed=args.seed)
    held_out = [(x, y) for x, y in data.make_loader(splits.val, 128)][:args.oracle_batches]
    model = oracle_cnn().to(args.device)
    start = time.perf_counter()
    train(model, train_loader, args.epochs, 1e-3, args.device)
    _, accuracy = evaluate(model, data.make_loader(splits.test, 1000), args.device)
    groups = dependency_groups(model, (torch.zeros(2, 1, 28, 28, device=args.device),))
    prunable = [i for i, g in enumerate(groups) if g.prunable and g.exact_masking]
    oracle = oracle_scores(model, groups, prunable, held_out, args.device)
    results = {"test_accuracy": accuracy, "channels": len(oracle), "train_seconds": time.perf_counter() - start,
               "estimators": {}}
    rows = []
    for criterion in CRITERIA:
        scores = estimator_scores(model, groups, prunable, held_out, criterion, args.device)
        spearman = stats.spearmanr(scores, oracle).statistic
        pearson = stats.pearsonr(scores, oracle).statistic
        per_group = _per_group_spearman(scores, oracle, [groups[i].size for i in prunable])
        results["estimators"][criterion] = {"spearman": spearman, "pearson": pearson,
                                            "spearman_per_layer_mean": per_group}
        rows.append([criterion, f"{spearman:.3f}", f"{pearson:.3f}", f"{per_group:.3f}"])
    print_table(f"Estimator vs oracle, {len(oracle)} channels of a BN CNN on Fashion-MNIST "
                f"(test accuracy {accuracy:.3f}), {machine_name(args.device)}",
                ["estimator", "Spearman", "Pearson", "Spearman within layer (mean)"], rows)
    return results


def _per_group_spearman(scores, oracle, sizes) -> float:
    values, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        if size > 2:
            values.append(stats.spearmanr(scores[part], oracle[part]).statistic)
        start += size
    return float(sum(values) / max(len(values), 1))


# ---------------------------------------------------------------------------
# A pruning run: train, prune with the paper's schedule (scaled down), fine-tune.


def inference_ms(model, batch, device) -> float:
    model.eval()
    x = torch.randn(batch, 1, 28, 28, device=device)
    with torch.no_grad():
        return median_seconds(lambda: model(x), device, min_run_time=0.5) * 1e3


def run_pruning(args) -> dict:
    torch.manual_seed(args.seed)
    splits = data.load_dataset("fashion-mnist", root=args.data_dir, seed=args.seed)
    loader = data.make_loader(subset(splits.train, args.train_examples), 64, shuffle=True, seed=args.seed)
    test_loader = data.make_loader(splits.test, 1000)
    results = {}
    rows = []
    for criterion in args.criteria:
        torch.manual_seed(args.seed)
        model = models.resnet20(num_classes=10, in_channels=1).to(args.device)
        train(model, loader, args.epochs, 1e-3, args.device)
        _, acc_before = evaluate(model, test_loader, args.device)
        original = copy.deepcopy(model)
        pruner = TaylorPruner(model, torch.zeros(2, 1, 28, 28, device=args.device), criterion,
                              target=Target.flops(args.target_flops), every=args.every,
                              prune_per_step=args.prune_per_step)
        start = time.perf_counter()
        while not pruner.done:  # prune while training, as in the paper
            train(model, loader, 1, 1e-3, args.device, on_step=pruner.step)
        prune_seconds = time.perf_counter() - start
        _, acc_pruned = evaluate(model, test_loader, args.device)
        train(model, loader, args.finetune_epochs, 3e-4, args.device)
        _, acc_masked = evaluate(model, test_loader, args.device)
        small = pruner.finalize()
        _, acc_final = evaluate(small, test_loader, args.device)
        report = pruner.report()
        timing = {b: (inference_ms(original, b, args.device), inference_ms(small, b, args.device)) for b in (1, 64)}
        results[criterion] = {
            "accuracy_before": acc_before, "accuracy_after_pruning": acc_pruned,
            "accuracy_after_finetune_masked": acc_masked, "accuracy_final": acc_final,
            "flops_kept": report.flops_kept, "params_kept": report.params_kept,
            "pruning_steps": report.steps, "prune_seconds": prune_seconds,
            "inference_ms": {str(b): {"original": t[0], "pruned": t[1]} for b, t in timing.items()}}
        rows.append([criterion, f"{report.flops_kept:.1%}", f"{report.params_kept:.1%}", f"{acc_before:.3f}",
                     f"{acc_pruned:.3f}", f"{acc_final:.3f}",
                     f"{timing[1][0]:.2f} / {timing[1][1]:.2f}", f"{timing[64][0]:.1f} / {timing[64][1]:.1f}"])
    print_table(f"ResNet-20 on Fashion-MNIST ({args.train_examples} training examples, {args.epochs} epochs + "
                f"pruning + {args.finetune_epochs} fine-tuning), target {args.target_flops:.0%} FLOPs, "
                f"{machine_name(args.device)}",
                ["criterion", "FLOPs kept", "params kept", "acc. before", "acc. just pruned", "acc. final",
                 "batch 1 ms (orig / pruned)", "batch 64 ms (orig / pruned)"], rows)
    return results


# ---------------------------------------------------------------------------
# Overhead of the pruner's hooks on a training step.


def run_overhead(args) -> dict:
    import torchvision

    torch.manual_seed(args.seed)
    x = torch.randn(args.overhead_batch, 3, 224, 224, device=args.device)
    y = torch.randint(0, 1000, (args.overhead_batch,), device=args.device)
    results, rows = {}, []
    criterion_by_setting = {"no pruner": None, "fo_bn": "fo_bn", "fo_gate": "fo_gate", "fo_fg": "fo_fg"}
    steps = {}
    for setting, criterion in criterion_by_setting.items():
        model = torchvision.models.resnet18().to(args.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        pruner = None
        if criterion is not None:  # `every` beyond the run: it only scores
            pruner = TaylorPruner(model, x[:2], criterion, target=1, every=10 ** 9)

        def step(model=model, optimizer=optimizer, pruner=pruner):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if pruner is not None:
                pruner.step()
            optimizer.step()
        steps[setting] = step
    # Interleaved rounds so that drifting machine load hits every setting alike,
    # in a rotated order so that no setting always runs first.
    times = {s: [] for s in steps}
    order = list(steps)
    for round_index in range(args.overhead_rounds):
        shift = round_index % len(order)
        for setting in order[shift:] + order[:shift]:
            times[setting].append(median_seconds(steps[setting], args.device, min_run_time=0.1))
    base = sorted(times["no pruner"])[len(times["no pruner"]) // 2]
    for setting, values in times.items():
        median = sorted(values)[len(values) // 2]
        results[setting] = {"step_ms": median * 1e3, "overhead": median / base - 1}
        rows.append([setting, f"{median * 1e3:.0f}", f"{median / base - 1:+.1%}"])
    print_table(f"Training-step overhead of the pruner's hooks, ResNet-18, batch {args.overhead_batch} x 3x224x224, "
                f"SGD, {machine_name(args.device)}", ["setting", "step ms (median)", "overhead"], rows)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["oracle", "run", "overhead", "all"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that it runs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--oracle-batches", type=int, default=8)
    parser.add_argument("--criteria", nargs="+", default=["fo_bn", "fo_gate", "fo_weight"], choices=CRITERIA)
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--prune-per-step", type=int, default=16)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--overhead-batch", type=int, default=16)
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train_examples, args.oracle_batches = 1, 2000, 2
        args.finetune_epochs, args.overhead_batch, args.overhead_rounds = 1, 2, 1
        args.every, args.prune_per_step, args.criteria = 5, 64, args.criteria[:1]
    parts = ["oracle", "run", "overhead"] if args.part == "all" else [args.part]
    runners = {"oracle": run_oracle, "run": run_pruning, "overhead": run_overhead}
    results = {"machine": machine_name(args.device), "settings": vars(args)}
    for part in parts:
        results[part] = runners[part](args)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
