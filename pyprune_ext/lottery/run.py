"""LotteryRun: iterative magnitude pruning with rewinding, level by level, resumable.

Run directory layout (every file written atomically)::

    run_dir/
      config.json            the LotteryConfig (a rerun with another config is an error)
      rewind_point.pt        the RewindPoint at iteration k (ticket runs)
      summary.csv            one row per finished level
      summary.json           the same rows, plus the config
      level_00/
        mask.pt              the level's MaskSet
        rewind.pt            model state at the rewind point, masked (where the level starts)
        checkpoint.pt        while the level trains: the resume checkpoint
        final.pt             model state at the end of training
        metrics.json         evaluations, early stop, remaining fractions, times
        done                 written last: the level is finished and never recomputed

Level 0 trains the dense network from its initialisation (``torch.manual_seed(seed)``
then ``model_factory()``) and captures the rewind point at iteration k. Level L >= 1
prunes ``rate`` of the remaining weights of level L-1's final weights, rewinds to
the point and trains from iteration k to the end. Controls (``config.control``)
train levels 1..levels on the masks of another run (``control_source``).

Resume: rerunning the same command skips finished levels, reuses a level's saved
mask, and continues an unfinished level from its checkpoint (at most one epoch
old, see :mod:`.training`). A run directory is relocatable: copied or moved (a
control together with its ticket run), it resumes at its new path.

A damaged or missing run file (config.json that is not a JSON object, a level
marked done without its files, metrics.json without its entries, a lost
rewind_point.pt) raises :class:`~pyprune_ext.lottery.io.RunFileError` naming the
file and what to delete; a training loss that becomes NaN or infinite raises
:class:`~pyprune_ext.lottery.training.NonFiniteLossError`.

Distributed (DDP, launched with ``torchrun``; automatic when torch.distributed is
initialised with more than one process): every rank trains the same network
wrapped in DistributedDataParallel on its contiguous part of each global batch
(``batch_size`` is the global batch), so the run is the 1-process run up to
rounding. Only rank 0 writes the run directory, which every rank must be able to
read (one machine, or a shared file system); each level's masks are computed on
every rank from the same files and verified identical by a checksum
all-reduce, and the ranks meet at a barrier after each level. Checkpoints hold
the unwrapped model, so a run resumes with any number of processes.
"""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as dist_utils
from .config import LotteryConfig, config_differences
from .controls import control_masks, random_reinit
from .data_order import DataOrder
from .io import (PathLike, RunFileError, atomic_write_json, atomic_write_text, load_json_object, load_tensors,
                 save_tensors)
from .masks import MaskSet
from .metrics import early_stop, summary_csv, summary_row
from .nm import NMPattern, check_nm
from .pruning import nm_layers, prune_by_magnitude
from .rewinding import RewindPoint, model_state, rewind
from .seeding import derive_seed, seed_everything
from .training import Evaluate, LevelTraining, NonFiniteLossError, TrainStep, make_optimizer, make_scheduler

__all__ = ["LotteryRun", "run_lottery"]

ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]

# Settings a control run must share with the ticket run whose masks it reads:
# the training recipe, what the masks and the rewind point mean, and the seed (the
# data order it rewinds to is the source's; the control's own randomness comes
# from control_seed).
_RECIPE_FIELDS = ("seed", "rate", "rates", "output_rate", "scope", "prunable", "rewind_iteration", "rewind_optimizer",
                  "rewind_schedule", "rewind_data_order", "iterations", "epochs", "batch_size", "optimizer",
                  "lr", "optimizer_kwargs", "lr_milestones", "lr_gamma", "warmup_iterations")
_LEVEL_FILES = ("mask.pt", "rewind.pt", "final.pt", "metrics.json")
# Entries every config.json this code wrote has (a file without them is damaged,
# not a run with other settings).
_CONFIG_KEYS = ("levels", "control")
# What a finished level's metrics.json must hold (summary_row reads these).
_METRICS_KEYS = ("level", "remaining", "remaining_per_layer", "early_stop", "final", "wall_time_s", "step_time_ms")


def _json_normalised(data: Dict[str, Any]) -> Dict[str, Any]:
    """Tuples become lists etc., as they are once read back from config.json."""
    return json.loads(json.dumps(data))


def _relative_path(target: Path, start: Path) -> str:
    """``target`` relative to ``start`` (absolute where no relative path exists,
    e.g. another drive on Windows)."""
    try:
        return os.path.relpath(os.path.abspath(target), os.path.abspath(start))
    except ValueError:
        return os.path.abspath(target)


@contextmanager
def _deterministic(enabled: bool):
    """torch.use_deterministic_algorithms for the duration of a run, restored after
    (warn_only: an op without a deterministic kernel warns instead of failing)."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def _as_factory(model_or_factory: Union[nn.Module, ModelFactory]) -> Tuple[ModelFactory, bool]:
    """A factory, and whether it draws a fresh initialisation (a given model is copied)."""
    if isinstance(model_or_factory, nn.Module):
        snapshot = copy.deepcopy(model_or_factory)
        return (lambda: copy.deepcopy(snapshot)), False
    if not callable(model_or_factory):
        raise TypeError(f"model_factory must be an nn.Module or a callable returning one, "
                        f"got {type(model_or_factory).__name__}")
    return model_or_factory, True


class LotteryRun:
    """Runs the levels of a lottery-ticket experiment in ``run_dir``.

    Args:
        model_factory: ``() -> nn.Module`` building a freshly initialised network
            (seeded by the runner), or an ``nn.Module`` whose current weights are
            the initialisation (then the ``"reinit"`` control is unavailable).
        train_step: ``train_step(model, batch, optimizer) -> loss``: one full update
            (zero_grad, forward, backward, step); the batch is already on the
            device. See :func:`pyprune_ext.lottery.classification_step`.
        evaluate: ``evaluate(model, split) -> {"loss": ..., "accuracy": ...}`` for
            each of ``eval_splits``; called in eval mode under ``torch.no_grad``.
            See :func:`pyprune_ext.lottery.classification_evaluator`.
        config: a :class:`LotteryConfig`.
        run_dir: the run directory (created if needed).
        train_data: the training dataset (batches are drawn by the runner in a
            seeded, resumable order; a TensorDataset is fastest).
        optimizer_factory: ``params -> Optimizer`` to replace ``config.optimizer``
            (not recorded in config.json: keep it fixed for a run directory).
        eval_splits: splits evaluated each time; must include ``"val"`` (early stopping).
        progress: show tqdm bars and one line per finished level (rank 0 only).
        distributed: None (default): run distributed when torch.distributed is
            initialised with more than one process; True: require it; False: never.
        process_group: the process group (default: the world).
    """

    def __init__(self, model_factory: Union[nn.Module, ModelFactory], train_step: TrainStep, evaluate: Evaluate,
                 config: LotteryConfig, run_dir: PathLike, *, train_data: Dataset,
                 optimizer_factory: Optional[OptimizerFactory] = None,
                 eval_splits: Sequence[str] = ("val", "test"), progress: bool = True,
                 distributed: Optional[bool] = None, process_group=None):
        if not isinstance(config, LotteryConfig):
            raise TypeError(f"config must be a LotteryConfig, got {type(config).__name__}")
        config.validate()
        self.factory, self.fresh_init = _as_factory(model_factory)
        if config.control == "reinit" and not self.fresh_init:
            raise ValueError("control='reinit' needs a model factory (a callable) to draw fresh "
                             "initialisations; a model instance only has its one initialisation")
        if "val" not in eval_splits:
            raise ValueError(f"eval_splits must include 'val' (the early-stopping iteration is the minimum "
                             f"validation loss), got {list(eval_splits)}")
        self.train_step, self.evaluate = train_step, evaluate
        self.config, self.run_dir = config, Path(run_dir)
        self.train_data, self.optimizer_factory = train_data, optimizer_factory
        self.eval_splits = list(eval_splits) + (["train"] if config.eval_train and "train" not in eval_splits else [])
        self.sync = dist_utils.sync_for(distributed, process_group)
        self.rank, self.world = dist_utils.rank(process_group), dist_utils.world_size(process_group)
        self.writer = self.rank == 0 or self.sync is None  # only rank 0 writes the run directory
        self.progress = progress and self.writer
        self.device = torch.device(config.device)
        self.source_dir = None if config.control == "none" else Path(config.control_source)
        data_order = self._data_order()
        self.total_iterations = config.total_iterations(data_order.batches_per_epoch)
        if config.rewind_iteration >= self.total_iterations:
            raise ValueError(f"rewind_iteration={config.rewind_iteration} must be below the "
                             f"{self.total_iterations} training iterations")
        self.batches_per_epoch = data_order.batches_per_epoch
        self._check_shards(len(train_data))

    def _check_shards(self, size: int) -> None:
        """Every rank needs at least one example of every batch, the last one included."""
        if self.sync is None:
            return
        batch = self.config.batch_size
        smallest = min(batch, size % batch or batch)
        if smallest < self.world:
            raise ValueError(f"{self.world} processes need batches of at least {self.world} examples; the "
                             f"{size} training examples in batches of {batch} leave a batch of {smallest}")

    def _shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch."""
        return torch.tensor_split(indices, self.world)[self.rank]

    def _barrier(self) -> None:
        if self.sync is not None:
            dist_utils.barrier(self.sync.group)

    # ------------------------------------------------------------------ paths

    def level_dir(self, level: int) -> Path:
        return self.run_dir / f"level_{level:02d}"

    @property
    def rewind_point_path(self) -> Path:
        return (self.run_dir if self.source_dir is None else self.source_dir) / "rewind_point.pt"

    @property
    def levels(self) -> List[int]:
        """The levels this run trains: 0..levels for tickets, 1..levels for controls."""
        return list(range(0 if self.config.control == "none" else 1, self.config.levels + 1))

    # ------------------------------------------------------------ directory

    def stored_config(self) -> Dict[str, Any]:
        """The config as config.json holds it: ``control_source`` relative to the
        run directory, so that a control and its ticket run moved together still
        find each other (and no absolute path ties a run to where it started)."""
        data = _json_normalised(self.config.to_dict())
        if self.source_dir is not None:
            data["control_source"] = _relative_path(self.source_dir, self.run_dir)
        return data

    def _prepare_dir(self) -> None:
        """Writes config.json, or checks the saved one matches (levels may change;
        control_source is a location, not a setting: see :mod:`.config`)."""
        current = self.stored_config()
        path = self.run_dir / "config.json"
        if path.exists():
            saved = load_json_object(path, _CONFIG_KEYS)
            diffs = config_differences(saved, current)
            if diffs:
                raise ValueError(f"{self.run_dir} holds a run with a different config; use another directory "
                                 "(runs are never mixed). Differences: " + "; ".join(diffs))
            if saved.get("levels") != current["levels"] and self.writer:
                atomic_write_json(path, current)
            return
        if any(self.run_dir.glob("level_*")):
            raise ValueError(f"{self.run_dir} has level folders but no config.json: it is not a run directory "
                             "this code wrote (or config.json was deleted); use another directory")
        if self.writer:
            atomic_write_json(path, current)

    def _check_source(self) -> None:
        """A control's source must be a finished-enough ticket run with the same recipe."""
        if self.source_dir is None:
            return
        path = self.source_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"control_source {self.source_dir}: no config.json; run the tickets first")
        source = load_json_object(path, _CONFIG_KEYS)
        if source.get("control") != "none":
            raise ValueError(f"control_source {self.source_dir} is itself a control run ({source.get('control')!r})")
        mine = _json_normalised(self.config.to_dict())
        diffs = [f"{k}: source {source.get(k)!r}, control {mine.get(k)!r}" for k in _RECIPE_FIELDS
                 if source.get(k) != mine.get(k)]
        if diffs:
            raise ValueError(f"the control's training recipe differs from its source {self.source_dir}: "
                             + "; ".join(diffs))

    def _is_done(self, level: int, directory: Optional[Path] = None) -> bool:
        d = self.level_dir(level) if directory is None else directory / f"level_{level:02d}"
        if not (d / "done").is_file():
            return False
        missing = [f for f in _LEVEL_FILES if not (d / f).is_file()]
        if missing:
            raise RunFileError(f"{d} is marked done but lacks {missing}; delete the folder to recompute the level")
        if directory is None and self.writer:  # a kill between the done marker and the cleanup leaves it
            (d / "checkpoint.pt").unlink(missing_ok=True)
        return True

    # ----------------------------------------------------------------- models

    def _data_order(self) -> DataOrder:
        return DataOrder(len(self.train_data), self.config.batch_size, seed=self.config.seed)

    def _new_model(self, seed: int) -> nn.Module:
        """A model from the factory initialised under ``seed``, on the device."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.factory()
        return model.to(self.device)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(model.parameters())
        return make_optimizer(self.config, model.parameters())

    def _load_mask(self, path: Path) -> MaskSet:
        return MaskSet.load(path, self._new_model(0))

    # ------------------------------------------------------------------ masks

    def _final_model(self, level: int, masks: MaskSet) -> nn.Module:
        """Level ``level``'s trained model (masked), from its final.pt."""
        model = masks.apply(self._new_model(0))
        path = self.level_dir(level) / "final.pt"
        try:
            model.load_state_dict(load_tensors(path), strict=True)
        except (RuntimeError, TypeError, AttributeError) as err:  # not a state_dict of this model
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunFileError(f"{path}: does not hold this model's weights ({first}); delete "
                               f"{self.level_dir(level)} to recompute the level") from None
        return model

    def _level_metrics(self, level: int) -> Dict[str, Any]:
        """A finished level's metrics.json, checked to hold what the summary reads."""
        path = self.level_dir(level) / "metrics.json"
        metrics = load_json_object(path, _METRICS_KEYS)
        try:
            summary_row(metrics)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise RunFileError(f"{path}: not a level's metrics ({type(err).__name__}: {err}); delete "
                               f"{self.level_dir(level)} to recompute the level") from None
        return metrics

    def _compute_masks(self, level: int) -> MaskSet:
        c = self.config
        if c.control != "none":
            if not self._is_done(level, self.source_dir):
                raise RuntimeError(f"control_source {self.source_dir} has not finished level {level}; "
                                   "run the tickets that far first")
            ticket = self._load_mask(self.source_dir / f"level_{level:02d}" / "mask.pt")
            return control_masks(ticket, c.control, c.effective_control_seed, level, c.control_scope, c.pattern)
        if level == 0:
            return MaskSet.ones(self._new_model(0), c.prunable)
        previous = self._load_mask(self.level_dir(level - 1) / "mask.pt").to(self.device)
        model = self._final_model(level - 1, previous)
        if c.pattern is not None and level == 1:  # the N:M level; later ones prune unstructured on top
            return prune_by_magnitude(model, previous, pattern=c.pattern, incompatible=c.pattern_incompatible)
        return prune_by_magnitude(model, previous, c.rate, c.scope, c.rates or None, c.output_rate)

    def _check_pattern(self, level: int, masks: MaskSet, loaded_from: Optional[Path]) -> None:
        """An N:M run's masks are N:M in every tensor with an N:M form, from level 1 on."""
        c = self.config
        if c.pattern is None or level < 1:
            return
        compatible, _ = nm_layers(masks, c.pattern)
        try:
            check_nm(masks, NMPattern.parse(c.pattern), compatible, what=f"level {level}'s mask")
        except ValueError as err:
            if loaded_from is None:
                raise
            raise RunFileError(f"{loaded_from}: {err}; delete {loaded_from.parent} to recompute the level") from None

    def _masks(self, level: int) -> MaskSet:
        """The level's saved mask if there is one (a resumed level), else computed and saved."""
        path = self.level_dir(level) / "mask.pt"
        if path.is_file():
            masks = self._load_mask(path)
            self._check_pattern(level, masks, loaded_from=path)
        else:
            masks = self._compute_masks(level)
            self._check_pattern(level, masks, loaded_from=None)
            if self.writer:
                masks.save(path)
        if self.sync is not None:
            dist_utils.check_same_on_all_ranks(f"level {level}'s masks", dist_utils.tensor_bytes(masks.values()),
                                               self.sync.group)
        return masks

    # ------------------------------------------------------------ start state

    def _capture_point(self, model, optimizer, scheduler, data_order, iteration: int) -> None:
        if not self.writer:
            return
        point = RewindPoint.capture(model, iteration, optimizer if self.config.rewind_optimizer else None,
                                    scheduler, data_order)
        point.save(self.rewind_point_path)
        save_tensors(model_state(model), self.level_dir(0) / "rewind.pt")

    def _start(self, level: int, masks: MaskSet):
        """Model, optimizer, scheduler, data order and first iteration of a level
        that starts from scratch (a checkpoint, if any, overrides them later)."""
        c = self.config
        seed_everything(derive_seed(c.seed, "train", c.control, level))
        if level == 0 and c.control == "none":
            model = masks.apply(self._new_model(c.seed))
            optimizer = self._optimizer(model)
            return model, optimizer, make_scheduler(c, optimizer), self._data_order(), 0
        if not self.rewind_point_path.is_file():
            raise RunFileError(f"{self.rewind_point_path} is missing: the rewind point of level 0 was lost; "
                               f"delete {self.rewind_point_path.parent / 'level_00'} and rerun to recreate it")
        point = RewindPoint.load(self.rewind_point_path)
        if c.control == "reinit":
            seed = derive_seed(c.effective_control_seed, "reinit", level)
            model = random_reinit(self.factory, masks, seed).to(self.device)
            point = RewindPoint(point.iteration, model_state(model), None, point.scheduler_state, point.data_state)
        else:
            model = masks.apply(self._new_model(0))
        optimizer = self._optimizer(model)
        scheduler = make_scheduler(c, optimizer)
        data_order = self._data_order()
        rewind(model, point, masks,
               optimizer=optimizer if c.rewind_optimizer and point.optimizer_state is not None else None,
               scheduler=scheduler if c.rewind_schedule and scheduler is not None else None,
               data_order=data_order if c.rewind_data_order else None)
        return model, optimizer, scheduler, data_order, point.iteration

    # ------------------------------------------------------------------ levels

    def _train(self, level: int, masks: MaskSet, progress: Optional[str]) -> Tuple[nn.Module, LevelTraining]:
        c = self.config
        model, optimizer, scheduler, data_order, start = self._start(level, masks)
        directory = self.level_dir(level)
        if self.writer and not (directory / "rewind.pt").is_file() and (level > 0 or c.control != "none"):
            save_tensors(model_state(model), directory / "rewind.pt")
        ticket_level0 = level == 0 and c.control == "none"
        k = c.rewind_iteration

        def after_step(iteration: int) -> None:
            if ticket_level0 and iteration == k:
                self._capture_point(model, optimizer, scheduler, data_order, iteration)

        epoch = self.batches_per_epoch
        trainer = LevelTraining(
            model=model, optimizer=optimizer, scheduler=scheduler, data_order=data_order,
            train_data=self.train_data, train_step=self.train_step, evaluate=self.evaluate,
            eval_splits=self.eval_splits, start_iteration=start, total_iterations=self.total_iterations,
            eval_every=c.eval_every or epoch, checkpoint_every=min(c.checkpoint_every or epoch, epoch),
            checkpoint_path=directory / "checkpoint.pt", device=self.device, after_step=after_step,
            progress=progress, writer=self.writer, sync=self.sync,
            train_model=self._ddp(model), shard=None if self.sync is None else self._shard)
        resumed = trainer.resume_if_possible()
        if ticket_level0:
            if not resumed and k == 0:
                self._capture_point(model, optimizer, scheduler, data_order, 0)
            if self.writer and trainer.iteration >= k and not self.rewind_point_path.is_file():
                raise RunFileError(f"{self.rewind_point_path} is missing but level 0 has passed iteration {k}; "
                                   f"delete {self.level_dir(0)} to retrain it")
        trainer.run()
        return model, trainer

    def _ddp(self, model: nn.Module) -> nn.Module:
        """The module train_step gets: a DDP wrapper in a distributed run."""
        if self.sync is None:
            return model
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=self.sync.group)

    def _check_pruned_zero(self, model: nn.Module, masks: MaskSet, level: int) -> None:
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            if bool(params[name].detach()[~mask.to(self.device)].ne(0).any()):
                raise RuntimeError(f"level {level}: pruned weights of {name!r} are not zero after training "
                                   "(train_step modified weights outside the optimizer?)")

    def _finish(self, level: int, masks: MaskSet, model: nn.Module, trainer: LevelTraining,
                setup_seconds: float) -> Dict[str, Any]:
        started = time.perf_counter()
        self._check_pruned_zero(model, masks, level)
        directory = self.level_dir(level)
        if self.writer:
            save_tensors({k: v.cpu() for k, v in model.state_dict().items()}, directory / "final.pt")
        remaining = masks.remaining()
        metrics = {
            "level": level, "control": self.config.control, "seed": self.config.seed,
            "remaining": remaining.total, "remaining_per_layer": remaining.per_layer,
            "kept": remaining.kept, "size": remaining.size,
            "start_iteration": trainer.start_iteration, "iterations": trainer.total,
            "resumed_from_iteration": trainer.resumed_from,
            "evaluations": trainer.evaluations,
            "early_stop": early_stop(trainer.evaluations),
            "final": trainer.evaluations[-1] if trainer.evaluations else None,
            "train_time_s": trainer.train_seconds, "step_time_ms": trainer.step_time_ms,
        }
        metrics["wall_time_s"] = setup_seconds + trainer.elapsed + (time.perf_counter() - started)
        if self.writer:
            atomic_write_json(directory / "metrics.json", metrics)
            # The done marker goes last: everything the level produced is on disk.
            atomic_write_text(directory / "done", json.dumps({"level": level, "finished": time.time()}) + "\n")
            (directory / "checkpoint.pt").unlink(missing_ok=True)
        self._barrier()  # the other ranks read this level's files from here on
        return metrics

    def run_level(self, level: int) -> Dict[str, Any]:
        """Runs (or, if finished, reads) one level; returns its metrics."""
        if self._is_done(level):
            return self._level_metrics(level)
        started = time.perf_counter()
        masks = self._masks(level).to(self.device)
        remaining = masks.remaining().total
        name = "ticket" if self.config.control == "none" else self.config.control
        progress = f"{name} level {level} ({100 * remaining:.1f}%)" if self.progress else None
        setup = time.perf_counter() - started
        try:
            model, trainer = self._train(level, masks, progress)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{name} level {level}: {err}") from None
        metrics = self._finish(level, masks, model, trainer, setup)
        if self.progress:
            self._print_level(name, metrics)
        return metrics

    @staticmethod
    def _print_level(name: str, m: Dict[str, Any]) -> None:
        from tqdm.auto import tqdm
        stop = m["early_stop"] or {}
        accuracy = stop.get("test_accuracy")
        accuracy = "n/a" if accuracy is None else f"{100 * accuracy:.2f}%"
        tqdm.write(f"{name} level {m['level']}: {100 * m['remaining']:.1f}% remaining, early stop at iteration "
                   f"{stop.get('iteration')}, test accuracy there {accuracy}, {m['wall_time_s']:.1f} s")

    def summary(self) -> List[Dict[str, Any]]:
        """The summary rows (as in summary.csv) of the finished levels, read from disk."""
        return [summary_row(self._level_metrics(level)) for level in self.levels if self._is_done(level)]

    def _write_summary(self) -> List[Dict[str, Any]]:
        rows = self.summary()
        if not self.writer:
            return rows
        atomic_write_text(self.run_dir / "summary.csv", summary_csv(rows))
        atomic_write_json(self.run_dir / "summary.json", {"config": self.stored_config(), "levels": rows})
        return rows

    def final_model(self, level: int) -> nn.Module:
        """A finished level's trained network, read from its files: masked modules
        (pruned weights zero); :func:`pyprune_ext.nn.unmask_model` turns it into
        plain torch modules."""
        if not self._is_done(level):
            raise ValueError(f"level {level} of {self.run_dir} has not finished")
        masks = self._load_mask(self.level_dir(level) / "mask.pt").to(self.device)
        return self._final_model(level, masks)

    def run(self, on_level: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
        """Runs every level not finished yet; returns the metrics of all levels.
        ``on_level(metrics)`` is called after each level (finished now or earlier)."""
        with _deterministic(self.config.deterministic):
            if self.writer:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._prepare_dir()
            self._barrier()  # config.json is written: the other ranks check it
            if not self.writer:
                if not (self.run_dir / "config.json").is_file():
                    raise RuntimeError(f"rank {self.rank} does not see {self.run_dir / 'config.json'}, which rank 0 "
                                       "has written: every rank must see the same run directory (one machine, or "
                                       "a shared file system)")
                self._prepare_dir()
            self._check_source()
            results = []
            for level in self.levels:
                results.append(self.run_level(level))
                self._write_summary()
                if on_level is not None:
                    on_level(results[-1])
        return results


def run_lottery(model_factory: Union[nn.Module, ModelFactory], train_step: TrainStep, evaluate: Evaluate,
                config: LotteryConfig, run_dir: PathLike, **kwargs) -> List[Dict[str, Any]]:
    """``LotteryRun(...).run()`` in one call; see :class:`LotteryRun`."""
    return LotteryRun(model_factory, train_step, evaluate, config, run_dir, **kwargs).run()
