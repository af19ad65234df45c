"""``pyprune bench``: the kernel microbenchmarks (pyprune_ext.bench), printing their tables."""

from __future__ import annotations

from typing import Any, Dict, List

from .common import Console, UsageError, resolve_device


def _argv(args, name: str) -> List[str]:
    argv = ["--device", args.device] if args.device else []
    if args.quick:
        argv.append("--quick")
    if args.json_dir:
        argv += ["--json", f"{args.json_dir.rstrip('/')}/{name}.json"]
    return argv


def run(args, console: Console) -> Dict[str, Any]:
    from .. import bench
    if args.device == "cuda":
        resolve_device("cuda")
    names = list(bench.NAMES) if args.name == "all" else [args.name]
    for name in names:
        if name not in bench.NAMES:
            raise UsageError(f"unknown benchmark {name!r}; choose from {', '.join(bench.NAMES)} or all")
        console.result(f"\n== pyprune bench {name}: {bench.BENCHMARKS[name]}")
        bench.run(name, _argv(args, name))
    return {"benchmarks": names}
