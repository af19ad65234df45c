"""torch.distributed helpers shared by the Taylor pruner and the lottery runner.

Everything here is a no-op in a single process (torch.distributed not
initialised, or a world of one), so the same code runs with and without
``torchrun``. Collectives go through one flattened buffer per call: one
all-reduce per minibatch however many layers there are.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Sync", "all_reduce_sum_", "barrier", "check_same_on_all_ranks", "comm_device", "is_active", "rank",
           "sync_for", "tensor_bytes", "unwrap_model", "world_size"]


def _dist():
    return torch.distributed if torch.distributed.is_available() else None


def is_active(group=None) -> bool:
    """True inside an initialised process group of more than one process."""
    dist = _dist()
    return bool(dist is not None and dist.is_initialized() and dist.get_world_size(group) > 1)


def world_size(group=None) -> int:
    return torch.distributed.get_world_size(group) if is_active(group) else 1


def rank(group=None) -> int:
    dist = _dist()
    return dist.get_rank(group) if dist is not None and dist.is_initialized() else 0


def all_reduce_sum_(tensors: Sequence[Tensor], group=None) -> None:
    """Sums each tensor over the ranks, in place, with a single all-reduce
    (the tensors are packed into one float64 buffer and unpacked after)."""
    if not is_active(group) or not tensors:
        return
    device = comm_device(group)
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def comm_device(group=None) -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, else the CPU (gloo)."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checksum(parts: Iterable[bytes]) -> int:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return int.from_bytes(digest.digest()[:7], "little")  # fits a float64 exactly


def check_same_on_all_ranks(what: str, parts: Iterable[bytes], group=None) -> None:
    """Raises RuntimeError on every rank unless all ranks passed the same bytes
    (compared through a checksum: one all-reduce of MIN and one of MAX)."""
    if not is_active(group):
        return
    value = float(_checksum(parts))
    low = torch.tensor([value], dtype=torch.float64, device=comm_device(group))
    high = low.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    if low.item() != high.item():
        raise RuntimeError(f"{what} differs between ranks (rank {rank(group)}): the processes have drifted apart; "
                           "check that every rank runs the same model, seed and data order")


def tensor_bytes(tensors: Iterable[Tensor]) -> Iterable[bytes]:
    """Raw bytes of tensors (moved to the CPU), for :func:`check_same_on_all_ranks`."""
    for t in tensors:
        yield t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def unwrap_model(model: nn.Module, who: str) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (hooks, analysis and
    surgery act on it); FSDP-sharded models are refused with the reason."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    fsdp_types = _fsdp_types()
    if isinstance(model, fsdp_types) or any(isinstance(m, fsdp_types) for m in model.modules()):
        raise TypeError(
            f"{who} does not support FSDP-sharded models: each rank holds only a shard of every weight, so "
            "per-channel statistics, magnitude thresholds and channel surgery would see part of the model. "
            "Prune the unsharded model (wrapped in DistributedDataParallel, or gathered with "
            "FSDP.summon_full_params / a full state_dict) and shard it afterwards.")
    return model


def _fsdp_types() -> tuple:
    types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        types.append(FullyShardedDataParallel)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # fully_shard (FSDP2) modules
        types.append(FSDPModule)
    except ImportError:
        pass
    return tuple(types)


def barrier(group=None) -> None:
    if is_active(group):
        torch.distributed.barrier(group=group)


class Sync:
    """Asks for synchronisation over a process group (``group=None``: the default
    group). Holding ``None`` instead of a Sync means: never synchronise."""

    def __init__(self, group=None):
        self.group = group

    @property
    def active(self) -> bool:
        return is_active(self.group)


def sync_for(distributed_flag: Optional[bool], group=None) -> Optional[Sync]:
    """``distributed=None`` (auto): synchronise when a process group of more than
    one process is initialised; True: require one; False: never."""
    if distributed_flag is False:
        return None
    if distributed_flag is True and not is_active(group):
        raise RuntimeError("distributed=True but torch.distributed is not initialised with more than one process "
                           "(launch with torchrun and call torch.distributed.init_process_group first)")
    return Sync(group) if is_active(group) else None
