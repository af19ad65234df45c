"""Your own importance criterion for TaylorPruner: two classic ones in about ten
lines each, then a small VGG on scikit-learn's digits pruned to half its FLOPs
with each of them.

* ``L1Magnitude``: the L1 norm of each channel's filters (Li et al., "Pruning
  Filters for Efficient ConvNets", 2017; Torch-Pruning's
  ``MagnitudeImportance(p=1)``), summed over the producers a group couples.
* ``BNScale``: ``|gamma|`` of the BatchNorm after each channel (Liu et al.,
  "Learning Efficient Convolutional Networks through Network Slimming", 2017,
  who also train with an L1 penalty on gamma; left out here).

Both read the current weights when the pruner asks, so they install no hooks
and count every minibatch. One is passed as a class (a factory), the other
registered by name, which also makes it a ``pyprune taylor --criterion`` choice::

    python examples/custom_importance.py

About ten seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import Tensor
from torch.nn import functional as F

from pyprune_ext import data
from pyprune_ext.models import vgg11_bn_small
from pyprune_ext.taylor import Importance, Target, TaylorPruner, register_importance


def channel_sums(values: Tensor, member, size: int) -> Tensor:
    """Group channel c's total of ``values`` (one per module channel): the sum
    over ``member.positions(c)`` (one position unless the member spans several)."""
    return torch.stack([values[list(member.positions(c))].sum() for c in range(size)])


class L1Magnitude(Importance):
    """Sum of |w| over each channel's filters in the group's producers (the
    "out" and "depthwise" members: Conv/Linear weights, channels along dim 0)."""

    def __init__(self, model, groups):
        self.modules, self.groups = dict(model.named_modules()), list(groups)

    def end_minibatch(self) -> bool:
        return True  # the weights can be read at any time: every minibatch counts

    def means(self) -> list[Tensor]:
        scores = []
        for group in self.groups:
            score = torch.zeros(group.size)
            for member in group.members_with_role("out", "depthwise"):
                filter_l1 = self.modules[member.name].weight.detach().abs().flatten(1).sum(1)  # per output channel
                score += channel_sums(filter_l1.cpu(), member, group.size)
            scores.append(score)
        return scores


class BNScale(Importance):
    """|gamma| of the (affine) BatchNorms directly after the group's producers,
    summed. A group without one (a Linear layer) gets no score: the pruner
    refuses to rank it, so leave its producer out with ``ignore=``."""

    def __init__(self, model, groups):
        self.modules, self.groups = dict(model.named_modules()), list(groups)

    def end_minibatch(self) -> bool:
        return True

    def means(self) -> list[Tensor | None]:
        scores = []
        for group in self.groups:
            gammas = [channel_sums(self.modules[bn.name].weight.detach().abs().cpu(), bn, group.size)
                      for bn in group.bn]
            scores.append(sum(gammas) if gammas else None)
        return scores


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
            pruner.step()  # every `every` minibatches: masks the lowest-scored channels
        optimizer.step()


def prune(dense, loaders, importance, target_flops: float) -> TaylorPruner:
    model = copy.deepcopy(dense)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # normalize=True: each group's scores are divided by their norm before the
    # global ranking, since raw magnitudes do not compare across layers (the
    # first conv's 9-weight filters have the smallest L1 norms and would all go).
    pruner = TaylorPruner(model, torch.zeros(2, 1, 8, 8), importance=importance, normalize=True,
                          target=Target.flops(target_flops), every=5, prune_per_step=8)
    while not pruner.done:
        epoch(model, loaders.train, optimizer, pruner)
    epoch(model, loaders.train, optimizer)  # fine-tune the masked model
    pruner.finalize()  # an ordinary nn.Module with fewer channels
    return pruner


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target-flops", type=float, default=0.5, help="fraction of FLOPs to keep")
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    splits = data.load_dataset("digits", seed=0)
    loaders = data.make_loaders(splits, batch_size=32, seed=0)
    dense = vgg11_bn_small(input_shape=(1, 8, 8), num_classes=10, width=8)
    optimizer = torch.optim.Adam(dense.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        epoch(dense, loaders.train, optimizer)
    print(f"dense test accuracy {accuracy(dense, loaders.test):.3f}")

    register_importance("bn_scale", BNScale, replace=True)  # now a name, like the built-in criteria
    for label, importance in (("L1 magnitude", L1Magnitude), ("BN scale", "bn_scale")):
        pruner = prune(dense, loaders, importance, args.target_flops)
        print(f"\n{label}: test accuracy {accuracy(pruner.model, loaders.test):.3f} pruned")
        print(pruner.report().format_table())


if __name__ == "__main__":
    main()
