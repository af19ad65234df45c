"""Taylor pruning of a small Vision Transformer on Fashion-MNIST, end to end.

One dense ViT (``pyprune_ext.models.vit``: 4 blocks of 4 heads, width 64, MLP
128, 7x7 patches) is trained; then for each criterion a copy is pruned while
training (attention heads and MLP neurons, ranked globally, the paper's
schedule scaled down: ``--every`` minibatches between steps) to ``--target-flops``
of its MACs, fine-tuned, finalized, evaluated and timed. Every criterion sees the
same minibatches in the same order. Criteria: the Taylor ones (``fo_gate``,
``fo_fg``, ``so_fisher``), L2 magnitude of each unit's weights, and random scores;
and a control: the dense model trained as many more epochs, unpruned.

    python -m benchmarks.transformer_pruning            # about 20 minutes on 2 CPU cores
    python -m benchmarks.transformer_pruning --quick    # tiny settings, to check that it runs

Prints a Markdown table; ``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import Tensor

from pyprune_ext import data, models
from pyprune_ext.bench.common import machine_name, print_table, write_json
from pyprune_ext.graph.specs import spec_for
from pyprune_ext.graph.surgery import member_positions
from pyprune_ext.taylor import Importance, Target, TaylorPruner

from .taylor_pruning import evaluate, inference_ms, subset, train

TAYLOR = ("fo_gate", "fo_fg", "so_fisher")


class L2Magnitude(Importance):
    """The L2 norm of each unit's weights in the layers computing it: a head's q/k/v
    rows, a neuron's row of the first MLP layer (the "out" and "heads" members)."""

    def __init__(self, model, groups):
        self.modules, self.groups = dict(model.named_modules()), list(groups)

    def end_minibatch(self) -> bool:
        return True  # read from the weights when asked

    def means(self) -> list[Tensor]:
        return [self._score(group) for group in self.groups]

    def _score(self, group) -> Tensor:
        total = torch.zeros(group.size, dtype=torch.float64)
        for member in group.members_with_role("out", "heads"):
            module = self.modules[member.name]
            positions = member_positions(member, torch.arange(group.size))
            for name, tensor, dim, index in spec_for(module).entries(module, member.role, positions):
                if name != "weight" and name != "in_proj_weight":
                    continue
                rows = tensor.detach().index_select(dim, index.to(tensor.device)).movedim(dim, 0)
                squares = rows.double().pow(2).reshape(len(index), -1).sum(1).cpu()
                total += squares.reshape(-1, len(positions)).sum(0).reshape(group.size, member.span).sum(1)
        return total.sqrt()


class RandomScores(Importance):
    """Uniform random scores, drawn anew at each pruning step (a fixed generator)."""

    def __init__(self, model, groups, seed: int = 0):
        self.groups = list(groups)
        self.generator = torch.Generator().manual_seed(seed)

    def end_minibatch(self) -> bool:
        return True

    def means(self) -> list[Tensor]:
        return [torch.rand(g.size, generator=self.generator, dtype=torch.float64) for g in self.groups]


IMPORTANCES = {"l2": L2Magnitude, "random": RandomScores}


def _units_kept(model) -> dict[str, float]:
    """Heads and MLP neurons left, as fractions of the dense model's 16 and 512."""
    heads = sum(block.attn.num_heads for block in model.blocks)
    neurons = sum(block.mlp[0].out_features for block in model.blocks)
    return {"heads": heads, "neurons": neurons}


def run(args) -> dict:
    torch.manual_seed(args.seed)
    splits = data.load_dataset("fashion-mnist", root=args.data_dir, seed=args.seed)
    train_set = subset(splits.train, args.train_examples)
    test_loader = data.make_loader(splits.test if not args.quick else subset(splits.test, 1000), 1000)

    def loader():  # the same minibatches in the same order for every criterion
        return data.make_loader(train_set, 64, shuffle=True, seed=args.seed)

    dense = models.vit((1, 28, 28), 10).to(args.device)
    start = time.perf_counter()
    train(dense, loader(), args.epochs, 1e-3, args.device)
    dense_seconds = time.perf_counter() - start
    _, dense_accuracy = evaluate(dense, test_loader, args.device)
    dense_units = _units_kept(dense)
    example = torch.zeros(2, 1, 28, 28, device=args.device)
    results = {"dense": {"accuracy": dense_accuracy, "train_seconds": dense_seconds, **dense_units}}
    rows = [["dense", "100%", "100%", str(dense_units["heads"]), str(dense_units["neurons"]), "-", "-",
             f"{dense_accuracy:.4f}", "-", "-"]]
    extra_epochs = 0
    for criterion in args.criteria:
        torch.manual_seed(args.seed)
        model = copy.deepcopy(dense)
        importance = IMPORTANCES.get(criterion, criterion)
        pruner = TaylorPruner(model, example, importance, target=Target.flops(args.target_flops), every=args.every,
                              prune_per_step=args.prune_per_step)
        start = time.perf_counter()
        epochs = 0
        while not pruner.done:  # prune while training, as in the paper
            train(model, loader(), 1, 1e-3, args.device, on_step=pruner.step)
            epochs += 1
        extra_epochs = max(extra_epochs, epochs)
        prune_seconds = time.perf_counter() - start
        _, just_pruned = evaluate(model, test_loader, args.device)
        train(model, loader(), args.finetune_epochs, 3e-4, args.device)
        small = pruner.finalize()
        _, final = evaluate(small, test_loader, args.device)
        report = pruner.report()
        timing = {b: (inference_ms(dense, b, args.device), inference_ms(small, b, args.device)) for b in (1, 64)}
        units = _units_kept(small)
        results[criterion] = {
            "flops_kept": report.flops_kept, "params_kept": report.params_kept, **units,
            "accuracy_just_pruned": just_pruned, "accuracy_final": final, "pruning_steps": report.steps,
            "prune_seconds": prune_seconds, "pruning_epochs": epochs,
            "inference_ms": {str(b): {"dense": t[0], "pruned": t[1]} for b, t in timing.items()}}
        rows.append([criterion, f"{report.flops_kept:.1%}", f"{report.params_kept:.1%}", str(units["heads"]),
                     str(units["neurons"]), f"{just_pruned:.4f}", f"{final - dense_accuracy:+.4f}", f"{final:.4f}",
                     f"{timing[1][0]:.2f} / {timing[1][1]:.2f}", f"{timing[64][0]:.1f} / {timing[64][1]:.1f}"])
    # the control: the dense model trained as long as the longest pruning run, then fine-tuned alike
    control = copy.deepcopy(dense)
    torch.manual_seed(args.seed)
    train(control, loader(), extra_epochs, 1e-3, args.device)
    train(control, loader(), args.finetune_epochs, 3e-4, args.device)
    _, control_accuracy = evaluate(control, test_loader, args.device)
    results["dense_control"] = {"accuracy": control_accuracy, "extra_epochs": extra_epochs}
    rows.insert(1, [f"dense, +{extra_epochs}+{args.finetune_epochs} epochs", "100%", "100%",
                    str(dense_units["heads"]), str(dense_units["neurons"]), "-",
                    f"{control_accuracy - dense_accuracy:+.4f}", f"{control_accuracy:.4f}", "-", "-"])
    print_table(f"ViT on Fashion-MNIST ({args.train_examples} training examples, {args.epochs} epochs, then pruning "
                f"every {args.every} minibatches to {args.target_flops:.0%} MACs and {args.finetune_epochs} epochs of "
                f"fine-tuning), {machine_name(args.device)}",
                ["criterion", "MACs kept", "params kept", "heads", "MLP neurons", "acc. just pruned",
                 "final vs dense", "acc. final", "batch 1 ms (dense / pruned)", "batch 64 ms (dense / pruned)"], rows)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that it runs")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--criteria", nargs="+", default=[*TAYLOR, "l2", "random"],
                        choices=[*TAYLOR, "fo_weight", "l2", "random"])
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--every", type=int, default=30)
    parser.add_argument("--prune-per-step", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train_examples, args.every, args.finetune_epochs = 1, 1000, 2, 1
        args.prune_per_step = 40
    results = run(args)
    if args.json:
        write_json(args.json, {"benchmark": "transformer_pruning", "machine": machine_name(args.device),
                               "settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
