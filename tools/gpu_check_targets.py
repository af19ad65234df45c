"""The GPU benchmark targets of the project's issues, computed from the JSON
files that ``pyprune bench <name> --json-dir DIR`` writes.

Each target names the issue it comes from and how its value is computed. A
target whose benchmark does not exist yet (or has no rows for it) is listed with
value None and ``pending`` saying what is missing: nothing here makes up a value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

LINEAR_4096 = ("4096x4096 batch 64", "4096x4096 batch 256")
CONV_CASES = ("conv3x3 64->64 56x56 batch 32", "conv3x3 stride 2 64->128 56x56 batch 32")
LOW_DENSITY = 0.05


class Pending(Exception):
    """The benchmark rows this target needs are not there; the message says what is missing."""


@dataclass(frozen=True)
class TargetSpec:
    name: str
    issue: int
    target: str            # as the issue states it, e.g. ">= 1.5"
    definition: str        # how the value is computed from the benchmark rows
    compute: Callable[[Dict[str, dict]], tuple]  # bench JSONs by name -> (value, detail)

    def met(self, value: float) -> bool:
        op, bound = self.target.split()
        return value >= float(bound) if op == ">=" else value <= float(bound)


# ---------------------------------------------------------------- helpers

def masked_rows(bench: Dict[str, dict]) -> List[dict]:
    """Rows of every masked-benchmark file (fp32 `masked`, bf16 `masked_bf16`), each tagged with its dtype."""
    rows = []
    for name in ("masked", "masked_bf16"):
        data = bench.get(name)
        if data:
            rows += [dict(r, dtype=data.get("dtype", "float32")) for r in data["results"]]
    if not rows:
        raise Pending("no masked benchmark JSON (pyprune bench masked --device cuda --json-dir DIR)")
    return rows


def select(rows, cases, backward, max_density=1.0, density=None):
    chosen = [r for r in rows if r["case"] in cases and r["backward"] == backward
              and r["density"] <= max_density and (density is None or r["density"] == density)]
    if not chosen:
        raise Pending(f"the masked benchmark has no rows for {', '.join(cases)} "
                      f"({'forward+backward' if backward else 'forward'})")
    return chosen


def ratio_table(rows, numerator, denominator, missing):
    """[(label, numerator_ms / denominator_ms)] over rows; Pending(missing) when a method was not timed."""
    table = []
    for r in rows:
        if numerator not in r["ms"] or denominator not in r["ms"]:
            raise Pending(missing)
        label = f"{r['case']} {r['dtype']} {'fwd+bwd' if r['backward'] else 'fwd'} {100 * r['density']:g}%"
        table.append((label, r["ms"][numerator] / r["ms"][denominator]))
    return table


def worst(table, lowest: bool):
    """(the worst ratio, {label: ratio}): the minimum of speed-ups, the maximum of time ratios."""
    pick = min if lowest else max
    return pick(v for _, v in table), {label: round(v, 4) for label, v in table}


SPARSE_MISSING = "the benchmark did not time the sparse path here"


def sparse_linear_speedup(backward, max_density=LOW_DENSITY, density=None):
    def compute(bench):
        rows = select(masked_rows(bench), LINEAR_4096, backward, max_density, density)
        return worst(ratio_table(rows, "dense", "sparse", SPARSE_MISSING), lowest=True)
    return compute


def masked_linear_time_ratio(bench):
    rows = [r for backward in (False, True) for r in select(masked_rows(bench), LINEAR_4096, backward)]
    # The dense-masked path MaskedLinear trains on: its weight is zeroed after every step.
    return worst(ratio_table(rows, "zeroed", "dense", "the benchmark did not time masked_linear_prezeroed"),
                 lowest=False)


def sparse_conv_speedup(bench):
    rows = select(masked_rows(bench), CONV_CASES, True, LOW_DENSITY)
    return worst(ratio_table(rows, "dense", "sparse", SPARSE_MISSING), lowest=True)


def nm_speedup(bench):
    data = bench.get("semi_structured")
    if not data:
        raise Pending("no semi_structured benchmark JSON (pyprune bench semi_structured --json FILE)")
    table = [(f"{r['case']} {r['dtype']} fwd", r["ms"]["dense"] / r["ms"]["2:4 fwd"])
             for r in data["results"] if r["batch"] >= 2048 and r["dtype"] == "bfloat16"]
    if not table:
        raise Pending("the semi_structured benchmark has no bfloat16 rows at batch >= 2048")
    return worst(table, lowest=True)


def taylor_copy_share(bench):
    data = bench.get("taylor")
    if not data:
        raise Pending("no taylor benchmark JSON (pyprune bench taylor --device cuda --json-dir DIR)")
    table = [(f"{'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype']}", r["fraction_of_reference"])
             for r in data["results"] if r.get("reference") == "copy"]
    if not table:
        raise Pending("the taylor benchmark has no rows against a device-to-device copy (a CPU run?)")
    return worst(table, lowest=True)


def not_benchmarked(what):
    def compute(bench):
        raise Pending(what)
    return compute


TARGETS = [
    TargetSpec("taylor_stats_of_copy_bandwidth", 2, ">= 0.85",
               "taylor_channel_stats GB/s over a device-to-device copy's, the lowest over the CUDA cases",
               taylor_copy_share),
    TargetSpec("sparse_linear_5pct_vs_cublas", 21, ">= 1.5",
               "dense F.linear ms / sparse_masked_linear ms, forward, 4096x4096 batch 64 and 256, density <= 5%, "
               "lowest over the cases (fp32, and bf16 where masked_bf16 ran); also issue 3's GPU target",
               sparse_linear_speedup(backward=False)),
    TargetSpec("sparse_linear_2pct_vs_cublas", 21, ">= 3.0",
               "as sparse_linear_5pct_vs_cublas, at 2% density",
               sparse_linear_speedup(backward=False, density=0.02)),
    TargetSpec("sparse_linear_fwd_bwd_5pct_vs_cublas", 21, ">= 1.3",
               "as sparse_linear_5pct_vs_cublas, forward+backward",
               sparse_linear_speedup(backward=True)),
    TargetSpec("masked_linear_vs_dense", 21, "<= 1.05",
               "masked_linear_prezeroed ms (MaskedLinear's dense-masked path on a zeroed weight) / dense F.linear "
               "ms, 4096x4096 batch 64 and 256, every density, forward and forward+backward, highest over the cases",
               masked_linear_time_ratio),
    TargetSpec("sparse_conv_5pct_vs_cudnn", 22, ">= 1.5",
               "dense F.conv2d ms / sparse_masked_conv2d ms, forward+backward, 3x3 64->64 56x56 and 3x3 stride-2 "
               "64->128, batch 32, density <= 5%, lowest over the cases",
               sparse_conv_speedup),
    TargetSpec("nm_2to4_vs_dense_bf16", 22, ">= 1.3",
               "dense cuBLAS bf16 ms / 2:4 MaskedLinear ms, forward, 4096x4096, batch >= 2048",
               nm_speedup),
]


# ---------------------------------------------------------------- assembly

def load_bench_jsons(directory: Optional[str]) -> Dict[str, dict]:
    """{benchmark name: its JSON} for every <name>.json in directory."""
    found = {}
    if directory and os.path.isdir(directory):
        for file in sorted(os.listdir(directory)):
            if file.endswith(".json"):
                with open(os.path.join(directory, file)) as f:
                    found[file[:-len(".json")]] = json.load(f)
    return found


def evaluate(bench: Dict[str, dict], dry_run: bool = False) -> List[dict]:
    """One entry per target: name, issue, target, value, met (and detail, or pending)."""
    entries = []
    for spec in TARGETS:
        entry = {"name": spec.name, "issue": spec.issue, "target": spec.target, "definition": spec.definition,
                 "value": None, "met": None}
        if dry_run:
            entry["reason"] = "dry run"
        else:
            try:
                value, detail = spec.compute(bench)
                entry.update(value=round(value, 4), met=spec.met(value), detail=detail)
            except Pending as missing:
                entry["pending"] = str(missing)
        entries.append(entry)
    return entries
