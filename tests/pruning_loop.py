"""The training loop the pruning tests share: minibatches until the pruner is done."""

from __future__ import annotations

import torch


def train_until_done(pruner, model, loss_of, lr: float = 0.01) -> None:
    """SGD steps on ``loss_of(model)`` with ``pruner.step()`` after each backward
    pass, until the pruner reaches its target."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    while not pruner.done:
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        pruner.step()
        optimizer.step()
