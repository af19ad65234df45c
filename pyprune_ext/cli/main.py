"""The ``pyprune`` command line (also ``python -m pyprune_ext``).

Exit codes: 0 done; 2 a problem with what was asked (bad option, impossible
target, missing data, CUDA unavailable), reported in one line without a
traceback; 130 interrupted (Ctrl-C), with what was kept and how to resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import launch
from ..data import DATASETS
from .common import (EPOCHS, FRACTION_KEPT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, RATE, SEED, Console,
                     UsageError, default_output_dir, model_choices, nm_pattern, output_file, output_folder, preflight,
                     threads)

COMMANDS = {
    "taylor": "prune channels with Taylor importance, fine-tune, remove them, export",
    "lottery": "find lottery tickets by iterative magnitude pruning with rewinding (resumable)",
    "bench": "run the kernel microbenchmarks (or the model-zoo coverage) and print their tables",
    "info": "show the versions, what was compiled and the devices seen",
}


# ---------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (like every other error of the
    command) instead of the usage text followed by the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _shared_options() -> argparse.ArgumentParser:
    shared = _Parser(add_help=False)
    g = shared.add_argument_group("model and data")
    g.add_argument("--model", choices=model_choices(), help="built-in architecture")
    g.add_argument("--model-file", metavar="PATH.py:FUNCTION",
                   help="your own model: FUNCTION(input_shape=(C,H,W), num_classes=K) -> nn.Module "
                        "(it may take either, both or neither argument)")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 digits, built in (default); fashion-mnist, mnist: IDX files")
    g.add_argument("--data-dir", metavar="DIR", help="folder with the IDX files (default for fashion-mnist: "
                                                     "/usr/share/datasets/fashion-mnist, Debian's package)")
    g = shared.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=EPOCHS, help="training length in epochs")
    length.add_argument("--iterations", type=POSITIVE_INT, help="training length in minibatches")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=60, help="default 60")
    g.add_argument("--lr", type=POSITIVE_FLOAT, help="learning rate")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="default adam")
    g.add_argument("--seed", type=SEED, default=0, help="default 0")
    g = shared.add_argument_group("running")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    g.add_argument("--threads", type=threads,
                   help="CPU threads for torch, at most the number of CPUs (default: torch's)")
    g.add_argument("--nproc", type=POSITIVE_INT, default=1,
                   help="processes on this machine, via torchrun and DDP (gloo on the CPU, NCCL with one GPU each); "
                        "--batch-size stays the global batch (default 1)")
    g.add_argument("--out", metavar="DIR", type=output_folder,
                   help="output folder (default pyprune-runs/<command>-<model>-<dataset>-seed<seed>; "
                        "rerunning reuses it)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or notes, just the summary")
    g.add_argument("--json", action="store_true", help="print the results as JSON on stdout (text goes to stderr)")
    return shared


def _taylor_parser(sub, shared) -> None:
    from ..taylor import registered_importances  # importing it registers the built-in criteria
    p = sub.add_parser("taylor", parents=[shared], help=COMMANDS["taylor"], description=COMMANDS["taylor"])
    g = p.add_argument_group("pruning")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--target-flops", type=FRACTION_KEPT, help="fraction of FLOPs (MACs) to keep (default 0.5)")
    target.add_argument("--target-params", type=FRACTION_KEPT, help="fraction of parameters to keep")
    target.add_argument("--channels", type=POSITIVE_INT, help="number of channels to remove")
    # Read when the parser is built: criteria registered before main() runs are choices too.
    g.add_argument("--criterion", choices=registered_importances(), default="fo_bn",
                   help="importance criterion: a Taylor estimate or one registered with "
                        "pyprune_ext.taylor.register_importance (default fo_bn)")
    g.add_argument("--every", type=POSITIVE_INT, default=10, help="minibatches between pruning steps (default 10)")
    g.add_argument("--prune-per-step", type=POSITIVE_INT, help="channels per step (default 2%% of them)")
    g.add_argument("--scope", choices=("global", "local"), default="global", help="ranking (default global)")
    g.add_argument("--round-to", type=POSITIVE_INT, default=1, help="keep channel counts multiples of this")
    g.add_argument("--normalize", choices=("none", "l2", "macs", "params"), default="none",
                   help="make scores comparable across groups: each group's L2 norm, or each channel's score per "
                        "MAC / parameter its removal saves (heads beside MLP neurons; default none)")
    g.add_argument("--finetune-epochs", type=NON_NEGATIVE_INT, default=4, help="after pruning (default 4)")
    g.add_argument("--load", metavar="STATE.pt", help="start from this trained state_dict instead of training")
    g.add_argument("--export", metavar="FILE", type=output_file,
                   help="save the pruned model to load with plain torch (torch.export.load(FILE).module())")
    p.set_defaults(model="resnet20", lr=1e-3, default_epochs=6.0)


def _lottery_parser(sub, shared) -> None:
    p = sub.add_parser("lottery", parents=[shared], help=COMMANDS["lottery"], description=COMMANDS["lottery"])
    g = p.add_argument_group("iterative magnitude pruning")
    g.add_argument("--levels", type=NON_NEGATIVE_INT, default=10,
                   help="pruning levels after the dense one (default 10: 10.7%% of the weights left at rate 0.2)")
    g.add_argument("--rate", type=RATE, default=0.2, help="fraction of the remaining weights pruned per level "
                                                          "(default 0.2)")
    g.add_argument("--output-rate", type=RATE, help="rate of the output layer (the paper: 0.1; default --rate)")
    g.add_argument("--scope", choices=("layer", "global"), default="layer", help="default layer")
    g.add_argument("--pattern", metavar="N:M", type=nm_pattern,
                   help="N:M tickets (e.g. 2:4, which sparse tensor cores run): level 1 keeps the N largest of every "
                        "M weights along each layer's input, later levels prune --rate unstructured on top")
    g.add_argument("--pattern-incompatible", choices=("dense", "error"), default="dense",
                   help="a layer whose input dim is not a multiple of M: left dense at the N:M level (default) or "
                        "refused")
    g.add_argument("--rewind", type=NON_NEGATIVE_INT, default=0, metavar="ITER",
                   help="rewind to iteration ITER (0 = the initialisation, default)")
    g.add_argument("--control", default="reinit,random", metavar="LIST",
                   help="controls run on the ticket masks: reinit, random, both (default reinit,random) or none")
    g.add_argument("--eval-every", type=POSITIVE_INT, help="iterations between evaluations (default: each epoch)")
    g.add_argument("--export", metavar="FILE", type=output_file,
                   help="save a ticket (plain torch modules, zeros in place) to load with "
                        "torch.export.load(FILE).module()")
    g.add_argument("--export-level", type=NON_NEGATIVE_INT, help="which level to export (default the last)")
    p.set_defaults(model="lenet300", lr=1.2e-3, default_epochs=20.0)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help=COMMANDS["bench"], description=COMMANDS["bench"])
    p.add_argument("name", nargs="?", default="all",
                   help="taylor, masked, magnitude, coverage, semi_structured or all (default: every one "
                        "but coverage, which is slow, and semi_structured, which needs a GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--quick", action="store_true", help="a few small cases")
    p.add_argument("--json-dir", metavar="DIR", type=output_folder, help="also write <DIR>/<name>.json")
    g = p.add_argument_group("coverage only")
    g.add_argument("--models", metavar="A,B,C", help="torchvision model names and extra cases (default all)")
    g.add_argument("--timeout", type=POSITIVE_FLOAT, metavar="S", help="seconds per model (default 300)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyprune", description="Taylor channel pruning and lottery tickets on custom PyTorch ops.",
        epilog="Run 'pyprune <command> --help' for a command's options.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"pyprune_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    # One shared-options parser per command: argparse's parents share action
    # objects, so set_defaults on one command would change the other's defaults.
    _taylor_parser(sub, _shared_options())
    _lottery_parser(sub, _shared_options())
    _bench_parser(sub)
    p = sub.add_parser("info", help=COMMANDS["info"], description=COMMANDS["info"])
    p.add_argument("--json", action="store_true", help="print as JSON")
    return parser


# ------------------------------------------------------------------------ main

def _handler(command: str):
    from . import bench, info, lottery, taylor
    return {"taylor": taylor.run, "lottery": lottery.run, "bench": bench.run, "info": info.run}[command]


def _resume_hint(args, console: Optional[Console]) -> str:
    out = console.out_dir if console is not None else default_output_dir(args, args.command)
    if args.command == "lottery" and out is not None and Path(out, "ticket").is_dir():
        return (f"Finished levels and the current level's last checkpoint are kept in {out}; "
                "rerun the same command to resume.")
    if args.command == "taylor" and out is not None and Path(out, "dense.pt").is_file():
        return (f"A finished dense training is kept in {out}/dense.pt; rerun the same command to continue "
                "from it (pruning restarts).")
    return "Nothing was kept."


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "model_file", None) and "--model" in (argv if argv is not None else sys.argv[1:]):
        parser.error("give --model or --model-file, not both")
    if hasattr(args, "default_epochs"):
        if args.epochs is None and args.iterations is None:
            args.epochs = args.default_epochs
        del args.default_epochs
    if launch.is_launcher(args):
        return _launch(args, argv if argv is not None else sys.argv[1:])
    rank = launch.init_process_group(args) if hasattr(args, "nproc") else 0
    console = Console(quiet=getattr(args, "quiet", False), json_mode=getattr(args, "json", False), silent=rank != 0)
    try:
        _handler(args.command)(args, console)
    except UsageError as err:
        print(f"pyprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\npyprune {args.command}: interrupted. {_resume_hint(args, console)}", file=sys.stderr)
        return 130
    finally:
        launch.finish_process_group()
    return 0


def _launch(args, argv: List[str]) -> int:
    """--nproc N: checks what can be checked once, then runs N processes with torchrun."""
    try:
        preflight(args)
        launch.check_nproc(args)
    except UsageError as err:
        print(f"pyprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    try:
        code = launch.launch(args, argv)
    except KeyboardInterrupt:
        print(f"\npyprune {args.command}: interrupted. {_resume_hint(args, None)}", file=sys.stderr)
        return 130
    if code != 0:
        print(f"pyprune {args.command}: the --nproc {args.nproc} run failed (exit code {code}; torchrun's report "
              f"is above). {_resume_hint(args, None)}", file=sys.stderr)
    return code


def run_console() -> None:
    """The console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())
