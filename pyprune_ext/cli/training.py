"""Plain training and evaluation loops for the ``pyprune`` subcommands."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed
from ..data import make_loader
from ..optim import build_optimizer

from .common import UsageError


def train_loader(dataset, batch_size: int, seed: int) -> DataLoader:
    """The shuffled training loader; in a --nproc run each process gets its share
    of every global batch of ``batch_size`` (a DistributedSampler)."""
    world = distributed.world_size()
    if world == 1:
        return make_loader(dataset, batch_size, shuffle=True, seed=seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=max(1, batch_size // world), sampler=sampler)


def ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """A DistributedDataParallel wrapper in a --nproc run, else the model itself."""
    if not distributed.is_active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return build_optimizer(torch.optim.Adam, params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    raise UsageError(f"--optimizer must be adam or sgd, got {name!r}")


def _batches(loader: DataLoader):
    """Minibatches forever, epoch after epoch (the loader reshuffles each epoch;
    a DistributedSampler is told the epoch so that it does too)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_steps(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                steps: int, *, desc: str, progress: bool, after_backward: Optional[Callable[[], Optional[str]]] = None,
                stop: Optional[Callable[[], bool]] = None, bar_total: bool = True) -> Dict[str, float]:
    """Trains for ``steps`` minibatches (or until ``stop()``), calling
    ``after_backward()`` between backward and the optimizer step (the Taylor
    pruner's place); it may return a status shown in the progress bar.
    ``bar_total=False`` when ``steps`` is only a bound (the bar then counts
    without a percentage or a misleading time left)."""
    from tqdm.auto import tqdm
    model.train()
    started, loss_sum, done, status = time.perf_counter(), 0.0, 0, None
    with tqdm(total=steps if bar_total else None, desc=desc, disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for inputs, labels in _batches(loader):
            if done >= steps or (stop is not None and stop()):
                break
            inputs, labels = inputs.to(device), labels.to(device)
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                status = after_backward() or status
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):  # NaN or inf: the training diverged
                raise UsageError(f"{desc}: the loss became {value} at step {done + 1}; lower --lr")
            loss_sum, done = loss_sum + value, done + 1
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.3f}" + (f", {status}" if status else ""), refresh=False)
    return {"steps": done, "mean_loss": loss_sum / max(done, 1), "seconds": time.perf_counter() - started}


def evaluate(evaluator, model: nn.Module, split: str) -> Dict[str, float]:
    """``evaluator(model, split)`` (a :func:`pyprune_ext.lottery.classification_evaluator`)
    in eval mode, the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        return evaluator(model, split)
    finally:
        model.train(was_training)


def _forward_seconds(model: nn.Module, inputs: torch.Tensor) -> float:
    if inputs.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(inputs)
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def inference_ms(models: Sequence[nn.Module], inputs: torch.Tensor, rounds: int = 7, per_round: int = 5
                 ) -> List[float]:
    """Median forward time of each model on ``inputs`` (eval mode), in milliseconds.
    The models take turns, round after round, so that a slow spell of a shared
    machine hits them alike; each is warmed up first (new shapes compile kernels)."""
    modes = [m.training for m in models]
    times: List[List[float]] = [[] for _ in models]
    try:
        for model in models:
            model.eval()
            for _ in range(3):
                model(inputs)
        for _ in range(rounds):
            for model, samples in zip(models, times):
                samples.extend(_forward_seconds(model, inputs) for _ in range(per_round))
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return [1e3 * statistics.median(samples) for samples in times]
