"""pyprune_ext: Taylor-importance channel pruning and lottery tickets on custom
PyTorch ops (torch.ops.pyprune.*), CPU and CUDA."""

from __future__ import annotations

import torch

__version__ = "0.1.0"


def _base_version(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1'."""
    return version.split("+")[0]


_REBUILD = "rebuild it from its source folder with: pip install --no-build-isolation ."


def _check_torch_version(built_with: str | None, running: str) -> None:
    """Raises ImportError when the extension was compiled against another torch."""
    if built_with and _base_version(built_with) != _base_version(running):
        raise ImportError(
            f"pyprune_ext was built against torch {built_with} but torch {running} "
            f"is installed; {_REBUILD}")


def _load_extension() -> None:
    """Imports the compiled ops, explaining a torch mismatch instead of a bare
    undefined-symbol error."""
    try:
        from ._build_config import TORCH_VERSION as recorded
    except ImportError:
        recorded = None
    try:
        from . import _C  # noqa: F401  (registers torch.ops.pyprune.*)
    except ImportError as err:
        _check_torch_version(recorded, torch.__version__)
        raise ImportError(f"pyprune_ext's compiled ops could not be loaded ({err}); {_REBUILD}") from err
    # The version the C++ code was compiled against, from torch's own headers.
    _check_torch_version(torch.ops.pyprune._build_info()[2], torch.__version__)


_load_extension()

from . import masking, nn, ops  # noqa: E402
from .masking import ZeroKeeper  # noqa: E402
from .ops import (apply_mask, magnitude_prune, magnitude_threshold, masked_conv2d,  # noqa: E402
                  masked_linear, mask_pack, sparse_masked_conv2d, sparse_masked_linear, taylor_channel_stats, taylor_channel_stats_,
                  taylor_weight_stats)


def build_info() -> dict:
    """What the compiled extension contains.

    Returns a dict with: ``cuda`` (CUDA kernels compiled), ``cuda_arch_list``
    (architectures they were compiled for, e.g. ``"8.0;9.0+PTX"``), ``torch_version``
    (the torch the extension was built against), ``openmp`` (CPU kernels
    multi-threaded through OpenMP) and ``cpu_only_reason`` (why a build has no
    CUDA kernels, as setup.py saw it; empty otherwise or when unknown).
    """
    cuda, archs, torch_version, openmp = torch.ops.pyprune._build_info()
    try:
        from ._build_config import CPU_ONLY_REASON as cpu_only_reason
    except ImportError:  # a build by an older setup.py, or the CMake library
        cpu_only_reason = ""
    return {
        "cuda": bool(cuda),
        "cuda_arch_list": archs,
        "torch_version": torch_version,
        "openmp": bool(openmp),
        "cpu_only_reason": "" if cuda else cpu_only_reason,
    }


__all__ = [
    "ZeroKeeper",
    "apply_mask",
    "build_info",
    "magnitude_prune",
    "magnitude_threshold",
    "mask_pack",
    "masked_conv2d",
    "masked_linear",
    "masking",
    "nn",
    "ops",
    "sparse_masked_conv2d",
    "sparse_masked_linear",
    "taylor_channel_stats",
    "taylor_channel_stats_",
    "taylor_weight_stats",
]
