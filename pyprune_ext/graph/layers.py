"""The layer types the analysis understands and ``surgery`` can shrink."""

from __future__ import annotations

from torch import nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = nn.modules.batchnorm._BatchNorm
LAYERNORMS = (nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (nn.LayerNorm,)
SHRINKABLE = CONVS + (nn.Linear, BATCHNORMS) + LAYERNORMS


def _same_computation(module: nn.Module) -> bool:
    """Whether a subclass computes what its torch.nn base computes. torch's own
    subclasses (SyncBatchNorm, lazy layers) and our masked layers do; a user
    subclass that overrides forward (e.g. a LayerNorm2d that permutes NCHW to
    normalize over channels) may not, so it is traced into instead."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or cls.__module__ == "pyprune_ext.nn.masked":
        return True
    return any(isinstance(module, base) and cls.forward is base.forward for base in SHRINKABLE)


def is_shrinkable(module: nn.Module) -> bool:
    """A Conv/Linear/BatchNorm/LayerNorm/RMSNorm that computes what torch's does."""
    return isinstance(module, SHRINKABLE) and _same_computation(module)
