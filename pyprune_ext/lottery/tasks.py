"""Ready-made ``train_step`` and ``evaluate`` for classification, for LotteryRun
or custom loops."""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["classification_evaluator", "classification_step"]


def classification_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One update on ``(inputs, labels)`` with cross-entropy; returns the loss (detached)."""
    inputs, labels = batch
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def classification_evaluator(datasets: Mapping[str, Dataset], batch_size: int = 1000
                             ) -> Callable[[nn.Module, str], Dict[str, float]]:
    """``evaluate(model, split) -> {"loss", "accuracy"}`` over ``datasets[split]``
    (e.g. ``{"val": splits.val, "test": splits.test}``), in fixed order, with the
    mean cross-entropy and the fraction of correct top-1 predictions."""
    loaders = {name: DataLoader(ds, batch_size=batch_size, shuffle=False) for name, ds in datasets.items()}

    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> Dict[str, float]:
        if split not in loaders:
            raise KeyError(f"evaluate: no dataset for split {split!r} (have {sorted(loaders)})")
        device = next(model.parameters()).device
        loss_sum, correct, count = 0.0, 0, 0
        for inputs, labels in loaders[split]:
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
        if count == 0:
            raise ValueError(f"evaluate: split {split!r} is empty")
        return {"loss": loss_sum / count, "accuracy": correct / count}

    return evaluate
