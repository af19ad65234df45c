"""Taylor pruning in your own training loop, on scikit-learn's digits (built in,
no download): train a small CNN, prune it to half its FLOPs while training,
fine-tune, remove the channels, and compare.

    python examples/taylor_digits.py [--target-flops 0.5] [--criterion fo_bn]

About half a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from pyprune_ext import data
from pyprune_ext.taylor import CRITERIA, Target, TaylorPruner


def small_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def accuracy(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    model.train()
    return hits / len(loader.dataset)


def epoch(model, loader, optimizer, pruner=None) -> None:
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if pruner is not None:
            pruner.step()  # scores this minibatch; prunes every `every` minibatches
        optimizer.step()   # pruned channels are re-zeroed right after


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target-flops", type=float, default=0.5, help="fraction of FLOPs to keep")
    parser.add_argument("--criterion", default="fo_bn", choices=CRITERIA)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    splits = data.load_dataset("digits", seed=args.seed)
    loaders = data.make_loaders(splits, batch_size=32, seed=args.seed)
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        epoch(model, loaders.train, optimizer)
    dense_accuracy = accuracy(model, loaders.test)

    pruner = TaylorPruner(model, torch.zeros(2, 1, 8, 8), args.criterion,
                          target=Target.flops(args.target_flops), every=10, prune_per_step=8)
    start = time.perf_counter()
    while not pruner.done:
        epoch(model, loaders.train, optimizer, pruner)
    for _ in range(4):  # fine-tune the masked model
        epoch(model, loaders.train, optimizer)
    pruned = pruner.finalize()  # an ordinary nn.Module with fewer channels
    print(pruner.report().format_table())
    print(f"\npruning steps: {len(pruner.history)} in {time.perf_counter() - start:.1f} s; "
          f"test accuracy {dense_accuracy:.3f} dense -> {accuracy(pruned, loaders.test):.3f} pruned")


if __name__ == "__main__":
    main()
