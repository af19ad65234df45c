"""Pieces every ``pyprune`` subcommand shares: the user-facing error, the option
value types, console output, device and thread checks, data and model
resolution, the output folder."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
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


# ------------------------------------------------------------------ value types
#
# Every option value is checked by one of these argparse ``type=`` functions, so a
# bad value stops the command at parse time (one line, exit 2) before any data is
# read or any training starts, and each bound lives in one place.

#: Largest count an option takes (iterations, batch size, levels, ...): a 32-bit
#: count. Nothing a run can finish needs more, and larger values overflow the C
#: integers of torch's samplers and index math.
MAX_COUNT = 2**31 - 1
#: Seeds go to numpy and scikit-learn, whose seeds are 32-bit.
MAX_SEED = 2**32 - 1


def _number(kind, check, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):  # inf, nan, 1e309 (which float() reads as inf)
            note = "" if "finite" in what else " (not a finite number)"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}{note}")
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


FRACTION_KEPT = _number(float, lambda v: 0.0 < v < 1.0, "a fraction kept, strictly between 0 and 1 (0.5 = half)")
RATE = _number(float, lambda v: 0.0 < v < 1.0, "a fraction strictly between 0 and 1")
POSITIVE_INT = _number(int, lambda v: 1 <= v <= MAX_COUNT, f"an integer from 1 to {MAX_COUNT}")
NON_NEGATIVE_INT = _number(int, lambda v: 0 <= v <= MAX_COUNT, f"an integer from 0 to {MAX_COUNT}")
SEED = _number(int, lambda v: 0 <= v <= MAX_SEED, f"a seed from 0 to {MAX_SEED}")
POSITIVE_FLOAT = _number(float, lambda v: 0 < v, "a finite number > 0")
EPOCHS = _number(float, lambda v: 0 < v <= MAX_COUNT, f"a number of epochs > 0 and at most {MAX_COUNT}")


def nm_pattern(text: str) -> str:
    """``--pattern N:M``, normalized (``" 2:4"`` -> ``"2:4"``)."""
    from ..lottery.nm import NMPattern

    try:
        return str(NMPattern.parse(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(text: str) -> int:
    """``--threads``: 1 to the number of CPUs. More threads than CPUs only slow torch
    down, and far more make OpenMP fail to start its threads (which surfaced as an
    unrelated import error)."""
    limit = cpu_count()
    return _number(int, lambda v: 1 <= v <= limit, f"an integer from 1 to {limit} (the CPUs of this machine)")(text)


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_creatable_in(path: Path) -> None:
    """The folders to create for ``path`` can be created: the nearest existing
    ancestor is a directory this user may write in."""
    base = _first_existing(path.parent)
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path}: cannot write in {base} (permission denied)")


def output_file(text: str) -> str:
    """A file the command will write (``--export``): checked when the options are
    parsed, so that a path it cannot write fails before the run, not after it.
    Missing parent folders are created; an existing file is replaced."""
    path = Path(text).expanduser()
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file name (e.g. {path / 'model.pt'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path}: cannot replace it (permission denied)")
    _check_creatable_in(path)
    return text


def output_folder(text: str) -> str:
    """A folder the command will create or reuse (``--out``, ``bench --json-dir``)."""
    path = Path(text).expanduser()
    if not text:
        raise argparse.ArgumentTypeError("expected a folder name, got ''")
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{path}: cannot write in it (permission denied)")
        return text
    _check_creatable_in(path)
    return text


output_file.__name__, output_folder.__name__, threads.__name__ = "a file to write", "a folder", "a thread count"


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


def set_threads(count: Optional[int]) -> None:
    if count is not None:
        torch.set_num_threads(count)


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
    except (FileNotFoundError, ValueError) as err:
        # ValueError: a corrupt file or files that disagree (IdxFormatError is one);
        # the message names the file. The library's advice names its root= argument;
        # on the command line that is --data-dir.
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
