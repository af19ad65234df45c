"""LotteryConfig: every setting that shapes a lottery-ticket run's results.

It is saved as ``config.json`` in the run directory; rerunning in the same
directory with a different config is an error (two runs never mix), except for
``levels``: asking for more levels extends a finished run, fewer stops early.

Where things are is not part of what a run is: ``control_source`` is saved
relative to the run directory and left out of the comparison, so a run directory
copied or moved elsewhere (a control together with its ticket run, or pointed at
the ticket run's new place) resumes. What the control's masks mean is checked on
the source itself: its training recipe must match (see :class:`LotteryRun`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .controls import CONTROLS
from .nm import NMPattern

__all__ = ["LotteryConfig", "config_differences"]

_SCOPES = ("layer", "global")
_OPTIMIZERS = ("adam", "adamw", "sgd")
# Fields that may differ between the saved config and a rerun in the same directory:
# the number of levels (extend or stop early), and locations (a moved run resumes).
_EXTENDABLE = ("levels",)
_LOCATIONS = ("control_source",)


@dataclass
class LotteryConfig:
    """Settings of an iterative-magnitude-pruning run.

    Pruning:
        levels: pruning levels after the dense level 0; the run trains
            ``levels + 1`` networks (level L keeps about ``(1-rate)^L``).
        rate: fraction of the remaining weights pruned per level.
        rates: per-layer rates by parameter name, module name or layer type
            name (``{"Conv2d": 0.1, "Linear": 0.2}``); ``scope="layer"`` only.
        output_rate: rate of the output layer (the last prunable tensor), e.g.
            0.1 for the paper's LeNet / Conv-N.
        scope: ``"layer"`` or ``"global"`` (one threshold over all tensors).
        prunable: parameter names or fnmatch patterns to prune; None = the
            weights of Linear and convolution layers.
        pattern: ``"2:4"`` or another N:M: level 1 makes every prunable tensor
            with an N:M form N:M (a fixed ``1 - N/M`` of it pruned by magnitude,
            :mod:`~pyprune_ext.lottery.nm`); levels 2.. prune ``rate`` of the
            remaining weights unstructured on top, which keeps the pattern. The
            masks are checked to be N:M at every level, resumed ones too.
        pattern_incompatible: a prunable tensor without an N:M form (input dim
            not a multiple of M): ``"dense"`` (level 1 leaves it unpruned) or
            ``"error"`` (refused by name).
    Rewinding:
        rewind_iteration: k; 0 = reset to the initialisation.
        rewind_optimizer: also restore the optimizer state at k (else a fresh
            optimizer starts at k).
        rewind_schedule: restore the LR-schedule position at k (else the
            schedule starts from 0 at k).
        rewind_data_order: continue the data order from step k (else from 0).
    Training (per level; every level trains up to the same final iteration, so
    a rewound level trains ``iterations - k`` steps):
        iterations or epochs: length of training (exactly one of the two).
        batch_size: training batch size.
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"``; lr;
            optimizer_kwargs (momentum, weight_decay, betas, ...).
        lr_milestones, lr_gamma: step decay at these iterations.
        warmup_iterations: linear LR warm-up.
        eval_every: iterations between evaluations (None: once per epoch); the
            last iteration is always evaluated.
        checkpoint_every: iterations between resume checkpoints (None, or
            anything above an epoch: once per epoch).
        eval_train: also evaluate on the whole training split at each evaluation
            (the running mean training loss is always recorded).
    Controls:
        control: ``"none"`` (winning tickets), ``"reinit"`` (the ticket masks of
            ``control_source`` on a fresh initialisation) or ``"random"``
            (random masks with their sparsity, ``control_scope``, on the
            source's rewind point). Controls train levels 1..levels.
        control_source: run directory of the ticket run the control reads.
        control_seed: seeds re-initialisation / random masks (default: seed + 1).
        control_scope: ``"layer"`` (keep per-layer counts) or ``"global"``.
    Other:
        seed: seeds the initialisation, the data order and training.
        device: ``"cpu"``, ``"cuda"``, ...
        deterministic: ``torch.use_deterministic_algorithms`` during the run.
    """

    levels: int = 10
    rate: float = 0.2
    rates: Dict[str, float] = field(default_factory=dict)
    output_rate: Optional[float] = None
    scope: str = "layer"
    prunable: Optional[List[str]] = None
    pattern: Optional[str] = None
    pattern_incompatible: str = "dense"
    rewind_iteration: int = 0
    rewind_optimizer: bool = False
    rewind_schedule: bool = True
    rewind_data_order: bool = True
    iterations: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 60
    optimizer: str = "adam"
    lr: float = 1.2e-3
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    lr_milestones: List[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_iterations: int = 0
    eval_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    eval_train: bool = False
    control: str = "none"
    control_source: Optional[str] = None
    control_seed: Optional[int] = None
    control_scope: str = "layer"
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent setting."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"LotteryConfig: {message}")

        check(isinstance(self.levels, int) and self.levels >= 0, f"levels must be an int >= 0, got {self.levels!r}")
        check(0.0 <= self.rate <= 1.0, f"rate must lie in [0, 1], got {self.rate}")
        check(self.output_rate is None or 0.0 <= self.output_rate <= 1.0,
              f"output_rate must lie in [0, 1], got {self.output_rate}")
        check(all(isinstance(k, str) for k in self.rates),
              "rates keys must be strings (parameter, module or layer type names) so the config saves as JSON")
        check(self.scope in _SCOPES, f"scope must be one of {_SCOPES}, got {self.scope!r}")
        if self.pattern is not None:
            try:
                self.pattern = str(NMPattern.parse(self.pattern))
            except ValueError as err:
                check(False, str(err))
        check(self.pattern_incompatible in ("dense", "error"),
              f"pattern_incompatible must be 'dense' or 'error', got {self.pattern_incompatible!r}")
        check(self.scope == "layer" or (not self.rates and self.output_rate is None),
              "rates/output_rate apply to scope='layer' only")
        check((self.iterations is None) != (self.epochs is None),
              "give exactly one of iterations and epochs")
        check(self.iterations is None or self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")
        check(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.rewind_iteration >= 0, f"rewind_iteration must be >= 0, got {self.rewind_iteration}")
        check(self.iterations is None or self.rewind_iteration < self.iterations,
              f"rewind_iteration={self.rewind_iteration} must be below iterations={self.iterations}")
        check(self.optimizer in _OPTIMIZERS, f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.warmup_iterations >= 0, f"warmup_iterations must be >= 0, got {self.warmup_iterations}")
        check(list(self.lr_milestones) == sorted(self.lr_milestones), "lr_milestones must be increasing")
        check(self.eval_every is None or self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        check(self.checkpoint_every is None or self.checkpoint_every >= 1,
              f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check(self.control in CONTROLS, f"control must be one of {CONTROLS}, got {self.control!r}")
        check(self.control == "none" or self.control_source is not None,
              f"control={self.control!r} needs control_source (the ticket run directory to read masks from)")
        check(self.control_scope in _SCOPES, f"control_scope must be one of {_SCOPES}, got {self.control_scope!r}")

    # ---------------------------------------------------------------- derived

    def total_iterations(self, batches_per_epoch: int) -> int:
        """Training length in iterations (``epochs`` converted, rounded up)."""
        if self.iterations is not None:
            return self.iterations
        return max(1, math.ceil(self.epochs * batches_per_epoch))

    @property
    def effective_control_seed(self) -> int:
        return self.seed + 1 if self.control_seed is None else self.control_seed

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LotteryConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LotteryConfig: unknown setting(s) {unknown}")
        return cls(**data)


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Human-readable differences between two config dicts, ignoring ``levels``
    and ``control_source`` (a location, not a setting)."""
    out = []
    # a setting added after a run was made is absent from its saved config: it ran with the default
    defaults = {f.name: f.default for f in dataclasses.fields(LotteryConfig)
                if f.default is not dataclasses.MISSING}
    saved = {**{k: v for k, v in defaults.items() if k in current}, **saved}
    for key in sorted(set(saved) | set(current)):
        if key in _EXTENDABLE or key in _LOCATIONS:
            continue
        if saved.get(key, "<absent>") != current.get(key, "<absent>"):
            out.append(f"{key}: saved {saved.get(key, '<absent>')!r}, now {current.get(key, '<absent>')!r}")
    return out
