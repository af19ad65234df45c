"""Seeds derived from a run's seed, and capture/restore of every RNG a training
step may draw from (torch CPU and CUDA, numpy's global generator, Python's random)."""

from __future__ import annotations

import hashlib
import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["derive_seed", "get_rng_state", "seed_everything", "set_rng_state"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``(seed, "level", 3)``), the same on every
    machine and Python version (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy's global generator and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def get_rng_state() -> Dict[str, Any]:
    """Every RNG state, in types ``torch.load(weights_only=True)`` accepts
    (tensors, lists, tuples, ints, floats, strings)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
