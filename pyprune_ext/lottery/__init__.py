"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
Frankle et al. 2019/2020), its controls, and a resumable runner.

High level: :class:`LotteryRun` / :func:`run_lottery` with a :class:`LotteryConfig`.
Pieces for custom loops: :class:`MaskSet`, :func:`prune_by_magnitude`,
:func:`select_smallest`, :class:`RewindPoint` / :func:`rewind`,
:func:`random_reinit` / :func:`random_prune`, :class:`DataOrder`; N:M masks
(``prune_by_magnitude(..., pattern="2:4")``, :class:`NMPattern`, :func:`is_nm`).
Masked training goes through :mod:`pyprune_ext.nn` (pruned weights stay exactly zero).
"""

from .config import LotteryConfig
from .controls import CONTROLS, control_masks, level_masks, random_prune, random_prune_nm, random_reinit
from .data_order import DataOrder, fetch_batch
from .masks import MaskSet, Remaining, prunable_parameters
from .metrics import early_stop
from .nm import NMPattern, is_nm, nm_select
from .pruning import count_to_prune, layer_rates, nm_layers, prune_by_magnitude
from .rewinding import RewindPoint, rewind
from .run import LotteryRun, run_lottery
from .selection import native_op_available, select_smallest, select_smallest_reference
from .tasks import classification_evaluator, classification_step

__all__ = [
    "CONTROLS", "DataOrder", "LotteryConfig", "LotteryRun", "MaskSet", "NMPattern", "Remaining", "RewindPoint",
    "classification_evaluator", "classification_step", "control_masks", "count_to_prune", "early_stop",
    "fetch_batch", "is_nm", "layer_rates", "level_masks", "native_op_available", "nm_layers", "nm_select",
    "prunable_parameters", "prune_by_magnitude", "random_prune", "random_prune_nm", "random_reinit", "rewind", "run_lottery", "select_smallest", "select_smallest_reference",
]
