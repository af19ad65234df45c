"""The GPU check: one command that proves the CUDA side on a machine with a GPU.

    bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--skip STEP,...] [--bench NAME,...] [--budget S]
                              [--merge FILE]

Steps, in order (each with its own timeout, all inside one budget; each prints
its elapsed time):
  build      python setup.py build_ext --inplace for device 0's architecture,
             PYPRUNE_CUDA=1, MAX_JOBS=<cores>, the system gcc (benchmarks/RESULTS.md)
  pytest     the whole suite (pytest-xdist when importable), counted against a
             --collect-only run: every CUDA test must run when a GPU is present
  sanitizer  compute-sanitizer memcheck over the CUDA op tests, racecheck over the
             reduction kernels' tests (beside pytest, on the spare cores)
  cli        pyprune taylor / lottery --device cuda on their defaults (beside pytest)
  resnet50   Taylor-prune torchvision resnet50 to 50% / 30% of its MACs; dense vs
             pruned latency at batch 1, 64, 256, fp32 and bf16 channels_last
  bench      pyprune bench <each of `all`> --device cuda, then the masked benchmark
             in bf16 (4096 shapes); the GPU targets of the issues computed from them

Results: benchmarks/results/gpu_check.json and the logs in
benchmarks/results/gpu_check/ (a dry run writes under build/gpu_check-dry/).
Without a GPU (or with --dry-run) the GPU steps are skipped and the rest runs
cheaply: the CUDA tests are counted on --collect-only, the pruning and timing
code runs on a small ResNet-18 on the CPU, the targets are listed without values.
Exit status 0 when nothing failed.

A rerun of what the budget left out, on the same (warm) machine, with the first
run's JSON copied back into the tree: e.g. --skip build,pytest,sanitizer,cli,resnet50
--bench taylor,magnitude --merge benchmarks/results/gpu_check.json. Where the tree
has no .git, set GPU_CHECK_COMMIT to the commit being tested.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import gpu_check_parse as parse  # noqa: E402
import gpu_check_targets as targets  # noqa: E402

STEPS = ("build", "pytest", "sanitizer", "cli", "resnet50", "bench")
LOG_FILES = {"build": "build.log", "pytest": "pytest.log", "sanitizer": "sanitizer.log", "cli": "cli.log",
             "resnet50": "resnet50.log", "bench": "bench.log"}
# Seconds each command may take on an H200 machine with 16 cores (expected times in
# the README's GPU check paragraph); the --budget deadline caps them all.
TIMEOUTS = {"probe": 120, "build": 300, "collect": 90, "pytest": 300, "memcheck": 150, "racecheck": 90,
            "pyprune taylor": 90, "pyprune lottery": 120, "pyprune info": 60, "resnet50": 150,
            "bench masked": 240, "bench taylor": 150, "bench magnitude": 90, "bench masked_bf16": 90,
            "bench semi_structured": 60}
DEFAULT_BUDGET = 540        # 9 minutes: a device call may run 10
RESERVE = 15                # kept for writing the results after the last step
MIN_STEP = 20               # a step is not started with less time than this left
# `pyprune bench all` is these three (pyprune_ext.bench.IN_ALL; a test keeps them equal),
# run one by one so that a timeout loses one benchmark's JSON, not all; most targets first.
BENCH_ALL = ("masked", "taylor", "magnitude")
BENCHES = BENCH_ALL + ("masked_bf16", "semi_structured")
MEMCHECK_TESTS = ["tests/test_masked_ops.py", "tests/test_sparse_tiles.py", "tests/test_masked_modules.py",
                  "tests/test_magnitude.py", "tests/test_sparse_conv_tiles.py",
                  "tests/test_sparse_conv.py", "tests/test_taylor_stats.py", "tests/test_taylor_stats_contract.py"]
RACECHECK_TESTS = ["tests/test_sparse_tiles.py", "tests/test_sparse_conv_tiles.py", "tests/test_taylor_stats.py", "tests/test_taylor_stats_contract.py",
                   "tests/test_magnitude.py"]
# torch.compile under the sanitizer spends its time compiling Triton kernels, not in
# ours; cases named slow_under_sanitizer repeat small ones' code paths at sizes
# too slow to sanitize
SANITIZER_SELECTION = ["-m", "cuda", "-k", "not compile and not slow_under_sanitizer"]
# what this check writes into the tree, which does not make the tested tree "dirty"
OWN_OUTPUT = ("benchmarks/results/gpu_check", "build/")
LOG_LIMIT = 15 * 2**20      # the device tool brings back files of at most 16 MiB

PROBE = r"""
import importlib.util, json, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "xdist": importlib.util.find_spec("xdist") is not None}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=p.name, capability=[p.major, p.minor], device_count=torch.cuda.device_count(),
                memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
print("PROBE " + json.dumps(info))
"""
BUILD_INFO = "import json, pyprune_ext; print('BUILD ' + json.dumps(pyprune_ext.build_info()))"


# ------------------------------------------------------------------ plumbing

class Deadline:
    """One budget for the whole run: each step gets min(its timeout, what is left)."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def limit(self, timeout: float):
        left = self.end - time.monotonic() - RESERVE
        return None if left < MIN_STEP else min(timeout, left)


@dataclass
class Context:
    python: str
    logs_dir: Path
    work: Path                 # temporary: outcomes, bench JSONs, CLI run folders
    deadline: Deadline
    dry: bool
    skip: set
    cores: int
    benches: tuple = ()
    probe: dict = field(default_factory=dict)
    print_lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, step: str) -> Path:
        return self.logs_dir / LOG_FILES[step]

    def say(self, text: str) -> None:
        with self.print_lock:
            print(f"[{self.deadline.elapsed():6.1f} s] {text}", flush=True)


def not_run(why: str) -> dict:
    return {"not_run": why}


def stop_group(proc: subprocess.Popen) -> None:
    """Ends the process group this run started (pytest-xdist workers, the sanitizer's children)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(ctx: Context, label: str, argv, log: Path, timeout_key: str, env=None) -> dict:
    """Runs argv in the repository root with its output appended to log; returns
    rc, seconds, timed_out, command and (not for the JSON) the output as '_text'."""
    limit = ctx.deadline.limit(TIMEOUTS[timeout_key])
    command = shlex.join(str(a) for a in argv)
    if limit is None:
        ctx.say(f"{label}: not run, the budget is spent")
        return {"command": command, "not_run": "the --budget was spent before this step"}
    ctx.say(f"{label}: started (timeout {limit:.0f} s)")
    with open(log, "a") as f:
        f.write(f"\n== {label}: {command}\n")
        f.flush()
        begin, t0 = f.tell(), time.monotonic()
        proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=step_env(env), start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc, timed_out = proc.returncode, True
        seconds = round(time.monotonic() - t0, 1)
        f.write(f"== {label}: exit {rc}{' (killed at its timeout)' if timed_out else ''} after {seconds} s\n")
    with open(log) as f:
        f.seek(begin)
        text = f.read()
    ctx.say(f"{label}: {'TIMED OUT' if timed_out else f'exit {rc}'} after {seconds} s")
    return {"command": command, "rc": rc, "seconds": seconds, "timed_out": timed_out, "_text": text}


def step_env(extra) -> dict:
    """The environment of a step: this one, the checkout first on the import path
    (the extension is built in place, not installed), and the step's own variables."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), **(extra or {})}


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def tagged_json(text: str, tag: str):
    """The JSON printed after `tag` on one line of text, or None."""
    for line in text.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


def read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomically(path: Path, data) -> None:
    # not pyprune_ext.lottery.io.atomic_write_json: the driver runs before (and without) a build
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ steps

def probe(ctx: Context) -> dict:
    result = run_logged(ctx, "probe", [ctx.python, "-c", PROBE], ctx.log("build"), "probe")
    info = tagged_json(result.get("_text", ""), "PROBE")
    if info is None:
        raise SystemExit(f"gpu_check: {ctx.python} could not import torch (see {ctx.log('build')})")
    return info


def build_env(ctx: Context) -> dict:
    env = {"MAX_JOBS": str(ctx.cores), "PYPRUNE_CUDA": "1",
           "TORCH_CUDA_ARCH_LIST": parse.dotted_arch(ctx.probe.get("capability")) or ""}
    # the GPU image's CC/CXX wrapper links libstdc++ statically, which crashes the
    # extension when it formats an error message (README, "CUDA or CPU")
    if os.path.exists("/usr/bin/gcc") and os.path.exists("/usr/bin/g++"):
        env.update(CC="/usr/bin/gcc", CXX="/usr/bin/g++")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    return env


def build(ctx: Context) -> dict:
    argv = [ctx.python, "setup.py", "build_ext", "--inplace"]
    env = build_env(ctx)
    if ctx.dry:
        return {"skipped": "dry run", "command": shlex.join(argv), "env": env}
    result = public(run_logged(ctx, "build", argv, ctx.log("build"), "build", env))
    result["env"] = env
    if result.get("rc") == 0:
        check = run_logged(ctx, "build info", [ctx.python, "-c", BUILD_INFO], ctx.log("build"), "probe")
        result["build_info"] = tagged_json(check.get("_text", ""), "BUILD")
        result["problem"] = build_problem(result["build_info"], env["TORCH_CUDA_ARCH_LIST"])
    else:
        result["problem"] = "the build failed" + (" (timed out)" if result.get("timed_out") else "")
    return result


def build_problem(info, arch: str):
    if info is None:
        return "pyprune_ext does not import after the build"
    if not info.get("cuda"):
        return f"the build has no CUDA kernels: {info.get('cpu_only_reason')}"
    if arch and arch not in info.get("cuda_arch_list", ""):
        return f"built for {info.get('cuda_arch_list')}, not for the GPU's {arch}"
    return None


def pytest_argv(ctx: Context, outcomes: Path, *extra) -> list:
    return [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, "--outcomes-json", str(outcomes)]


def collect(ctx: Context, paths=("tests",)) -> dict:
    """Which tests exist and which are CUDA tests (no test runs)."""
    path = ctx.work / "collected.json"
    result = run_logged(ctx, "collect", pytest_argv(ctx, path, "--collect-only", *paths), ctx.log("pytest"),
                        "collect")
    collected = read_json(path) or {}
    return {"rc": result.get("rc"), "seconds": result.get("seconds"), "command": result["command"],
            "_collected": collected, "collected": len(collected),
            "cuda_total": sum(1 for e in collected.values() if e["cuda"])}


def pytest_workers(ctx: Context) -> int:
    # two cores stay with the sanitizer and the CLI runs beside it
    return max(1, ctx.cores - 2) if ctx.probe.get("xdist") else 0


def run_pytest(ctx: Context, collected: dict, paths=("tests",)) -> dict:
    path = ctx.work / "ran.json"
    workers = pytest_workers(ctx)
    extra = ["-n", str(workers)] if workers else []
    # as on the 2-core CI machines: without this each worker starts one thread per core
    env = {"OMP_NUM_THREADS": "2"} if workers else {}
    result = run_logged(ctx, "pytest", pytest_argv(ctx, path, *extra, *paths), ctx.log("pytest"), "pytest", env)
    if "not_run" in result:
        return public(result)
    summary = parse.count_outcomes(collected, read_json(path) or {}, gpu_present=True)
    if result["timed_out"]:
        summary["problems"].insert(0, "pytest was killed at its timeout")
        summary["ok"] = False
    return {**public(result), "workers": workers, **summary}


def sanitizer_binary():
    found = shutil.which("compute-sanitizer")
    default = "/usr/local/cuda/bin/compute-sanitizer"
    return found or (default if os.path.exists(default) else None)


def run_sanitizer_tool(ctx: Context, binary: str, tool: str, files: list) -> dict:
    path = ctx.work / f"sanitizer_{tool}.json"
    argv = [binary, "--tool", tool, "--target-processes", "all",
            *pytest_argv(ctx, path, *SANITIZER_SELECTION, *files)]
    # without the caching allocator every tensor is its own allocation, so an
    # access past a tensor's end is outside any allocation and memcheck sees it
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {}
    result = run_logged(ctx, tool, argv, ctx.log("sanitizer"), tool, env)
    if "not_run" in result:
        return public(result)
    report = parse.sanitizer_report(result["_text"])
    counts = parse.pytest_counts(read_json(path) or {})
    return {**public(result), **report, "tests": counts["passed"] + counts["failed"], **counts}


def sanitizer(ctx: Context) -> dict:
    binary = sanitizer_binary()
    if ctx.dry:
        return {"skipped": "dry run", "binary": binary}
    if binary is None:
        return {"unsupported": "compute-sanitizer was not found (PATH, /usr/local/cuda/bin)", "tests": 0,
                "errors": None}
    tools = {}
    for tool, files in (("memcheck", MEMCHECK_TESTS), ("racecheck", RACECHECK_TESTS)):
        earlier = next((t for t in tools.values() if t.get("unsupported")), None)
        tools[tool] = ({"unsupported": earlier["unsupported"], "not_run": "the sanitizer refused this machine"}
                       if earlier else run_sanitizer_tool(ctx, binary, tool, files))
    return summarize_sanitizer(binary, tools)


def summarize_sanitizer(binary: str, tools: dict) -> dict:
    ran = [t for t in tools.values() if not t.get("unsupported") and not t.get("not_run")]
    errors = [t.get("errors") for t in ran]
    summary = {"binary": binary, "tests": sum(t.get("tests", 0) for t in ran),
               "errors": None if not ran or None in errors else sum(errors), **tools}
    unsupported = next((t["unsupported"] for t in tools.values() if t.get("unsupported")), None)
    if unsupported:
        summary["unsupported"] = unsupported
    return summary


def cli_commands(ctx: Context) -> dict:
    """label -> argv: the two main jobs on their defaults, each into its own new folder."""
    runs = ctx.work / "cli-runs"
    return {f"pyprune {job}": [ctx.python, "-m", "pyprune_ext", job, "--device", "cuda", "--quiet",
                               "--out", str(runs / job)] for job in ("taylor", "lottery")}


def cli(ctx: Context) -> dict:
    commands = cli_commands(ctx)
    if ctx.dry:
        # the runner and the package's entry point, cheaply
        info = run_logged(ctx, "pyprune info", [ctx.python, "-m", "pyprune_ext", "info", "--json"],
                          ctx.log("cli"), "pyprune info")
        return {"pyprune info": public(info),
                **{label: {"skipped": "dry run", "command": shlex.join(argv)} for label, argv in commands.items()}}
    return {label: public(run_logged(ctx, label, argv, ctx.log("cli"), label)) for label, argv in commands.items()}


def resnet_argv(ctx: Context, path: Path) -> list:
    argv = [ctx.python, str(TOOLS / "gpu_check_resnet.py"), "--json", str(path)]
    if ctx.dry:  # the same code on a small model, one thread, one batch size
        argv += ["--device", "cpu", "--model", "resnet18", "--image", "64", "--keep", "0.5", "--batches", "1",
                 "--dtypes", "fp32", "--prune-batch", "2", "--warmup", "1", "--repeats", "3", "--threads", "1"]
    else:
        argv += ["--device", "cuda"]
    return argv


def resnet50(ctx: Context) -> dict:
    path = ctx.work / "resnet.json"
    result = public(run_logged(ctx, "resnet50", resnet_argv(ctx, path), ctx.log("resnet50"), "resnet50"))
    measured = read_json(path) if result.get("rc") == 0 else None
    return {**result, **(measured or {})}


def bench_commands(ctx: Context) -> dict:
    out = ctx.work / "bench"
    commands = {f"bench {name}": [ctx.python, "-m", "pyprune_ext", "bench", name, "--device", "cuda",
                                  "--json-dir", str(out)] for name in BENCH_ALL}
    # issue 21's targets are for fp32 and bf16; `bench all` times fp32 only
    commands["bench masked_bf16"] = [ctx.python, "-m", "pyprune_ext.bench.masked", "--device", "cuda",
                                     "--dtype", "bfloat16", "--only", "4096", "--json", str(out / "masked_bf16.json")]
    # issue 22's 2:4 target (CUDA only, so not in `bench all`)
    commands["bench semi_structured"] = [ctx.python, "-m", "pyprune_ext", "bench", "semi_structured",
                                         "--device", "cuda", "--json-dir", str(out)]
    return {label: argv for label, argv in commands.items() if label.removeprefix("bench ") in ctx.benches}


def bench(ctx: Context) -> dict:
    commands = bench_commands(ctx)
    if ctx.dry:
        return {label: {"skipped": "dry run", "command": shlex.join(argv)} for label, argv in commands.items()}
    (ctx.work / "bench").mkdir(exist_ok=True)
    return {label: public(run_logged(ctx, label, argv, ctx.log("bench"), label)) for label, argv in commands.items()}


# ------------------------------------------------------------------ the run

def skipped(step: str) -> dict:
    return {"skipped": f"--skip {step}"}


def tests_and_sanitizer(ctx: Context, collected: dict) -> dict:
    """pytest on most cores, and beside it, one after another, the sanitizer and the CLI runs."""
    def lane_pytest():
        if ctx.dry:
            return {**parse.collection_counts(collected), "not_run": "dry run"}
        return skipped("pytest") if "pytest" in ctx.skip else run_pytest(ctx, collected)

    def lane_other():
        return {step: skipped(step) if step in ctx.skip else fn(ctx)
                for step, fn in (("sanitizer", sanitizer), ("cli", cli))}

    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.submit(lane_pytest), pool.submit(lane_other)
        result = {"pytest": first.result(), **second.result()}
    if not ctx.dry and "pytest" not in ctx.skip:
        for run in result["cli"].values():
            if isinstance(run, dict) and "rc" in run:
                run["beside"] = "pytest: its seconds say it finished, they are not a clean timing"
    return result


def commit_facts() -> dict:
    """The git HEAD tested, and whether the tree differs from it (the check's own output aside)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {"head": os.environ.get("GPU_CHECK_COMMIT"), "dirty": None,
                "note": "no git repository here; head is $GPU_CHECK_COMMIT as given"}
    changed = [line[3:] for line in status if not line[3:].startswith(OWN_OUTPUT)]
    return {"head": head, "dirty": bool(changed), "changed": changed[:20]}


def device_facts(info: dict, dry: bool) -> dict:
    if dry:
        return {"name": None, "dry_run": True, "cuda_available": info.get("cuda_available")}
    keys = ("device_name", "capability", "device_count", "memory_gib", "multiprocessors", "cuda_version")
    return {k.removeprefix("device_"): info.get(k) for k in keys}


def problems_of(result: dict) -> tuple:
    """(problems: what failed, not_checked: what could not be checked here)."""
    problems, not_checked = [], []
    build = result["build"]
    if build.get("problem"):
        problems.append(f"build: {build['problem']}")
    problems += [f"pytest: {p}" for p in result["pytest"].get("problems", [])]
    if "not_run" not in result["collect"] and result["collect"]["cuda_total"] == 0:
        problems.append("collect: no CUDA test found (is the cuda marker gone from tests/conftest.py?)")
    san = result["sanitizer"]
    if san.get("unsupported"):
        not_checked.append(f"sanitizer: {san['unsupported']}")
    elif san.get("errors"):
        problems.append(f"sanitizer: {san['errors']} errors")
    for tool in ("memcheck", "racecheck"):
        if isinstance(san.get(tool), dict) and not san[tool].get("unsupported"):
            # the tests run under the tool must pass too (a kernel fault can show as a failed test)
            problems += command_problems(f"sanitizer {tool}", san[tool], not_checked)
            if "rc" in san[tool] and not san[tool].get("tests"):
                # 0 errors over 0 tests proves nothing
                problems.append(f"sanitizer {tool}: no test ran under it")
    for section in ("cli", "bench"):
        # a section holds one entry per command, unless the whole step was skipped or not run
        for label, run in result[section].items():
            if isinstance(run, dict):
                problems += command_problems(label, run, not_checked)
    problems += command_problems("resnet50", result["resnet50"], not_checked)
    return problems, not_checked


def command_problems(label: str, run: dict, not_checked: list) -> list:
    if "not_run" in run:
        not_checked.append(f"{label}: {run['not_run']}")
        return []
    if "rc" not in run:
        return []
    if run.get("timed_out"):
        return [f"{label}: killed at its timeout after {run['seconds']} s"]
    return [f"{label}: exit {run['rc']}"] if run["rc"] != 0 else []


def merge_previous(result: dict, previous_path, skip: set) -> None:
    """Sections this run skipped are taken from an earlier run's JSON (a rerun of the rest)."""
    previous = read_json(Path(previous_path)) if previous_path else None
    if not previous:
        return
    taken = [s for s in STEPS if s in skip and s in previous]
    for step in taken:
        result[step] = previous[step]
    if "bench" in taken:
        result["bench_results"] = previous.get("bench_results", {})
    else:  # benchmarks this run left out (--bench) keep their earlier results
        for label, run in previous.get("bench", {}).items():
            if label not in result["bench"] and isinstance(run, dict):
                result["bench"][label] = run
                taken.append(label)
        for name, data in previous.get("bench_results", {}).items():
            result["bench_results"].setdefault(name, data)
    result["merged_from"] = {"file": str(previous_path), "commit": previous.get("commit"), "steps": taken}


def copy_logs(logs_dir: Path, out: Path, results_json: Path) -> None:
    """The JSON and the logs into out/ (out/gpu_check.json, out/gpu_check/*.log)."""
    (out / "gpu_check").mkdir(parents=True, exist_ok=True)
    shutil.copy(results_json, out / "gpu_check.json")
    for log in sorted(logs_dir.glob("*.log")):
        copy_bounded(log, out / "gpu_check" / log.name)


def copy_bounded(src: Path, dst: Path) -> None:
    """Copies src, keeping its head and tail when it is larger than LOG_LIMIT."""
    size = src.stat().st_size
    if size <= LOG_LIMIT:
        shutil.copy(src, dst)
        return
    half = LOG_LIMIT // 2
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(half))
        g.write(f"\n... [{size - 2 * half} bytes cut] ...\n".encode())
        f.seek(size - half)
        g.write(f.read())


def run_check(args, ctx: Context) -> dict:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ctx.probe = probe(ctx)
    ctx.dry = args.dry_run or not ctx.probe.get("cuda_available")
    ctx.say(f"{'DRY RUN' if ctx.dry else 'GPU: ' + str(ctx.probe.get('device_name'))}, torch {ctx.probe['torch']}")
    result = {"schema": 1, "dry_run": ctx.dry, "started": started, "device": device_facts(ctx.probe, ctx.dry),
              "torch": ctx.probe["torch"], "python": ctx.probe["python"], "commit": commit_facts(),
              "budget_s": args.budget}
    result["build"] = skipped("build") if "build" in ctx.skip else build(ctx)
    if result["build"].get("problem"):
        return finish_early(result, "the build failed: nothing else can run")
    collect_result = collect(ctx)
    collected = collect_result.pop("_collected")
    result["collect"] = collect_result
    result.update(tests_and_sanitizer(ctx, collected))
    result["resnet50"] = skipped("resnet50") if "resnet50" in ctx.skip else resnet50(ctx)
    result["bench"] = skipped("bench") if "bench" in ctx.skip else bench(ctx)
    result["bench_results"] = targets.load_bench_jsons(ctx.work / "bench")
    return result


def finish_early(result: dict, why: str) -> dict:
    for step in STEPS:
        result.setdefault(step, not_run(why))
    result.setdefault("collect", {"cuda_total": 0, "not_run": why})
    result["bench_results"] = {}
    return result


def finalize(result: dict, args, ctx: Context) -> dict:
    merge_previous(result, args.merge, ctx.skip)
    result["targets"] = targets.evaluate(result.get("bench_results", {}), dry_run=ctx.dry)
    problems, not_checked = problems_of(result)
    result.update(ok=not problems, problems=problems, not_checked=not_checked,
                  seconds=round(ctx.deadline.elapsed(), 1),
                  logs={step: f"gpu_check/{name}" for step, name in LOG_FILES.items() if ctx.log(step).exists()})
    return result


# ------------------------------------------------------------------ command line

def default_results_dir(dry: bool) -> Path:
    return ROOT / ("build/gpu_check-dry" if dry else "benchmarks/results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="skip the GPU steps even where a GPU is present")
    p.add_argument("--out", metavar="DIR", help="also copy the JSON and the logs here (e.g. $OUT)")
    p.add_argument("--results-dir", metavar="DIR", help="where gpu_check.json and gpu_check/*.log go (default "
                   "benchmarks/results, or build/gpu_check-dry for a dry run)")
    p.add_argument("--skip", default="", metavar="STEP,...", help=f"steps to leave out: {', '.join(STEPS)}")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, metavar="S",
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET}); steps beyond it are not run")
    p.add_argument("--bench", default=",".join(BENCHES), metavar="NAME,...",
                   help=f"benchmarks to run (default all: {', '.join(BENCHES)})")
    p.add_argument("--merge", metavar="FILE", help="take the sections of skipped steps from this earlier JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="let a dry run replace a GPU run's JSON in the results folder")
    p.add_argument("--python", default=sys.executable, help="the interpreter the steps run (default: this one)")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    args.bench = tuple(b for b in args.bench.split(",") if b)
    if set(args.bench) - set(BENCHES):
        p.error(f"unknown benchmarks in --bench: {', '.join(sorted(set(args.bench) - set(BENCHES)))}")
    unknown = args.skip - set(STEPS)
    if unknown:
        p.error(f"unknown steps in --skip: {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    if args.budget < MIN_STEP + RESERVE:
        p.error(f"--budget must be at least {MIN_STEP + RESERVE} s")
    return args


def guard_gpu_result(path: Path, dry: bool, overwrite: bool) -> None:
    """A dry run never replaces the JSON of a run that had a GPU, unless asked."""
    previous = read_json(path)
    if dry and previous is not None and previous.get("dry_run") is False and not overwrite:
        raise SystemExit(f"gpu_check: {path} holds a GPU run; a dry run does not replace it "
                         f"(use --results-dir DIR, or --overwrite)")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        return checked_run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def checked_run(args, work: Path) -> int:
    # the logs go to a scratch folder until the mode (dry or GPU) is known
    scratch = work / "logs"
    scratch.mkdir()
    ctx = Context(python=args.python, logs_dir=scratch, work=work,
                  deadline=Deadline(args.budget), dry=args.dry_run, skip=args.skip, cores=os.cpu_count() or 1,
                  benches=args.bench)
    result = finalize(run_check(args, ctx), args, ctx)
    results_dir = Path(args.results_dir) if args.results_dir else default_results_dir(ctx.dry)
    results_json = results_dir / "gpu_check.json"
    guard_gpu_result(results_json, ctx.dry, args.overwrite)
    place_logs(scratch, results_dir / "gpu_check", merging=bool(args.merge))
    write_json_atomically(results_json, result)
    if args.out:
        copy_logs(results_dir / "gpu_check", Path(args.out), results_json)
    report(result, results_json)
    return 0 if result["ok"] else 1


def place_logs(scratch: Path, logs_dir: Path, merging: bool) -> None:
    """This run's logs replace the previous run's, or, when its results are merged
    into the previous ones (--merge), are appended to them."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    if not merging:
        for old in logs_dir.glob("*.log"):
            old.unlink()
    for log in scratch.glob("*.log"):
        with open(logs_dir / log.name, "a") as dst:
            dst.write(log.read_text())


def report(result: dict, path: Path) -> None:
    pytest_part = result["pytest"]
    print(f"\n== gpu check {'(dry run) ' if result['dry_run'] else ''}in {result['seconds']} s: "
          f"{'OK' if result['ok'] else 'FAILED'}")
    print(f"   CUDA tests: {pytest_part.get('cuda_ran', 0)} ran of {pytest_part.get('cuda_total')}")
    for line in result["problems"]:
        print(f"   problem: {line}")
    for line in result["not_checked"]:
        print(f"   not checked: {line}")
    for t in result["targets"]:
        state = t.get("reason") or t.get("pending") or f"{t['value']} ({'met' if t['met'] else 'NOT met'})"
        print(f"   target {t['name']} {t['target']}: {state}")
    print(f"   results: {path}")


if __name__ == "__main__":
    sys.exit(main())
