"""Scaling from 1 to N processes on the CPU (torchrun, DDP, gloo): a lottery-ticket
level and a Taylor pruning run, with the all-reduce of the Taylor statistics
timed on its own.

    python -m benchmarks.distributed [--nproc 1 2] [--cores 2] [--steps 200] [--json FILE]

The processes share ``--cores`` cores (default: all): one process runs with
``cores`` threads, N processes with ``cores / N`` each, so the table compares
the same machine used two ways. The global batch is the same for every N
(each process takes 1/N of it), so every row computes the same thing.

Jobs:
  lottery level   LeNet-300-100 on Fashion-MNIST (digits if absent), batch 60, Adam,
                  masked at 51% (level 3), ``--steps`` iterations through LotteryRun.
  taylor fo_bn    ResNet-20, batch 64 of 28x28 images, SGD, TaylorPruner (fo_bn: the
                  statistics are BatchNorm gradients) pruning every 30 minibatches.
  taylor fo_gate  the same with gate hooks (taylor_channel_stats on activations).

Columns: time per step (median of the per-step times after a warm-up), speed-up
over 1 process, and for Taylor the time spent in the statistics all-reduce per
step (one flattened all-reduce per minibatch) and its share of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyprune_ext.bench.common import machine_name, print_table, write_json

WARMUP = 20


# ----------------------------------------------------------------------- workers

def _time_all_reduce():
    """Wraps pyprune_ext.distributed.all_reduce_sum_ to add up its wall time."""
    from pyprune_ext import distributed
    original, spent = distributed.all_reduce_sum_, [0.0]

    def timed(tensors, group=None):
        start = time.perf_counter()
        original(tensors, group)
        spent[0] += time.perf_counter() - start
    distributed.all_reduce_sum_ = timed
    return spent


def _data(dataset: str):
    from pyprune_ext.data import load_dataset
    try:
        return load_dataset(dataset, seed=0)
    except FileNotFoundError:
        return load_dataset("digits", seed=0)


def _lottery_level(steps: int, out: Path) -> dict:
    """Rank 0's mean step time of level 3 (every rank trains the same steps)."""
    from pyprune_ext.lottery import LotteryConfig, LotteryRun, classification_evaluator, classification_step
    from pyprune_ext.models import lenet300
    splits = _data("fashion-mnist")
    size = 1
    for s in splits.input_shape:
        size *= s
    config = LotteryConfig(levels=3, iterations=steps + WARMUP, eval_every=10 ** 9, checkpoint_every=10 ** 9,
                           batch_size=60, rate=0.2, seed=0)
    evaluate = classification_evaluator({"val": torch.utils.data.Subset(splits.val, range(60))})
    run = LotteryRun(lambda: lenet300(size, splits.num_classes), classification_step, evaluate, config, out,
                     train_data=splits.train, eval_splits=("val",), progress=False)
    metrics = run.run()  # levels 0-2 make the level-3 masks
    return {"step_ms": metrics[3]["step_time_ms"], "dataset": splits.name}


def _taylor_run(criterion: str, steps: int) -> dict:
    from pyprune_ext.models import resnet20
    from pyprune_ext.taylor import Target, TaylorPruner
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = torch.distributed.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    inner = resnet20(10, 1)
    model = torch.nn.parallel.DistributedDataParallel(inner) if world > 1 else inner
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = TaylorPruner(model, torch.zeros(2, 1, 28, 28), criterion, target=Target.flops(0.05), every=30,
                          prune_per_step=2)
    spent = _time_all_reduce()
    generator = torch.Generator().manual_seed(1)
    per_rank, times, reduce_before = 64 // world, [], 0.0
    for step in range(steps + WARMUP):
        x = torch.randn(64, 1, 28, 28, generator=generator)[rank * per_rank:(rank + 1) * per_rank]
        y = torch.randint(0, 10, (64,), generator=generator)[rank * per_rank:(rank + 1) * per_rank]
        if step == WARMUP:
            reduce_before = spent[0]
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.step()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"step_ms": 1e3 * statistics.median(times[WARMUP:]),
            "allreduce_ms": 1e3 * (spent[0] - reduce_before) / steps}


def worker(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    results = {"lottery level": _lottery_level(args.steps, Path(args.worker).parent / "lottery")}
    for criterion in ("fo_bn", "fo_gate"):
        results[f"taylor {criterion}"] = _taylor_run(criterion, args.steps)
    if world == 1 or torch.distributed.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(results))
    if world > 1:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------ driver

def measure(nproc: int, cores: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        threads = max(1, cores // nproc)
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", "--nproc-per-node", str(nproc)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(launcher + [__file__, "--worker", str(out), "--threads", str(threads), "--steps", str(steps)],
                       check=True, env=env)
        return {"threads": threads, **json.loads(out.read_text())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by the processes")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per job")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    results = {n: measure(n, args.cores, args.steps) for n in args.nproc}
    base = results[args.nproc[0]]
    rows = []
    for job in base:
        if job == "threads":
            continue
        for n, result in results.items():
            r = result[job]
            reduce = r.get("allreduce_ms")
            rows.append([job, str(n), str(result["threads"]), f"{r['step_ms']:.2f}",
                         f"{base[job]['step_ms'] / r['step_ms']:.2f}x",
                         "-" if reduce is None or n == 1 else f"{reduce:.3f} ({100 * reduce / r['step_ms']:.1f}%)"])
    print_table(f"Scaling on {machine_name('cpu')}, {args.cores} cores shared, {args.steps} steps, gloo",
                ["job", "processes", "threads each", "ms / step", "speed-up", "stats all-reduce ms / step"], rows)
    if args.json:
        write_json(args.json, {"machine": machine_name("cpu"), "cores": args.cores, "steps": args.steps,
                               "results": {str(n): r for n, r in results.items()}})


if __name__ == "__main__":
    main()
