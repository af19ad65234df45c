"""Helpers shared by the tests/test_lottery_*.py files and tests/lottery_worker.py."""

from __future__ import annotations

import functools

import pytest
import torch

from pyprune_ext.data import load_dataset
from pyprune_ext.lottery import LotteryConfig, LotteryRun, classification_evaluator, classification_step
from pyprune_ext.models import lenet300


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread for the lottery tests: these tiny matmuls run several times
    slower with two threads on busy shared cores (and results then match the
    single-threaded worker subprocess). Import this fixture into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def digits():
    """scikit-learn digits splits (8x8 images, 1257 / 180 / 360)."""
    return load_dataset("digits")


def lenet_digits() -> torch.nn.Module:
    """LeNet-300-100 for 8x8 digits (64 inputs)."""
    return lenet300(64, 10)


def small_config(**overrides) -> LotteryConfig:
    """A run that takes about a second per level on one busy core."""
    settings = dict(levels=2, iterations=60, eval_every=20, output_rate=0.1, batch_size=60, seed=0)
    settings.update(overrides)
    return LotteryConfig(**settings)


def resume_config() -> LotteryConfig:
    """The run of the resume test (tests/lottery_worker.py and its in-process reference)."""
    return small_config(levels=2, iterations=60, eval_every=10, checkpoint_every=5)


def digits_run(run_dir, config: LotteryConfig, train_step=classification_step, **kwargs) -> LotteryRun:
    splits = digits()
    evaluate = classification_evaluator({"val": splits.val, "test": splits.test})
    return LotteryRun(lenet_digits, train_step, evaluate, config, run_dir, train_data=splits.train,
                      progress=False, **kwargs)
