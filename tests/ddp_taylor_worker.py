"""Taylor pruning in one process or under torchrun (DDP, gloo), on the same global
minibatches; used by tests/test_distributed.py.

    python tests/ddp_taylor_worker.py OUT CRITERION BN_MODE
    torchrun --standalone --nproc-per-node 2 tests/ddp_taylor_worker.py OUT CRITERION BN_MODE

BN_MODE: "none" (no BatchNorm), "frozen" (BatchNorm in eval mode: the gradients
do not depend on how the batch is split) or "train" (local batch statistics).
Float64 throughout, so that one and two processes agree to rounding. Each rank
writes OUT/rank<r>.pt: the pruning history, the plan, and the parameters after
finalize() and a few more steps under a rebuilt DDP wrapper (parameters only:
BatchNorm running statistics are per rank between DDP's buffer broadcasts).
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from pyprune_ext.taylor import Target, TaylorPruner

GLOBAL_BATCH, STEPS_AFTER = 16, 3


def make_model(bn_mode: str) -> nn.Module:
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=bn_mode == "none")]
        if bn_mode != "none":
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU()]
    torch.manual_seed(0)
    return nn.Sequential(*block(3, 12), *block(12, 16), nn.MaxPool2d(2), *block(16, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).double()


def local_batches(rank: int, world: int):
    """The same global minibatches in every run; rank r takes its contiguous slice."""
    generator = torch.Generator().manual_seed(1)
    per_rank = GLOBAL_BATCH // world
    while True:
        x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=generator)
        yield x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]


def train_step(model, optimizer, batch, bn_mode, pruner=None):
    model.train(bn_mode != "frozen")
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    if pruner is not None:
        pruner.step()
    optimizer.step()


def main(out: str, criterion: str, bn_mode: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    inner = make_model(bn_mode)
    model = nn.parallel.DistributedDataParallel(inner) if world > 1 else inner
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = TaylorPruner(model, torch.zeros(2, 3, 8, 8, dtype=torch.float64), criterion,
                          target=Target.channels(14), every=3, prune_per_step=3, momentum=0.5)
    batches = local_batches(rank, world)
    while not pruner.done:
        train_step(model, optimizer, next(batches), bn_mode, pruner)
    pruned = pruner.finalize()
    # The documented way on: a new DDP wrapper and optimizer around the pruned module.
    model = nn.parallel.DistributedDataParallel(pruned) if world > 1 else pruned
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(STEPS_AFTER):
        train_step(model, optimizer, next(batches), bn_mode)
    os.makedirs(out, exist_ok=True)
    torch.save({"world": world, "plan": pruner.plan(),
                "history": [(s.step, s.minibatch, s.removed) for s in pruner.history],
                "params": {k: v.detach().clone() for k, v in pruned.named_parameters()}},
               os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
