"""PNG plots of a run's results (matplotlib, no display needed), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from ..lottery.io import atomic_write


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def taylor_accuracy_vs_flops(curve: Sequence[Dict], final: Dict, path: Path) -> Path:
    """Validation accuracy of the masked model after each pruning step against the
    FLOPs kept, and the fine-tuned pruned model's test accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([100 * p["flops_kept"] for p in curve], [100 * p["val_accuracy"] for p in curve],
            "o-", ms=3, label="while pruning (validation)")
    ax.plot([100 * final["flops_kept"]], [100 * final["test_accuracy"]], "r*", ms=12,
            label="after fine-tuning (test)")
    ax.plot([100.0], [100 * final["dense_test_accuracy"]], "ks", ms=7, label="dense (test)")
    ax.set_xlabel("FLOPs kept (%)")
    ax.set_ylabel("accuracy (%)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Taylor pruning: accuracy vs FLOPs kept")
    return _save(fig, path)


def taylor_channels_per_layer(layers: Sequence[Dict], path: Path) -> Path:
    """Output channels of each layer before and after pruning."""
    plt = _pyplot()
    names = [l["name"] for l in layers]
    before = [l["out_before"] for l in layers]
    after = [l["out_after"] for l in layers]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(names) + 1)))
    rows = range(len(names))
    ax.barh(rows, before, color="lightgray", label="before")
    ax.barh(rows, after, color="tab:blue", label="after")
    ax.set_yticks(list(rows), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels / features")
    ax.legend()
    ax.set_title("Channels kept per layer")
    return _save(fig, path)


def lottery_curves(series: Dict[str, List[Dict]], key: str, ylabel: str, title: str, path: Path) -> Path:
    """One line per variant (ticket / reinit / random) of ``key`` against the
    remaining weights (log scale, sparsest on the right)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, rows in series.items():
        points = [(r["remaining_pct"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ys = [100 * y for y in ys] if key.endswith("accuracy") else ys
            ax.plot(xs, ys, "o-", ms=4, label=variant)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    remaining = sorted({r["remaining_pct"] for rows in series.values() for r in rows})
    ax.set_xticks([round(v, 1) for v in remaining])
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)
