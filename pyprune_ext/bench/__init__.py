"""Kernel microbenchmarks, installed with the package: each compares one of
pyprune_ext's ops with the plain-PyTorch ways and prints Markdown tables.

    pyprune bench taylor|masked|magnitude|all [options]
    python -m pyprune_ext.bench.<name> [options]

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
}
NAMES = tuple(BENCHMARKS)


def run(name: str, argv: Optional[List[str]] = None) -> None:
    """Runs benchmark `name` with command-line arguments `argv` (its own
    options, e.g. ``["--quick"]``). Argument errors and ``--help`` raise
    SystemExit, as argparse does."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    module.main(list(argv) if argv is not None else [], prog=f"pyprune bench {name}")
