"""Pieces every ``pyprune`` subcommand shares: the user-facing error, console
output, device and thread checks, data and model resolution, the output folder."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import data as data_lib
from .. import distributed
from .. import models as model_lib
from ..lottery.io import atomic_write_text
from ..lottery.metrics import summary_csv

# Command-line names that differ from pyprune_ext.models' registry names.
MODEL_ALIASES = {"vgg11": "vgg11_bn_small"}


class UsageError(Exception):
    """A problem with what the user asked for: printed as one message, exit code 2."""


class Console:
    """Where messages go. With ``--json`` stdout carries only the JSON result, so
    human-readable text goes to stderr; ``--quiet`` drops progress chatter (not
    the final summary, not errors)."""

    def __init__(self, quiet: bool = False, json_mode: bool = False, silent: bool = False):
        self.quiet, self.json_mode = quiet or silent, json_mode
        self.silent = silent  # ranks other than 0 of a --nproc run say nothing
        self.out_dir: Optional[Path] = None  # set once known, for the Ctrl-C resume hint

    @property
    def progress(self) -> bool:
        return not self.quiet

    def note(self, message: str) -> None:
        """Progress chatter: suppressed by --quiet."""
        if not self.quiet:
            from tqdm.auto import tqdm  # keeps lines from tearing open progress bars
            tqdm.write(message, file=sys.stderr if self.json_mode else sys.stdout)

    def result(self, text: str) -> None:
        """The human-readable summary: to stdout, or stderr under --json."""
        if not self.silent:
            print(text, file=sys.stderr if self.json_mode else sys.stdout, flush=True)

    def emit_json(self, payload: Any) -> None:
        if self.json_mode and not self.silent:
            print(json.dumps(payload, indent=2), flush=True)


# ------------------------------------------------------------------ environment

def resolve_device(name: str) -> torch.device:
    """The device to run on, refusing CUDA when it cannot work (with why)."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise UsageError(f"--device must be cpu or cuda, got {name!r}")
    from .. import build_info
    if not build_info()["cuda"]:
        raise UsageError("--device cuda: this pyprune_ext was built without its CUDA kernels; rebuild with "
                         "PYPRUNE_CUDA=1 pip install --no-build-isolation . (needs nvcc and a CUDA build "
                         "of torch)")
    if torch.version.cuda is None:
        raise UsageError(f"--device cuda: the installed torch {torch.__version__} is a CPU-only build")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return torch.device("cuda")


def set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------ data

def load_splits(dataset: str, data_dir: Optional[str], seed: int) -> data_lib.Splits:
    """The dataset's train/val/test splits; a missing or broken dataset is a UsageError."""
    if dataset == "digits" and data_dir is not None:
        raise UsageError("--data-dir applies to fashion-mnist and mnist; digits ships with scikit-learn")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise UsageError(f"--data-dir {data_dir}: no such directory. Point it at the folder holding the "
                         f"{dataset} IDX files (train-images-idx3-ubyte[.gz] and the three others).")
    try:
        return data_lib.load_dataset(dataset, data_dir, seed=seed)
    except (FileNotFoundError, data_lib.IdxFormatError) as err:
        # The library's advice names its root= argument; on the command line that is --data-dir.
        advice = str(err).replace("pass root=<", "pass --data-dir <")
        raise UsageError(f"cannot load --dataset {dataset}: {advice}") from None


# ---------------------------------------------------------------------- models

def model_choices() -> List[str]:
    names = sorted(set(model_lib.MODELS) | set(MODEL_ALIASES))
    if "resnet18" not in names:
        names.append("resnet18")  # listed even without torchvision: build_model explains
    return sorted(names)


def _load_model_file(spec: str):
    """``path.py:function`` -> the function object."""
    path_text, sep, function = spec.rpartition(":")
    if not sep or not path_text or not function:
        raise UsageError(f"--model-file must look like path/to/file.py:function, got {spec!r}")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(f"--model-file: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"pyprune_user_model_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"--model-file: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: report, do not crash
        raise UsageError(f"--model-file: importing {path} failed: {type(err).__name__}: {err}") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise UsageError(f"--model-file: {path} has no function named {function!r}")
    return factory


def _call_factory(factory, spec: str, input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    """Calls the user's factory with the keyword arguments it declares among
    ``input_shape`` and ``num_classes``."""
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("input_shape", tuple(input_shape)), ("num_classes", num_classes))
              if takes_any or k in params}
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise UsageError(f"--model-file: {spec}({', '.join(kwargs)}) raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model-file: {spec} must return a torch.nn.Module, returned {type(model).__name__}")
    return model


def model_factory(args, splits: data_lib.Splits):
    """A ``() -> nn.Module`` building a freshly initialised model for the data."""
    shape, classes = splits.input_shape, splits.num_classes
    if args.model_file:
        factory = _load_model_file(args.model_file)
        return lambda: _call_factory(factory, args.model_file, shape, classes)
    name = MODEL_ALIASES.get(args.model, args.model)

    def build() -> nn.Module:
        try:
            return model_lib.build_model(name, shape, classes)
        except (ValueError, ImportError) as err:
            raise UsageError(f"--model {args.model} on {splits.name} {tuple(shape)}: {err}") from None
    return build


def model_label(args) -> str:
    return Path(args.model_file.rpartition(":")[0]).stem if args.model_file else args.model


def check_model_runs(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    """One forward pass on an example batch: the model must map images to class scores."""
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as err:
        raise UsageError(f"the model cannot run on this dataset's images {tuple(example.shape[1:])}: "
                         f"{type(err).__name__}: {err}") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or out.shape != (example.shape[0], num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"the model must return class scores of shape (batch, {num_classes}); "
                         f"it returned {shape}")


# ------------------------------------------------------------------ output folder

def is_writer() -> bool:
    """Rank 0 (or a single process) writes files and prints; other ranks do neither."""
    return distributed.rank() == 0


def preflight(args) -> None:
    """The checks that make every process of a --nproc run fail the same way,
    run once before launching them: device, data, model."""
    resolve_device(args.device)
    splits = load_splits(args.dataset, args.data_dir, args.seed)
    check_model_runs(model_factory(args, splits)(), splits.train.tensors[0][:2], splits.num_classes)


def default_output_dir(args, command: str) -> Path:
    if args.out:
        return Path(args.out).expanduser()
    return Path("pyprune-runs") / f"{command}-{model_label(args)}-{args.dataset}-seed{args.seed}"


def output_dir(args, command: str) -> Path:
    """``--out``, or ``pyprune-runs/<command>-<model>-<dataset>-seed<seed>`` (a fixed
    name, so that rerunning the same command finds and resumes its folder)."""
    out = default_output_dir(args, command)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create it ({err.strerror})") from None
    return out


def write_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> Path:
    """Rows (dicts) as CSV, columns in first-seen order, written atomically."""
    return atomic_write_text(path, summary_csv(list(rows)))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]

    def line(row):
        return "  ".join(v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(row, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def percent(value: Optional[float], digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"
