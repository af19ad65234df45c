"""Readers of what the GPU check's tools print: compute-sanitizer's summary and
the per-test outcomes written by tests/conftest.py's ``--outcomes-json``.

Pure functions of text and dicts (no torch, no subprocess), so that
tests/test_gpu_check.py can feed them synthetic inputs.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional

SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
# What compute-sanitizer prints when it cannot run on this machine (KINDS.md: on
# gVisor it refuses the device, then fails at the first allocation with error 999).
UNSUPPORTED_PATTERNS = (
    "Device not supported",
    "device is not supported",
    "Unable to find injection library",
    "Target application terminated before first instrumented API call",
)
# Lines that start a reported problem; the kernel name follows on an "at ..." line.
ERROR_STARTS = ("Invalid __global__", "Invalid __shared__", "Invalid __local__", "Race reported",
                "Program hit", "Error: ", "Uninitialized __global__", "Leaked ")
MAX_ERROR_LINES = 10


def sanitizer_report(text: str) -> Dict:
    """{"errors": total of every "ERROR SUMMARY: N errors" line (None when none
    was printed, e.g. the run was killed), "unsupported": why the tool could not
    run (None when it ran), "first_errors": the first few reported problems}."""
    counts = [int(m.group(1)) for m in SUMMARY.finditer(text)]
    unsupported = next((line.strip(" =") for line in text.splitlines()
                        if any(p in line for p in UNSUPPORTED_PATTERNS)), None)
    return {
        "errors": sum(counts) if counts else None,
        # where the tool refused the device, its error count says nothing about our kernels
        "unsupported": unsupported,
        "first_errors": first_errors(text.splitlines()),
    }


def first_errors(lines: List[str]) -> List[str]:
    """The first MAX_ERROR_LINES problems, each with the kernel it was in."""
    found = []
    for i, line in enumerate(lines):
        body = line.lstrip("= ").strip()
        if body.startswith(ERROR_STARTS):
            where = next((l.lstrip("= ").strip() for l in lines[i + 1:i + 4] if l.lstrip("= ").startswith("at ")), "")
            found.append(f"{body} {where}".strip())
            if len(found) == MAX_ERROR_LINES:
                break
    return found


def count_outcomes(collected: Dict[str, Dict], ran: Dict[str, Dict], gpu_present: bool) -> Dict:
    """Summarises one pytest run.

    ``collected``: the --outcomes-json of a ``--collect-only`` run over the same
    tests (which of them exist, and which are CUDA tests); ``ran``: that of the
    real run. A CUDA test that skipped, or never reported (a crash, a timeout),
    while a GPU is present is a defect: ``ok`` is then False and ``problems``
    says which."""
    cuda_ids = sorted({i for i, e in collected.items() if e["cuda"]} | {i for i, e in ran.items() if e["cuda"]})
    by_outcome = {name: sorted(i for i, e in ran.items() if e["outcome"] == name)
                  for name in ("passed", "failed", "skipped")}
    cuda_ran = [i for i in cuda_ids if ran.get(i, {}).get("outcome") in ("passed", "failed")]
    cuda_skipped = [i for i in cuda_ids if ran.get(i, {}).get("outcome") == "skipped"]
    not_reported = sorted(set(collected) - set(i for i, e in ran.items() if e["outcome"] != "collected"))
    summary = {
        "passed": len(by_outcome["passed"]), "failed": len(by_outcome["failed"]),
        "skipped": len(by_outcome["skipped"]), "collected": len(collected),
        "cuda_total": len(cuda_ids), "cuda_ran": len(cuda_ran),
        "cuda_skipped": cuda_skipped,
        "cuda_skip_reasons": sorted({ran[i]["skip_reason"] or "" for i in cuda_skipped}),
        "failed_ids": by_outcome["failed"],
        "not_reported": not_reported,
    }
    summary["problems"] = outcome_problems(summary, gpu_present)
    summary["ok"] = not summary["problems"]
    return summary


def collection_counts(collected: Dict[str, Dict]) -> Dict:
    """What a --collect-only run tells: how many tests, how many of them CUDA tests."""
    return {"collected": len(collected), "cuda_total": sum(1 for e in collected.values() if e["cuda"]),
            "cuda_ran": 0, "passed": 0, "failed": 0, "skipped": 0}


def outcome_problems(summary: Dict, gpu_present: bool) -> List[str]:
    problems = []
    if summary["failed"]:
        problems.append(f"{summary['failed']} tests failed")
    if summary["not_reported"]:
        problems.append(f"{len(summary['not_reported'])} collected tests never reported (crash or timeout)")
    if summary["cuda_total"] == 0:
        problems.append("no CUDA test was found: the cuda marker is missing")
    if gpu_present and summary["cuda_ran"] < summary["cuda_total"]:
        problems.append(f"only {summary['cuda_ran']} of {summary['cuda_total']} CUDA tests ran with a GPU present "
                        f"({len(summary['cuda_skipped'])} skipped)")
    return problems


def pytest_counts(outcomes: Dict[str, Dict]) -> Dict[str, int]:
    """passed / failed / skipped counts of one --outcomes-json."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for entry in outcomes.values():
        if entry["outcome"] in counts:
            counts[entry["outcome"]] += 1
    return counts


def dotted_arch(capability: Optional[Iterable[int]]) -> Optional[str]:
    """(9, 0) -> "9.0", the spelling TORCH_CUDA_ARCH_LIST takes."""
    if not capability:
        return None
    major, minor = list(capability)[:2]
    return f"{major}.{minor}"
