"""Taylor-importance structured pruning (Molchanov et al., CVPR 2019): channel
importance estimators, the importance protocol and registry (your own criteria
too), the iterative pruning schedule, and physical removal of the pruned
channels through :mod:`pyprune_ext.graph`."""

from .estimators import CRITERIA, GroupScores, TaylorImportance
from .importance import Importance, register_importance, registered_importances, unregister_importance
from .pruner import PruneStep, TaylorPruner, Target, apply_plan
from .report import PruningReport, estimate_cost

__all__ = ["CRITERIA", "GroupScores", "Importance", "PruneStep", "PruningReport", "Target", "TaylorImportance",
           "TaylorPruner", "apply_plan", "estimate_cost", "register_importance", "registered_importances",
           "unregister_importance"]
