"""Taylor-importance structured pruning (Molchanov et al., CVPR 2019): channel
importance estimators, the iterative pruning schedule, and physical removal of
the pruned channels through :mod:`pyprune_ext.graph`."""

from .estimators import CRITERIA, GroupScores, TaylorImportance
from .pruner import PruneStep, TaylorPruner, Target, apply_plan
from .report import PruningReport, estimate_cost

__all__ = ["CRITERIA", "GroupScores", "PruneStep", "PruningReport", "Target", "TaylorImportance",
           "TaylorPruner", "apply_plan", "estimate_cost"]
