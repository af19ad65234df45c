"""Shared pieces of the benchmarks: timing, machine description, tables, JSON."""

from __future__ import annotations

import platform

import torch
from torch.utils.benchmark import Timer

# Result files are written like every other file of the project: atomically.
from ..lottery.io import atomic_write_json as write_json  # noqa: F401  (used by the benchmarks)


def median_seconds(fn, device: str, min_run_time: float = 0.5) -> float:
    """Median time of fn() over repeated runs after a warm-up. The Timer
    synchronises CUDA; on the CPU it runs with all of torch's threads (its own
    default would be one thread)."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def machine_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, ready to paste into the README."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
