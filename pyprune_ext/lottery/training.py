"""The training loop of one level, with evaluations and resume checkpoints.

:class:`LevelTraining` trains a (masked) model from ``start_iteration`` to
``total_iterations``. Every ``checkpoint_every`` iterations (at most one epoch
apart) it writes ``checkpoint.pt`` atomically: model, optimizer, scheduler,
iteration, data position, every RNG state and the evaluations so far. A new
LevelTraining on the same path resumes from that file, and since the data order
and the RNGs are restored, it continues exactly as the interrupted run would
have: a kill loses at most the steps since the last checkpoint.

A training loss that is not finite (NaN or infinite: the training diverged) stops
the level with :class:`NonFiniteLossError` before anything after it is evaluated
or saved, so the last checkpoint keeps the weights from before the divergence.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..distributed import all_reduce_sum_, world_size
from ..optim import build_optimizer
from .config import LotteryConfig
from .data_order import DataOrder, fetch_batch
from .io import RunFileError, load_tensors, save_tensors
from .seeding import get_rng_state, set_rng_state

__all__ = ["LevelTraining", "NonFiniteLossError", "make_optimizer", "make_scheduler", "to_device"]

_CHECKPOINT_FORMAT = "pyprune_ext.lottery.checkpoint"

TrainStep = Callable[[nn.Module, Any, torch.optim.Optimizer], Any]
Evaluate = Callable[[nn.Module, str], Dict[str, float]]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the training diverged (usually a
    learning rate too high for the model). Nothing after the step that diverged
    was saved."""


def make_optimizer(config: LotteryConfig, params) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` with ``config.lr`` and
    ``optimizer_kwargs`` (Adam / AdamW fused unless those say otherwise: see
    :mod:`pyprune_ext.optim`)."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[config.optimizer]
    try:
        return build_optimizer(cls, params, lr=config.lr, **config.optimizer_kwargs)
    except TypeError as err:
        raise ValueError(f"optimizer_kwargs {config.optimizer_kwargs!r} do not fit {cls.__name__}: {err}") from err


def make_scheduler(config: LotteryConfig, optimizer: torch.optim.Optimizer):
    """A per-iteration LambdaLR for warm-up and step decay, or None when the LR is constant."""
    if not config.lr_milestones and not config.warmup_iterations:
        return None
    warmup, milestones, gamma = config.warmup_iterations, list(config.lr_milestones), config.lr_gamma

    def factor(step: int) -> float:
        scale = gamma ** sum(step >= m for m in milestones)
        return scale * min(1.0, (step + 1) / warmup) if warmup else scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves the tensors of a batch (tensor, tuple, list or dict) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _loss_value(loss: Any) -> float:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise TypeError(f"train_step must return the scalar loss, got a tensor of shape {list(loss.shape)}")
        return float(loss.detach())
    if isinstance(loss, (int, float)):
        return float(loss)
    raise TypeError(f"train_step must return the loss (a float or scalar tensor), got {type(loss).__name__}")


class LevelTraining:
    """Trains one level. See the module docstring.

    Args:
        model, optimizer, scheduler, data_order: the state at ``start_iteration``
            (ignored in favour of the checkpoint when resuming).
        train_data: the training dataset, indexed by ``data_order``.
        train_step: ``train_step(model, batch, optimizer) -> loss``: one update.
        evaluate: ``evaluate(model, split) -> {"loss": ..., "accuracy": ...}``.
        eval_splits: splits evaluated at each evaluation.
        eval_every, checkpoint_every: in iterations.
        checkpoint_path: where the resume checkpoint lives.
        after_step: called as ``after_step(iteration)`` after each update (the
            runner captures the rewind point there).
        progress: a tqdm description, or None for no bar.
        train_model: what ``train_step`` gets (a DistributedDataParallel wrapper
            of ``model`` in a distributed run); default ``model``.
        shard: picks this process's part of each global batch's indices
            (distributed runs); default: the whole batch.
        writer: whether this process writes the checkpoint (rank 0 only).
        sync: a :class:`pyprune_ext.distributed.Sync` to average the running
            training loss over the ranks at each evaluation.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data_order: DataOrder,
                 train_data: Dataset, train_step: TrainStep, evaluate: Evaluate, eval_splits: Sequence[str],
                 start_iteration: int, total_iterations: int, eval_every: int, checkpoint_every: int,
                 checkpoint_path: Path, device: torch.device,
                 after_step: Optional[Callable[[int], None]] = None, progress: Optional[str] = None,
                 train_model: Optional[nn.Module] = None, shard: Optional[Callable[[Tensor], Tensor]] = None,
                 writer: bool = True, sync=None):
        self.model, self.optimizer, self.scheduler, self.data_order = model, optimizer, scheduler, data_order
        self.train_model = model if train_model is None else train_model
        self.shard, self.writer, self.sync = shard, writer, sync
        self.train_data, self.train_step, self.evaluate = train_data, train_step, evaluate
        self.eval_splits = list(eval_splits)
        self.iteration, self.total = start_iteration, total_iterations
        self.start_iteration = start_iteration
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.checkpoint_path, self.device = Path(checkpoint_path), device
        self.after_step, self.progress = after_step, progress
        self.evaluations: List[Dict[str, Any]] = []
        self.loss_sum, self.loss_count = 0.0, 0
        self.elapsed, self.train_seconds, self.steps = 0.0, 0.0, 0
        self.resumed_from: Optional[int] = None
        self.diverged: Optional[tuple] = None  # (iteration, loss) of the first non-finite loss

    # ------------------------------------------------------------ checkpoint

    def _checkpoint_state(self) -> Dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "data_order": self.data_order.state_dict(),
            "rng": get_rng_state(),
            "evaluations": self.evaluations,
            "loss_sum": self.loss_sum, "loss_count": self.loss_count,
            "elapsed": self.elapsed, "train_seconds": self.train_seconds, "steps": self.steps,
        }

    def save_checkpoint(self) -> None:
        if self.writer:
            save_tensors(self._checkpoint_state(), self.checkpoint_path)

    def _restore(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint_path}: not a lottery checkpoint")
        # strict: a checkpoint of another model is an error, not a partial load.
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError(f"{self.checkpoint_path}: the checkpoint's LR schedule does not match the config")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.data_order.load_state_dict(state["data_order"])
        set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.evaluations = list(state["evaluations"])
        self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
        self.elapsed, self.train_seconds = float(state["elapsed"]), float(state["train_seconds"])
        self.steps = int(state["steps"])
        self.resumed_from = self.iteration

    def resume_if_possible(self) -> bool:
        """Loads ``checkpoint_path`` if it exists; returns whether it did."""
        if not self.checkpoint_path.is_file():
            return False
        # Loaded on the CPU: RNG states must stay CPU tensors; load_state_dict moves
        # the model and optimizer tensors to their parameters' device.
        state = load_tensors(self.checkpoint_path)
        try:
            self._restore(state)
        except (KeyError, TypeError, RuntimeError, IndexError) as err:  # a damaged or foreign checkpoint
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise RunFileError(f"{self.checkpoint_path}: not a checkpoint of this level ({type(err).__name__}: "
                               f"{first}); delete it to restart the level from its beginning") from None
        return True

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _evaluate(self) -> Dict[str, Any]:
        if self.sync is not None:  # every rank saw its part of the same batches: average over ranks
            losses = [torch.tensor([self.loss_sum])]
            all_reduce_sum_(losses, self.sync.group)
            self.loss_sum = float(losses[0]) / world_size(self.sync.group)
        record: Dict[str, Any] = {"iteration": self.iteration,
                                  "train_loss_running": self.loss_sum / self.loss_count if self.loss_count else None}
        was_training = self.model.training
        self.model.eval()
        try:
            for split in self.eval_splits:
                result = self.evaluate(self.model, split)
                if not isinstance(result, dict) or "loss" not in result:
                    raise TypeError(f"evaluate(model, {split!r}) must return a dict with at least 'loss' "
                                    f"(and usually 'accuracy'), got {result!r}")
                record.update({f"{split}_{key}": float(value) for key, value in result.items()})
        finally:
            self.model.train(was_training)
        self.loss_sum, self.loss_count = 0.0, 0
        self.evaluations.append(record)
        return record

    # ----------------------------------------------------------------- loop

    def _step(self) -> float:
        indices = self.data_order.next_indices()
        if self.shard is not None:
            indices = self.shard(indices)
        batch = to_device(fetch_batch(self.train_data, indices), self.device)
        loss = _loss_value(self.train_step(self.train_model, batch, self.optimizer))
        if self.scheduler is not None:
            self.scheduler.step()
        return loss

    def run(self) -> List[Dict[str, Any]]:
        """Trains to ``total_iterations`` (resuming from the checkpoint if there is
        one and :meth:`resume_if_possible` has not loaded it yet) and returns the
        evaluation records."""
        if self.resumed_from is None:
            self.resume_if_possible()
        self.model.train()
        bar = self._bar()
        started = time.perf_counter()
        elapsed_before = self.elapsed
        try:
            while self.iteration < self.total:
                t0 = time.perf_counter()
                loss = self._step()
                self.train_seconds += time.perf_counter() - t0
                self.iteration += 1
                self.steps += 1
                self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
                if not math.isfinite(loss) and self.diverged is None:
                    self.diverged = (self.iteration, loss)
                evaluate = self.iteration % self.eval_every == 0 or self.iteration == self.total
                checkpoint = self.iteration % self.checkpoint_every == 0 or self.iteration == self.total
                self._stop_if_diverged(boundary=evaluate or checkpoint)
                if self.after_step is not None:
                    self.after_step(self.iteration)
                record = self._evaluate() if evaluate else None
                self.elapsed = elapsed_before + time.perf_counter() - started
                if checkpoint:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    if record is not None:
                        bar.set_postfix(val_acc=record.get("val_accuracy"), loss=f"{loss:.3f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        self.elapsed = elapsed_before + time.perf_counter() - started
        return self.evaluations

    def _stop_if_diverged(self, boundary: bool) -> None:
        """Raises NonFiniteLossError once a step's loss was not finite. A single
        process stops at that step. In a distributed run each rank sees only its
        shard's loss, and a rank stopping alone would leave the others waiting in
        their next all-reduce: the ranks agree (one all-reduce) at each evaluation
        and checkpoint instead, before anything is evaluated or saved, and stop
        together."""
        if self.sync is None:
            if self.diverged is None:
                return
            iteration, loss = self.diverged
        else:
            if not boundary:
                return
            flags = [torch.tensor([0.0 if self.diverged is None else 1.0])]
            all_reduce_sum_(flags, self.sync.group)
            if float(flags[0]) == 0:
                return
            iteration, loss = self.diverged if self.diverged is not None else (None, None)
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        what = (f"the training loss became {loss} at iteration {iteration}" if iteration is not None else
                f"another process's training loss became NaN or infinite by iteration {self.iteration}")
        raise NonFiniteLossError(what + (f" (learning rate {lr:g})" if isinstance(lr, float) else "")
                                 + ": the training diverged; lower the learning rate")

    def _bar(self):
        if self.progress is None:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.total, initial=self.iteration, desc=self.progress, leave=False,
                    dynamic_ncols=True)

    @property
    def step_time_ms(self) -> float:
        """Mean wall time of one training step (batch fetch + update), evaluations excluded."""
        return 1e3 * self.train_seconds / self.steps if self.steps else float("nan")
