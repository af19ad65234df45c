"""A lottery-ticket run in one process or under torchrun (DDP, gloo); used by
tests/test_distributed.py.

    python tests/ddp_lottery_worker.py RUN_DIR LEVELS ITERATIONS [CONTROL]
    torchrun --standalone --nproc-per-node 2 tests/ddp_lottery_worker.py RUN_DIR LEVELS ITERATIONS [CONTROL]

LeNet-300-100 in float64 (so that one and two processes agree to rounding) on
1200 of the digits training images (20 full batches of 60). Each rank writes its
process id to RUN_DIR.pid<rank> (so a test can kill one rank). CONTROL "random"
also runs the random-pruning control on the ticket masks.
"""

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pyprune_ext.data import load_dataset
from pyprune_ext.lottery import LotteryConfig, LotteryRun, classification_evaluator, classification_step
from pyprune_ext.models import lenet300


class ToDouble(nn.Module):
    def forward(self, x):
        return x.double()


def factory() -> nn.Module:
    return nn.Sequential(ToDouble(), lenet300(64, 10).double())


def main(run_dir: str, levels: str, iterations: str, control: str = "none") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    Path(f"{run_dir}.pid{rank}").write_text(str(os.getpid()))
    splits = load_dataset("digits", seed=0)
    images, labels = splits.train.tensors
    train = TensorDataset(images[:1200], labels[:1200])
    evaluate = classification_evaluator({"val": splits.val, "test": splits.test})
    runs = [("ticket", "none")] + ([(control, control)] if control != "none" else [])
    for name, kind in runs:
        config = LotteryConfig(levels=int(levels), iterations=int(iterations), eval_every=20, batch_size=60,
                               rate=0.2, output_rate=0.1, control=kind, seed=3,
                               control_source=None if kind == "none" else f"{run_dir}/ticket")
        LotteryRun(factory, classification_step, evaluate, config, f"{run_dir}/{name}", train_data=train,
                   progress=False).run()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
