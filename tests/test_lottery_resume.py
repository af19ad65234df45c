"""Resume after SIGKILL: a real subprocess is killed in the middle of a level,
rerun to completion (the same command, another subprocess), and its results
equal an uninterrupted run's exactly; the level finished before the kill is not
recomputed. The uninterrupted reference runs in this process (single-threaded
like the worker) while the worker starts up, which saves one interpreter start."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lottery_common import digits_run, resume_config, single_thread  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import MaskSet
from pyprune_ext.lottery.io import load_tensors

WORKER = Path(__file__).with_name("lottery_worker.py")
LEVELS = [0, 1, 2]
# Fields that legitimately differ between an interrupted and an uninterrupted run.
TIMING = {"wall_time_s", "train_time_s", "step_time_ms", "resumed_from_iteration"}


def start_worker(run_dir: Path, sleep: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYPRUNE_LOTTERY_TEST_SLEEP=str(sleep), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the worker exited ({process.returncode}) before {path} appeared:\n"
                        f"{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def metrics(run_dir: Path, level: int) -> dict:
    data = json.loads((run_dir / f"level_{level:02d}" / "metrics.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMING}


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # Slow steps (20 ms) so that the kill lands inside level 1, after a checkpoint.
    victim = start_worker(killed, sleep=0.02)
    digits_run(reference, resume_config()).run()
    checkpoint = killed / "level_01" / "checkpoint.pt"
    wait_for(checkpoint, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert (killed / "level_00" / "done").is_file()
    assert not (killed / "level_01" / "done").is_file(), "the kill came too late to test a mid-level resume"
    level0_stamp = {f: os.stat(killed / "level_00" / f).st_mtime_ns for f in os.listdir(killed / "level_00")}

    finish(start_worker(killed))  # the same command again

    # Level 0 was finished before the kill: untouched. Level 1 resumed from its checkpoint.
    assert {f: os.stat(killed / "level_00" / f).st_mtime_ns for f in os.listdir(killed / "level_00")} == level0_stamp
    resumed = json.loads((killed / "level_01" / "metrics.json").read_text())["resumed_from_iteration"]
    assert resumed is not None and resumed > 0
    for level in LEVELS:
        a, b = reference / f"level_{level:02d}", killed / f"level_{level:02d}"
        assert MaskSet.load(a / "mask.pt") == MaskSet.load(b / "mask.pt")
        final_a, final_b = load_tensors(a / "final.pt"), load_tensors(b / "final.pt")
        assert final_a.keys() == final_b.keys()
        assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), level
        assert metrics(reference, level) == metrics(killed, level)
        assert not (b / "checkpoint.pt").exists()
    assert (reference / "summary.csv").read_text().count("\n") == (killed / "summary.csv").read_text().count("\n")
