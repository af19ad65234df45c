"""A deterministic batch order whose position can be saved, restored and rewound.

The order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the examples
in ``randperm(size)`` drawn from a generator seeded with ``derive_seed(seed, e)``.
Its state is just ``(epoch, position)``, so resuming after a crash or rewinding to
iteration ``k`` reproduces exactly the batches an uninterrupted run would see,
whatever else used the global random generators in between.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from .seeding import derive_seed

__all__ = ["DataOrder", "fetch_batch"]


class DataOrder:
    """Batches of example indices for one dataset, epoch after epoch.

    Args:
        size: number of examples.
        batch_size: examples per batch.
        seed: seeds every epoch's permutation.
        drop_last: drop the last, smaller batch of each epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, drop_last: bool = False):
        if size < 1:
            raise ValueError(f"DataOrder: the dataset is empty (size={size})")
        if batch_size < 1:
            raise ValueError(f"DataOrder: batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > size:
            raise ValueError(f"DataOrder: drop_last with batch_size={batch_size} > {size} examples "
                             "leaves no batch")
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=generator), epoch
        return self._perm

    def next_indices(self) -> Tensor:
        """The indices of the next batch; advances the position."""
        start = self.position * self.batch_size
        indices = self._permutation(self.epoch)[start:start + self.batch_size]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return indices

    def seek(self, step: int) -> None:
        """Moves to batch number ``step`` counted from epoch 0, position 0."""
        if step < 0:
            raise ValueError(f"DataOrder.seek: step must be >= 0, got {step}")
        self.epoch, self.position = divmod(step, self.batches_per_epoch)

    @property
    def step(self) -> int:
        """Batches served since epoch 0, position 0."""
        return self.epoch * self.batches_per_epoch + self.position

    def state_dict(self) -> Dict[str, Any]:
        return {"size": self.size, "batch_size": self.batch_size, "seed": self.seed,
                "drop_last": self.drop_last, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores the position; the order itself must be the same one (size,
        batch size, seed, drop_last), else ValueError."""
        for key in ("size", "batch_size", "seed", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"DataOrder: the saved data order has {key}={state.get(key)!r} but this one "
                                 f"has {key}={getattr(self, key)!r}; it belongs to another dataset or config")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def fetch_batch(dataset: Dataset, indices: Tensor) -> Sequence[Any]:
    """The examples at ``indices``, collated. A TensorDataset is indexed directly
    (one gather per tensor instead of one Python call per example)."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[indices] for t in dataset.tensors)
    return default_collate([dataset[int(i)] for i in indices])
