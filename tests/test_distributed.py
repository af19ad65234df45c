"""Pruning under torch.distributed: real 2-process runs launched with torchrun
(gloo backend, loopback), compared with a 1-process run over the same global
minibatches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pyprune_ext import distributed as dist_utils
from pyprune_ext.taylor import Target, TaylorPruner

HERE = Path(__file__).parent
needs_distributed = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                       reason="torch.distributed with gloo is not available")


def launch(nproc: int, script: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N script ARGS`` (or plain python for N=1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(nproc)]
    result = subprocess.run(launcher + [str(script), *map(str, args)], capture_output=True, text=True, env=env,
                            timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-6000:]}"
    return result


def taylor_runs(tmp_path: Path, criterion: str, bn_mode: str, nprocs=(1, 2)) -> dict:
    out = {}
    for n in nprocs:
        launch(n, HERE / "ddp_taylor_worker.py", tmp_path / f"n{n}", criterion, bn_mode)
        out[n] = [torch.load(tmp_path / f"n{n}" / f"rank{r}.pt") for r in range(n)]
    return out


@needs_distributed
@pytest.mark.parametrize("criterion, bn_mode", [("fo_gate", "none"), ("fo_bn", "frozen"), ("so_fisher", "none")])
def test_two_processes_remove_the_channels_one_process_removes(tmp_path, criterion, bn_mode):
    runs = taylor_runs(tmp_path, criterion, bn_mode)
    single, (rank0, rank1) = runs[1][0], runs[2]
    assert rank0["world"] == 2 and single["world"] == 1
    assert len(single["history"]) >= 4  # several pruning steps, each compared
    assert rank0["history"] == rank1["history"] == single["history"]
    assert rank0["plan"] == rank1["plan"] == single["plan"]
    for name, value in single["params"].items():
        # Finalized, then trained on under a rebuilt DDP wrapper: the same model.
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-10, atol=1e-12)


@needs_distributed
def test_ranks_agree_with_per_rank_batchnorm_statistics(tmp_path):
    # BatchNorm in training mode normalises each rank's half batch, so the run
    # differs from one process; the ranks must still make identical decisions.
    (rank0, rank1), = taylor_runs(tmp_path, "fo_bn", "train", nprocs=(2,)).values()
    assert rank0["history"] == rank1["history"] and rank0["plan"] == rank1["plan"]
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])


def test_single_process_needs_no_process_group():
    assert not dist_utils.is_active() and dist_utils.world_size() == 1 and dist_utils.rank() == 0
    assert dist_utils.sync_for(None) is None and dist_utils.sync_for(False) is None
    with pytest.raises(RuntimeError, match="distributed=True but torch.distributed is not initialised"):
        TaylorPruner(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(2, 4),
                     "fo_gate", target=Target.channels(1), distributed=True)
    tensors = [torch.ones(3)]
    dist_utils.all_reduce_sum_(tensors)  # no-op
    assert torch.equal(tensors[0], torch.ones(3))


# ---------------------------------------------------------------------- lottery

def lottery_files(run_dir: Path, variant: str, level: int):
    level_dir = run_dir / variant / f"level_{level:02d}"
    masks = torch.load(level_dir / "mask.pt", weights_only=True)["masks"]
    final = torch.load(level_dir / "final.pt", weights_only=True)
    metrics = json.loads((level_dir / "metrics.json").read_text())
    return masks, final, metrics


def assert_same_run(a: Path, b: Path, levels: dict) -> None:
    for variant, numbers in levels.items():
        for level in numbers:
            masks_a, final_a, metrics_a = lottery_files(a, variant, level)
            masks_b, final_b, metrics_b = lottery_files(b, variant, level)
            assert masks_a.keys() == masks_b.keys()
            assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a), (variant, level)
            for name in final_a:
                torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-9, atol=1e-12)
            assert metrics_a["early_stop"]["iteration"] == metrics_b["early_stop"]["iteration"]
            for key in ("val_accuracy", "test_accuracy"):
                assert [e[key] for e in metrics_a["evaluations"]] == [e[key] for e in metrics_b["evaluations"]]


@needs_distributed
def test_two_process_lottery_run_matches_one_process(tmp_path):
    launch(1, HERE / "ddp_lottery_worker.py", tmp_path / "one", 2, 60, "random")
    launch(2, HERE / "ddp_lottery_worker.py", tmp_path / "two", 2, 60, "random")
    assert_same_run(tmp_path / "one", tmp_path / "two", {"ticket": [0, 1, 2], "random": [1, 2]})
    # Rank 1 wrote nothing: no stray temporary files, one set of results.
    assert not list((tmp_path / "two").rglob("*.tmp"))


@needs_distributed
def test_a_killed_rank_fails_the_job_and_the_rerun_resumes(tmp_path):
    run_dir, args = tmp_path / "two", (2, 400)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(HERE / "ddp_lottery_worker.py"), str(run_dir), *map(str, args)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (run_dir / "ticket" / "level_01" / "checkpoint.pt").exists():
        assert job.poll() is None, job.stderr.read()[-4000:]
        assert time.monotonic() < deadline, "level 1 never checkpointed"
        time.sleep(0.05)
    os.kill(int(Path(f"{run_dir}.pid1").read_text()), signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0  # torchrun stops the other rank and fails the job
    assert (run_dir / "ticket" / "level_00" / "done").is_file()
    assert not (run_dir / "ticket" / "level_02" / "done").exists()
    finished = (run_dir / "ticket" / "level_00" / "final.pt").stat().st_mtime_ns

    launch(2, HERE / "ddp_lottery_worker.py", run_dir, *args)
    assert (run_dir / "ticket" / "level_00" / "final.pt").stat().st_mtime_ns == finished  # not recomputed
    launch(1, HERE / "ddp_lottery_worker.py", tmp_path / "one", *args)
    assert_same_run(tmp_path / "one", run_dir, {"ticket": [0, 1, 2]})


# ------------------------------------------------------------- pyprune --nproc

def pyprune(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyprune_ext", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@needs_distributed
def test_pyprune_nproc_2_runs_both_commands_with_one_report(tmp_path):
    lottery = pyprune("lottery", "--nproc", 2, "--levels", 1, "--iterations", 40, "--control", "random",
                      "--quiet", "--json", "--out", tmp_path / "lottery", cwd=tmp_path)
    assert lottery.returncode == 0, lottery.stderr[-4000:]
    payload = json.loads(lottery.stdout)  # one JSON document: only rank 0 reports
    assert [(r["variant"], r["level"]) for r in payload["levels"]] == [("ticket", 0), ("ticket", 1), ("random", 1)]
    assert payload["levels"][1]["remaining_pct"] == pytest.approx(80.0, abs=0.05)
    assert all(r["early_stop_test_accuracy"] > 0.5 for r in payload["levels"])
    assert (tmp_path / "lottery" / "accuracy_vs_remaining.png").is_file()
    assert not list((tmp_path / "lottery").rglob("*.tmp"))

    taylor = pyprune("taylor", "--nproc", 2, "--model", "conv2", "--epochs", 1, "--finetune-epochs", 0,
                     "--target-flops", 0.7, "--quiet", "--json", "--out", tmp_path / "taylor", cwd=tmp_path)
    assert taylor.returncode == 0, taylor.stderr[-4000:]
    metrics = json.loads(taylor.stdout)
    assert metrics["flops_kept"] <= 0.7 and metrics["pruned"]["test_accuracy"] > 0.5
    assert (tmp_path / "taylor" / "pruned_state.pt").is_file()


def test_pyprune_nproc_checks_before_launching(tmp_path):
    for argv, message in [(["--dataset", "mnist"], "--data-dir"), (["--batch-size", "1"], "--batch-size 1 is the global batch")]:
        result = pyprune("lottery", "--nproc", 2, *argv, "--out", tmp_path, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "torch.distributed" not in result.stderr and "Traceback" not in result.stderr


_FSDP_REFUSED = """
import sys, torch
from torch import nn
torch.distributed.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
from pyprune_ext.lottery import MaskSet, prune_by_magnitude
from pyprune_ext.taylor import Target, TaylorPruner
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
fully_shard(model)
attempts = {
    "MaskSet.ones": lambda: MaskSet.ones(model),
    "prune_by_magnitude": lambda: prune_by_magnitude(model, MaskSet({"0.weight": torch.ones(8, 4, dtype=torch.bool)}), 0.2),
    "TaylorPruner": lambda: TaylorPruner(model, torch.zeros(2, 4), "fo_gate", target=Target.channels(1)),
}
for name, attempt in attempts.items():
    try:
        attempt()
    except TypeError as err:
        assert "does not support FSDP-sharded models" in str(err), (name, err)
        print(name, "refused")
    else:
        raise SystemExit(name + " accepted an FSDP model")
torch.distributed.destroy_process_group()
"""


@needs_distributed
def test_fsdp_sharded_models_are_refused_with_the_reason(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    result = subprocess.run([sys.executable, "-c", _FSDP_REFUSED, str(tmp_path / "store")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == ["MaskSet.ones refused", "prune_by_magnitude refused", "TaylorPruner refused"]


def test_ddp_wrapper_is_looked_through_by_the_lottery_pieces():
    from pyprune_ext.lottery import MaskSet
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    class FakeDDP(nn.parallel.DistributedDataParallel):  # no process group needed to test the unwrapping
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module
    wrapped = FakeDDP(model)
    masks = MaskSet.ones(wrapped)
    assert list(masks.keys()) == ["0.weight", "2.weight"]
    assert masks.apply(wrapped) is wrapped
    assert type(model[0]).__name__ == "MaskedLinear"
