"""Runs a small lottery-ticket experiment in a run directory (for the resume test).

    python tests/lottery_worker.py RUN_DIR

PYPRUNE_LOTTERY_TEST_SLEEP=<seconds> makes every training step sleep that long,
so the test can kill the process in the middle of a level.
"""

import os
import sys
import time

import torch

torch.set_num_threads(1)  # the same arithmetic in every process

from lottery_common import digits_run, resume_config  # noqa: E402
from pyprune_ext.lottery import classification_step  # noqa: E402

SLEEP = float(os.environ.get("PYPRUNE_LOTTERY_TEST_SLEEP", "0"))


def slow_step(model, batch, optimizer):
    if SLEEP:
        time.sleep(SLEEP)
    return classification_step(model, batch, optimizer)


def main(run_dir: str) -> None:
    digits_run(run_dir, resume_config(), train_step=slow_step).run()


if __name__ == "__main__":
    main(sys.argv[1])
