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


def finalize_and_compare(pruner, model, forward) -> tuple:
    """Finalizes the pruner; returns (pruned model, max relative difference between the
    masked model's ``forward(model)`` in eval mode and the pruned one's)."""
    model.eval()
    with torch.no_grad():
        masked = forward(model)
    small = pruner.finalize()
    with torch.no_grad():
        pruned = forward(small)
    return small, float((masked - pruned).abs().max() / masked.abs().max().clamp_min(1e-12))
