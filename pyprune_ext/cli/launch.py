"""``--nproc N``: the command reruns itself under torchrun (N processes on this
machine, DDP), and each process joins the process group: gloo on the CPU, NCCL
with one GPU per process on CUDA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import List

import torch

from .common import UsageError

def is_launcher(args) -> bool:
    """True in the process the user started with --nproc > 1 (it launches torchrun;
    the processes it starts get the arguments without --nproc)."""
    return getattr(args, "nproc", 1) > 1


def check_nproc(args) -> None:
    from ..taylor.importance import is_builtin  # here, not at the top: the CLI imports taylor when it needs it
    if args.command == "taylor" and not is_builtin(args.criterion):
        raise UsageError(f"--criterion {args.criterion} is registered in this process only: the --nproc {args.nproc} "
                         "processes torchrun starts would not know it (use a built-in criterion or --nproc 1)")
    if args.device == "cuda" and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {args.nproc} with --device cuda needs {args.nproc} GPUs; "
                         f"{torch.cuda.device_count()} are visible")
    if args.batch_size < args.nproc:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be at least --nproc "
                         f"{args.nproc} (one example per process)")


def launch(args, argv: List[str]) -> int:
    """Runs ``python -m pyprune_ext ARGV`` in ``args.nproc`` processes via torchrun
    and returns its exit code (the processes print and write as rank 0 says)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(args.nproc), "-m", "pyprune_ext", *_without_nproc(argv)]
    # torchrun would set 1 thread per process: share the cores instead.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc)), **os.environ}
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # Pass the Ctrl-C on and wait: torchrun stops its processes (killing
        # torchrun instead would leave them running).
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
        raise


def _without_nproc(argv: List[str]) -> List[str]:
    """The arguments minus --nproc (the processes learn their number from torchrun;
    torchrun itself would also take --nproc for an abbreviation of its own option)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def init_process_group(args) -> int:
    """Joins the torchrun process group (a no-op in a single process); returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return torch.distributed.get_rank()


def finish_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
