"""``pyprune bench``: the benchmarks of pyprune_ext.bench (kernels; the model-zoo coverage by name)."""

from __future__ import annotations

from typing import Any, Dict, List

from .common import Console, UsageError, resolve_device


# Options of `pyprune bench` that only some benchmarks take: option -> benchmarks.
ONLY_FOR = {"models": ("coverage",), "timeout": ("coverage",)}


def _argv(args, name: str) -> List[str]:
    argv = ["--device", args.device] if args.device else []
    if args.quick:
        argv.append("--quick")
    if args.json_dir:
        argv += ["--json", f"{args.json_dir.rstrip('/')}/{name}.json"]
    if getattr(args, "models", None):
        argv += ["--models", args.models]
    if getattr(args, "timeout", None) is not None:
        argv += ["--timeout", str(args.timeout)]
    return argv


def _check_options(args, names: List[str]) -> None:
    for option, takers in ONLY_FOR.items():
        if getattr(args, option, None) is not None and any(name not in takers for name in names):
            raise UsageError(f"--{option} applies to {' and '.join(takers)} only")


def run(args, console: Console) -> Dict[str, Any]:
    from .. import bench
    if args.device == "cuda":
        resolve_device("cuda")
    names = list(bench.IN_ALL) if args.name == "all" else [args.name]
    for name in names:
        if name not in bench.NAMES:
            raise UsageError(f"unknown benchmark {name!r}; choose from {', '.join(bench.NAMES)} or all")
    _check_options(args, names)
    if "coverage" in names:
        from ..bench.coverage import select_cases
        try:  # here, to fail in one line before any work
            select_cases(args.models, args.quick)
        except ValueError as err:
            raise UsageError(str(err)) from None
    for name in names:
        console.result(f"\n== pyprune bench {name}: {bench.BENCHMARKS[name]}")
        bench.run(name, _argv(args, name))
    if args.name == "all":
        for name, why in bench.EXCLUDED_FROM_ALL.items():
            console.result(f"\n(not run: {name}, {why}; run it with 'pyprune bench {name}')")
    return {"benchmarks": names}
