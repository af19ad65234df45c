"""The GPU check (scripts/gpu_check.sh -> tools/gpu_check.py) in its dry mode, and
its parsers on synthetic input: the sanitizer's summary, the counting that fails
when a CUDA test skips with a GPU present, the targets from benchmark JSONs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402
import gpu_check_parse as parse  # noqa: E402
import gpu_check_targets as targets  # noqa: E402

# what the device tool brings back from $OUT (its README): at most 8 files, 2 folders down, plain names
DEVICE_FILE_LIMIT = 8
PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module's tests: (exit code, its JSON, the --out folder)."""
    base = tmp_path_factory.mktemp("gpu_check")
    out = base / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run",
                           "--results-dir", str(base / "results"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(base / "results" / "gpu_check.json") as f:
        return proc, json.load(f), out


def test_dry_run_counts_cuda_tests_and_lists_targets(dry_run):
    proc, result, _ = dry_run
    assert result["dry_run"] is True and result["ok"] is True and result["problems"] == []
    assert result["collect"]["cuda_total"] > 0 and result["pytest"]["cuda_total"] == result["collect"]["cuda_total"]
    assert result["pytest"]["cuda_ran"] == 0 and result["pytest"]["not_run"] == "dry run"
    assert result["build"]["skipped"] == "dry run" and "build_ext" in result["build"]["command"]
    assert result["sanitizer"]["skipped"] == "dry run"
    assert result["cli"]["pyprune info"]["rc"] == 0
    assert {t["name"] for t in result["targets"]} == {s.name for s in targets.TARGETS}
    assert all(t["value"] is None and t["met"] is None and t["reason"] == "dry run" for t in result["targets"])
    assert result["commit"]["head"] and "DRY RUN" in proc.stdout


def test_dry_run_prunes_and_times_a_resnet_on_the_cpu(dry_run):
    _, result, _ = dry_run
    resnet = result["resnet50"]
    assert resnet["rc"] == 0 and resnet["device"] == "cpu" and resnet["timer"] == "time.perf_counter"
    [pruning] = resnet["pruning"]
    assert pruning["reached"] and 0.4 <= pruning["macs_kept"] <= 0.5
    models = {row["model"] for row in resnet["latency"]}
    assert models == {"dense", "macs50"} and all(row["ms"] > 0 for row in resnet["latency"])


def test_out_folder_fits_what_the_device_tool_brings_back(dry_run):
    _, result, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert out / "gpu_check.json" in files and len(files) <= DEVICE_FILE_LIMIT
    assert all(len(p.relative_to(out).parts) <= 3 and PLAIN_NAME.match(p.name) for p in files)
    assert {f"gpu_check/{p.name}" for p in files if p.suffix == ".log"} == set(result["logs"].values())


def test_shell_wrapper_reaches_the_driver():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--skip" in proc.stdout and "--dry-run" in proc.stdout


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "build,nonsense"])
    assert gpu_check.parse_args(["--skip", "build,sanitizer"]).skip == {"build", "sanitizer"}
    assert gpu_check.parse_args(["--bench", "taylor"]).bench == ("taylor",)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--bench", "all"])


def test_a_dry_run_does_not_replace_a_gpu_result(tmp_path):
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"dry_run": False}))
    with pytest.raises(SystemExit, match="holds a GPU run"):
        gpu_check.guard_gpu_result(path, dry=True, overwrite=False)
    gpu_check.guard_gpu_result(path, dry=True, overwrite=True)
    gpu_check.guard_gpu_result(path, dry=False, overwrite=False)


def test_bench_steps_are_pyprune_bench_all():
    from pyprune_ext import bench
    assert set(gpu_check.BENCH_ALL) == set(bench.IN_ALL)


def test_every_gpu_only_test_carries_the_cuda_marker():
    """Tests skipped without a GPU other than through the device fixture must be
    marked by hand, or the GPU check cannot count them."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("@pytest.mark.skipif(not torch.cuda.is_available()"):
                if "@pytest.mark.cuda" not in lines[max(0, i - 3):i]:
                    unmarked.append(f"{path.name}:{i + 1}")
    assert unmarked == []


# ---------------------------------------------------------------- parsers

def test_sanitizer_summary():
    clean = "========= COMPUTE-SANITIZER\n...\n========= ERROR SUMMARY: 0 errors\n"
    assert parse.sanitizer_report(clean) == {"errors": 0, "unsupported": None, "first_errors": []}
    faulty = ("========= Invalid __global__ write of size 4 bytes\n"
              "=========     at sparse_rows_kernel(float *, int)+0x1d0\n"
              "========= ERROR SUMMARY: 3 errors\n========= ERROR SUMMARY: 1 error\n")
    report = parse.sanitizer_report(faulty)
    assert report["errors"] == 4 and report["first_errors"] == [
        "Invalid __global__ write of size 4 bytes at sparse_rows_kernel(float *, int)+0x1d0"]
    assert parse.sanitizer_report("killed before the end")["errors"] is None


def test_sanitizer_that_refuses_the_device_is_not_a_pass():
    text = "========= Error: Device not supported\n========= ERROR SUMMARY: 1 error\n"
    report = parse.sanitizer_report(text)
    assert report["unsupported"] == "Error: Device not supported"
    summary = gpu_check.summarize_sanitizer("cs", {"memcheck": {**report, "tests": 0}})
    assert summary["unsupported"] and summary["errors"] is None


def outcome(cuda, result, reason=None):
    return {"cuda": cuda, "outcome": result, "skip_reason": reason}


COLLECTED = {"t::a[cpu]": outcome(False, "collected"), "t::a[cuda]": outcome(True, "collected"),
             "t::gpu_only": outcome(True, "collected")}


def test_a_cuda_test_skipped_with_a_gpu_present_fails_the_count():
    ran = {"t::a[cpu]": outcome(False, "passed"), "t::a[cuda]": outcome(True, "passed"),
           "t::gpu_only": outcome(True, "skipped", "needs a CUDA device")}
    summary = parse.count_outcomes(COLLECTED, ran, gpu_present=True)
    assert not summary["ok"] and summary["cuda_total"] == 2 and summary["cuda_ran"] == 1
    assert summary["cuda_skipped"] == ["t::gpu_only"] and summary["cuda_skip_reasons"] == ["needs a CUDA device"]
    assert "only 1 of 2 CUDA tests ran" in summary["problems"][0]
    assert parse.count_outcomes(COLLECTED, ran, gpu_present=False)["ok"]


def test_all_cuda_tests_ran_and_failures_or_missing_reports_count():
    ran = {k: outcome(v["cuda"], "passed") for k, v in COLLECTED.items()}
    assert parse.count_outcomes(COLLECTED, ran, gpu_present=True)["ok"]
    ran["t::a[cuda]"] = outcome(True, "failed")
    del ran["t::a[cpu]"]
    summary = parse.count_outcomes(COLLECTED, ran, gpu_present=True)
    assert summary["failed_ids"] == ["t::a[cuda]"] and summary["not_reported"] == ["t::a[cpu]"]
    assert len(summary["problems"]) == 2 and summary["cuda_ran"] == 2


def test_conftest_records_outcomes(tmp_path):
    """--outcomes-json on a real (small) run: the CUDA twin is marked, its outcome recorded."""
    path = tmp_path / "outcomes.json"
    test = "tests/test_masked_ops.py::test_masked_linear_device_mismatch"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test,
                           "--outcomes-json", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [(nodeid, entry)] = json.loads(path.read_text()).items()
    assert nodeid == test and entry["cuda"] is True
    import torch
    expected = "passed" if torch.cuda.is_available() else "skipped"
    assert entry["outcome"] == expected


def test_targets_from_the_h100_benchmark_files():
    """The committed H100 results give the numbers benchmarks/RESULTS.md reports."""
    results = ROOT / "benchmarks" / "results"
    bench = {"taylor": json.loads((results / "taylor_h100.json").read_text()),
             "masked": json.loads((results / "masked_h100_fp32.json").read_text())}
    found = {t["name"]: t for t in targets.evaluate(bench)}
    taylor = found["taylor_stats_of_copy_bandwidth"]
    assert taylor["value"] == pytest.approx(0.27, abs=0.01) and taylor["met"] is False  # 64x196x768 bf16: 27%
    sparse = found["sparse_linear_5pct_vs_cublas"]
    assert sparse["value"] == pytest.approx(0.086 / 0.183, rel=0.02) and sparse["met"] is False
    # that run predates masked_linear_prezeroed, the path the target is about
    assert "masked_linear_prezeroed" in found["masked_linear_vs_dense"]["pending"]
    # that run timed the 4096 shapes only (--only 4096): no convolution rows
    assert "no rows" in found["sparse_conv_5pct_vs_cudnn"]["pending"]
    assert found["nm_2to4_vs_dense_bf16"]["value"] is None and "pending" in found["nm_2to4_vs_dense_bf16"]


def test_merge_takes_skipped_sections_from_an_earlier_run(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"commit": {"head": "abc"}, "pytest": {"passed": 5}, "bench": {"x": {}},
                                   "bench_results": {"taylor": {"results": []}}}))
    result = {"pytest": {"skipped": "--skip pytest"}, "bench": {"new": {}}, "bench_results": {"new": {}}}
    gpu_check.merge_previous(result, str(earlier), {"pytest"})
    assert result["pytest"] == {"passed": 5}
    # a benchmark this run did not repeat keeps its earlier entry and results
    assert result["bench"] == {"new": {}, "x": {}} and set(result["bench_results"]) == {"new", "taylor"}
    assert result["merged_from"]["steps"] == ["pytest", "x"]


def test_a_step_past_its_timeout_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.TIMEOUTS, "sleep", 0.5)
    ctx = gpu_check.Context(python=sys.executable, logs_dir=tmp_path, work=tmp_path,
                            deadline=gpu_check.Deadline(600), dry=False, skip=set(), cores=os.cpu_count() or 1)
    run = gpu_check.run_logged(ctx, "sleep", ["sleep", "30"], tmp_path / "x.log", "sleep")
    assert run["timed_out"] and run["seconds"] < 15
    assert gpu_check.command_problems("sleep", run, []) == ["sleep: killed at its timeout after " f"{run['seconds']} s"]
