"""Kernel microbenchmarks, installed with the package: each compares one of
pyprune_ext's ops with the plain-PyTorch ways and prints Markdown tables.

    pyprune bench taylor|masked|magnitude|coverage|semi_structured|all [options]
    python -m pyprune_ext.bench.<name> [options]

``all`` runs the benchmarks in ``IN_ALL``: every one except those listed in
``EXCLUDED_FROM_ALL`` (with why), which run only by name.
A benchmark writes nothing unless given ``--json FILE``. The end-to-end
reproductions (lottery tickets, Taylor pruning runs) stay in the repository's
``benchmarks/`` folder.
"""

from __future__ import annotations

import importlib
from typing import List, Optional

BENCHMARKS = {
    "taylor": "taylor_channel_stats against eager PyTorch, torch.compile and a bandwidth reference",
    "masked": "masked / sparse linear and conv layers against dense, torch.nn.utils.prune and CSR",
    "magnitude": "global magnitude pruning (radix select) against kthvalue, topk and sort",
    "coverage": "dependency analysis and channel removal over the torchvision model zoo, beside Torch-Pruning",
    "semi_structured": "2:4 MaskedLinear on sparse tensor cores against dense cuBLAS (CUDA only)",
}
NAMES = tuple(BENCHMARKS)
# Left out of `pyprune bench all`: name -> why.
EXCLUDED_FROM_ALL = {
    "coverage": "slow: one subprocess per torchvision model, over an hour on a 2-core CPU",
    "semi_structured": "CUDA only (2:4 sparse tensor cores); the GPU check runs it",
}
IN_ALL = tuple(name for name in NAMES if name not in EXCLUDED_FROM_ALL)


def run(name: str, argv: Optional[List[str]] = None) -> None:
    """Runs benchmark `name` with command-line arguments `argv` (its own
    options, e.g. ``["--quick"]``). Argument errors and ``--help`` raise
    SystemExit, as argparse does."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    module.main(list(argv) if argv is not None else [], prog=f"pyprune bench {name}")
