"""Per-level metrics: evaluation records, the early-stopping point, the summary table.

An evaluation record is a flat dict: ``iteration``, ``train_loss_running`` (mean
training loss of the steps since the previous evaluation) and
``<split>_<metric>`` for whatever ``evaluate(model, split)`` returned
(``val_loss``, ``val_accuracy``, ``test_loss``, ``test_accuracy``, ...).

The early-stopping iteration is the iteration of minimum validation loss (the
first one on ties), as in Frankle & Carbin 2019.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["early_stop", "summary_csv", "summary_row"]


def early_stop(evaluations: Sequence[Mapping[str, Any]], key: str = "val_loss") -> Optional[Dict[str, Any]]:
    """The evaluation with the smallest ``key`` (the earliest on ties; NaN never
    wins), or None when there is none."""
    best = None
    for record in evaluations:
        value = record.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if best is None or value < best[key]:
            best = record
    return None if best is None else dict(best)


def _get(record: Optional[Mapping[str, Any]], key: str):
    return None if record is None else record.get(key)


def summary_row(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """One row of the summary table from a level's metrics.json content."""
    stop, final = metrics.get("early_stop"), metrics.get("final")
    row: Dict[str, Any] = {
        "level": metrics["level"],
        "remaining_pct": round(100 * metrics["remaining"], 4),
    }
    for name, fraction in metrics["remaining_per_layer"].items():
        row[f"remaining_pct[{name}]"] = round(100 * fraction, 4)
    row.update({
        "early_stop_iteration": _get(stop, "iteration"),
        "early_stop_val_loss": _get(stop, "val_loss"),
        "early_stop_val_accuracy": _get(stop, "val_accuracy"),
        "early_stop_test_accuracy": _get(stop, "test_accuracy"),
        "final_iteration": _get(final, "iteration"),
        "final_val_accuracy": _get(final, "val_accuracy"),
        "final_test_accuracy": _get(final, "test_accuracy"),
        "wall_time_s": round(metrics["wall_time_s"], 3),
        "step_time_ms": round(metrics["step_time_ms"], 4),
    })
    return row


def summary_csv(rows: List[Dict[str, Any]]) -> str:
    """CSV text of summary rows (union of their columns, in first-seen order)."""
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return out.getvalue()
