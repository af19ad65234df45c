"""Model-zoo coverage: how much of each torchvision classification model
pyprune_ext's dependency analysis can prune, side by side with Torch-Pruning.

    pyprune bench coverage [--models a,b,c] [--quick] [--timeout S] [--size N] [--json FILE]
    python -m pyprune_ext.bench.coverage [same options]

Cases: every model of ``torchvision.models.list_models(module=torchvision.models)``
(random weights, input 1x3x224x224, inception_v3 1x3x299x299) and small CNNs
built here for the layer patterns that are hard to prune: ``torch.chunk`` along
channels, a grouped (non-depthwise) conv, GroupNorm, ConvTranspose2d and a user
layer registered with ``pyprune_ext.graph.register_layer``. Each case runs in
its own subprocess with a timeout; the child reports JSON lines.

pyprune_ext, per case: ``dependency_groups`` time; status (ok: at least one
prunable group with exact masking; refused: none, with the first group's
reason; error: the exception; timeout); the prunable share (definition in
SHARE_DEFINITION); the last 30% of the channels of every prunable exact group
are masked (``zero_channels``) on one deep copy and removed
(``remove_channels``) on another, and the eval-mode outputs on a random input
compared (max |removed - masked| / max |masked|); params and MACs kept
(``pyprune_ext.cost.count_cost``) after removal.

Torch-Pruning 1.6.1 (optional: ``pip install pyprune_ext[bench]``), same model
and input in the same child: ``tp.pruner.MetaPruner`` with
``MagnitudeImportance(p=1)``, pruning_ratio 0.3, global_pruning=False, the
final classifier ignored (the Conv/Linear layers whose output channel count is
the model's output width, as its examples ignore the Linear with 1000
outputs); analysis time (the MetaPruner construction, which builds its
DependencyGraph), status (ok, wrong output shape, error, timeout), params and
MACs kept, counted with the same ``count_cost``.

Slow (minutes per large model on a CPU), so ``pyprune bench all`` leaves it out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import pyprune_ext
import pyprune_ext.graph as graph
from pyprune_ext.cost import count_cost
from pyprune_ext.graph.surgery import member_positions
from pyprune_ext.taylor.norm_masks import NormMasks

from .common import machine_name, print_table, write_json

PRUNE_RATIO = 0.3
DEFAULT_SIZE = 224
# torchvision models that need a larger input than DEFAULT_SIZE.
INPUT_SIZES = {"inception_v3": 299}
EXTRA_CLASSES = 10
# Outputs of removal and masking agree to fp32 rounding; deep nets accumulate it.
EQUAL_TOLERANCE = 1e-4
DEFAULT_TIMEOUT = 300.0
QUICK_TORCHVISION = ["resnet18", "mobilenet_v3_small", "densenet121", "regnet_x_400mf", "convnext_tiny"]
CHILD_MARKER = "@coverage "  # prefixes the child's JSON lines: models or libraries may print too
TP_PACKAGE = "torch-pruning"

SHARE_DEFINITION = (
    "prunable share = (channels of the groups that are prunable and have exact_masking, or are exact once their "
    "norms skip masked channels as TaylorPruner makes them) / (channels of all "
    "groups dependency_groups returns), where a group's channels are the output channels of its producing "
    "layers: group size x span summed over its 'out' and 'depthwise' members (a residual stream counts once "
    "per layer writing into it, a grouped conv's or GroupNorm's unit as its channels; the final classifier's "
    "outputs count and are never prunable; the model input's channels are produced by no layer and do not count)")


# -- the extra cases ----------------------------------------------------------------------------------
class ChunkGateNet(nn.Module):
    """A conv's channels split in two halves by torch.chunk, one gating the other (GLU-style)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, EXTRA_CLASSES)

    def forward(self, x):
        value, gate = torch.chunk(self.conv1(x), 2, dim=1)
        x = F.relu(self.conv2(value * torch.sigmoid(gate)))
        return self.fc(x.mean((2, 3)))


class GroupedConvNet(nn.Module):
    """A grouped conv (groups=4, not depthwise) between two plain convs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.grouped, self.bn2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 1)
        self.fc = nn.Linear(64, EXTRA_CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.grouped(x)))
        return self.fc(F.relu(self.conv3(x)).mean((2, 3)))


class GroupNormNet(nn.Module):
    """Convs normalised by GroupNorm (channels normalised in groups of 4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.gn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32)
        self.fc = nn.Linear(32, EXTRA_CLASSES)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class ConvTransposeNet(nn.Module):
    """A downsampling conv, a ConvTranspose2d upsampling back, a conv head."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 32, 3, stride=4, padding=1)
        self.up, self.bn = nn.ConvTranspose2d(32, 16, 2, stride=2), nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, EXTRA_CLASSES)

    def forward(self, x):
        x = F.relu(self.down(x))
        x = F.relu(self.bn(self.up(x)))
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class ChannelScale(nn.Module):
    """A user layer: one learned scale per channel (the library does not know it
    until it is registered)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class UserLayerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.scale = nn.Conv2d(3, 32, 3, stride=2, padding=1), ChannelScale(32)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, EXTRA_CLASSES)

    def forward(self, x):
        x = F.relu(self.scale(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


def _user_layer_specs() -> dict:
    return {ChannelScale: graph.ChannelwiseSpec({"gamma": 0}, channel_dim=1)}


@dataclass(frozen=True)
class Extra:
    build: Callable[[], nn.Module]
    # Layer specs registered (register_layer) while the case runs.
    layers: Callable[[], dict] = dict
    # Why the case cannot run in this version of the library, if it cannot.
    missing: Callable[[], Optional[str]] = lambda: None


def _register_layer_missing() -> Optional[str]:
    if hasattr(graph, "register_layer"):
        return None
    return "pyprune_ext.graph.register_layer does not exist in this version"


EXTRAS = {
    "extra_chunk": Extra(ChunkGateNet),
    "extra_grouped_conv": Extra(GroupedConvNet),
    "extra_groupnorm": Extra(GroupNormNet),
    "extra_conv_transpose": Extra(ConvTransposeNet),
    "extra_user_layer": Extra(UserLayerNet, _user_layer_specs, _register_layer_missing),
}


# -- which cases --------------------------------------------------------------------------------------
def torchvision_models() -> list[str]:
    """The classification models of torchvision (empty when it is not installed)."""
    if importlib.util.find_spec("torchvision") is None:
        return []
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def all_cases() -> list[str]:
    return torchvision_models() + list(EXTRAS)


def quick_cases() -> list[str]:
    available = set(torchvision_models())
    return [m for m in QUICK_TORCHVISION if m in available] + list(EXTRAS)


def input_size(name: str, size: Optional[int]) -> int:
    """``size`` when given (models that need another size then fail honestly), else the model's own."""
    return size if size is not None else INPUT_SIZES.get(name, DEFAULT_SIZE)


def build_model(name: str) -> nn.Module:
    if name in EXTRAS:
        return EXTRAS[name].build()
    import torchvision
    return redraw_zero_weights(torchvision.models.get_model(name, weights=None))


def redraw_zero_weights(model: nn.Module) -> nn.Module:
    """Layers initialised to zero (ViT's classifier) drawn again (normal, std 0.02):
    a zero output would make removed == masked hold trivially."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    return model


@contextlib.contextmanager
def _registered(layers: dict):
    """Registers ``layers`` (class -> spec) for the duration; leaves alone a class
    that is already registered."""
    added = []
    try:
        for cls, spec in layers.items():
            if cls not in graph.registered_layers():
                graph.register_layer(cls, spec)
                added.append(cls)
        yield
    finally:
        for cls in added:
            graph.unregister_layer(cls)


# -- measuring one case -------------------------------------------------------------------------------
def _output(out) -> Tensor:
    """The logits tensor of a model's output (a tensor, or the first of a tuple / dict)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _output(out[0])
    if isinstance(out, dict) and out:
        return _output(next(iter(out.values())))
    raise TypeError(f"the model's output is {type(out).__name__}, not a tensor")


@torch.no_grad()
def _forward(model: nn.Module, x: Tensor) -> Tensor:
    return _output(model(x))


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def dropped_channels(size: int) -> Tensor:
    """The last PRUNE_RATIO of a group's channels (deterministic), never all of them."""
    count = min(size - 1, round(PRUNE_RATIO * size))
    return torch.arange(size - count, size)


def kept_channels(size: int) -> Tensor:
    return torch.arange(0, size - len(dropped_channels(size)))


def produced_channels(group) -> int:
    """Output channels of the group's producing layers (see SHARE_DEFINITION)."""
    return sum(group.size * m.span for m in group.members if graph.ROLES[m.role].produces)


def _refusal(group) -> Optional[str]:
    """Why the share does not count ``group``, or None when it does."""
    if not group.prunable:
        return group.reason
    if not (group.exact_masking or group.exact_with_masked_norms):
        return f"inexact masking: {group.exact_reason}"
    return None


def share(groups) -> dict:
    """The prunable share and what it is made of (refusal reasons weighted by channels)."""
    counted = [g for g in groups if _refusal(g) is None]
    total = sum(produced_channels(g) for g in groups)
    prunable = sum(produced_channels(g) for g in counted)
    refusals = Counter()
    for g in groups:
        if _refusal(g) is not None and produced_channels(g):
            refusals[_refusal(g)] += produced_channels(g)
    return {
        "groups": len(groups),
        "prunable_groups": sum(g.prunable for g in groups),
        "exact_prunable_groups": len(counted),
        "channels": total,
        "prunable_channels": prunable,
        "prunable_share": prunable / total if total else 0.0,
        # the same ratio over group sizes (units removed together), each group counted once
        "prunable_unit_share": sum(g.size for g in counted) / max(1, sum(g.size for g in groups)),
        "refusals": [{"reason": r, "channels": c} for r, c in refusals.most_common(10)],
    }


def _first_refusal(groups) -> str:
    """The first reason, in graph order, among groups of layer outputs (else any group)."""
    reasons = [_refusal(g) for g in groups if produced_channels(g)] or [_refusal(g) for g in groups]
    return next((r for r in reasons if r), "no channel groups")


def measure_ours(model: nn.Module, x: Tensor, base_cost) -> dict:
    """dependency_groups, the share, masked and removed copies compared."""
    result: dict = {"status": "error"}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", graph.GraphAnalysisWarning)
            start = time.perf_counter()
            groups = graph.dependency_groups(model, x)
            result["analysis_s"] = time.perf_counter() - start
        result["warnings"] = [str(w.message)[:300] for w in caught
                              if issubclass(w.category, graph.GraphAnalysisWarning)][:5]
        result.update(share(groups))
        pruned = {i: g for i, g in enumerate(groups) if _refusal(g) is None}
        if not pruned:
            result.update(status="refused", reason=_first_refusal(groups))
            return result
        removed = copy.deepcopy(model)
        start = time.perf_counter()
        graph.remove_channels(removed, groups, {i: kept_channels(g.size) for i, g in pruned.items()})
        result["remove_s"] = time.perf_counter() - start
        out_removed = _forward(removed, x)
        cost = count_cost(removed, x)
        del removed
        masked = copy.deepcopy(model)
        norms = NormMasks(masked, [n for g in pruned.values() for n in g.masked_norms])
        for g in pruned.values():
            graph.zero_channels(masked, g, dropped_channels(g.size))
            for m in g.members:  # the norms' statistics skip the masked channels, as TaylorPruner's do
                if m.role == "norm" and m.name in norms.keep:
                    norms.mask(m.name, member_positions(m, dropped_channels(g.size)))
        out_masked = _forward(masked, x)
        norms.remove()
        del masked
        diff = float((out_removed - out_masked).abs().max() / out_masked.abs().max().clamp_min(1e-12))
        result.update(
            status="ok", params_kept=cost.total_params / base_cost.total_params,
            macs_kept=cost.total_macs / base_cost.total_macs if base_cost.total_macs else None,
            removed_vs_masked=diff, removed_equals_masked=diff <= EQUAL_TOLERANCE)
    except Exception as exc:  # any failure is a result of the benchmark, not of the run
        result.update(status="error", error=_error(exc))
    return result


def torch_pruning_version() -> Optional[str]:
    if importlib.util.find_spec("torch_pruning") is None:
        return None
    try:
        return importlib.metadata.version(TP_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _classifiers(model: nn.Module, width: int) -> list[nn.Module]:
    """The Conv/Linear layers with ``width`` output channels: the final classifier."""
    found = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == width:
            found.append(m)
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == width:
            found.append(m)
    return found


def measure_torch_pruning(model: nn.Module, x: Tensor, base_cost, out_shape) -> dict:
    """Torch-Pruning's MetaPruner on ``model`` (pruned in place)."""
    if torch_pruning_version() is None:
        return {"status": "not installed"}
    result: dict = {"status": "error", "version": torch_pruning_version()}
    try:
        import torch_pruning as tp
        # Torch-Pruning prints notes on stdout; the child's stdout carries the results.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            pruner = tp.pruner.MetaPruner(
                model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=PRUNE_RATIO,
                global_pruning=False, ignored_layers=_classifiers(model, out_shape[1]))
            result["analysis_s"] = time.perf_counter() - start
            start = time.perf_counter()
            pruner.step()
            result["prune_s"] = time.perf_counter() - start
            out = _forward(model, x)
        cost = count_cost(model, x)
        shape_ok = tuple(out.shape) == tuple(out_shape)
        result.update(
            status="ok" if shape_ok else "wrong output shape", output_shape_ok=shape_ok,
            output_shape=list(out.shape), params_kept=cost.total_params / base_cost.total_params,
            macs_kept=cost.total_macs / base_cost.total_macs if base_cost.total_macs else None)
    except Exception as exc:
        result.update(status="error", error=_error(exc))
    return result


def measure(name: str, size: Optional[int] = None, device: str = "cpu",
            emit: Callable[[str, dict], None] = lambda part, data: None) -> dict:
    """Measures case ``name`` in this process: ``{"model", "input_shape", ...,
    "ours": {...}, "tp": {...}}``. ``emit(part, data)`` is called as each part
    ("case", "ours", "tp") is done, so that a parent keeps what finished before a timeout."""
    side = input_size(name, size)
    record: dict = {"model": name, "input_shape": [1, 3, side, side]}
    extra = EXTRAS.get(name)
    missing = extra.missing() if extra is not None else None
    if missing:
        record["ours"] = record["tp"] = {"status": "skipped", "reason": missing}
        return record
    layers = extra.layers() if extra is not None else {}
    with _registered(layers):
        try:
            torch.manual_seed(0)
            model = build_model(name).to(device).eval()
            x = torch.randn(record["input_shape"], device=device)
            base = count_cost(model, x)
            out_shape = list(_forward(model, x).shape)
        except Exception as exc:
            record["ours"] = record["tp"] = {"status": "error", "error": _error(exc)}
            return record
        record.update(params=base.total_params, macs=base.total_macs, output_shape=out_shape)
        emit("case", {k: v for k, v in record.items() if k not in ("ours", "tp")})
        record["ours"] = measure_ours(model, x, base)
        emit("ours", record["ours"])
        # Torch-Pruning last: it prunes the model in place.
        record["tp"] = measure_torch_pruning(model, x, base, out_shape)
        emit("tp", record["tp"])
    return record


# -- the child process and the parent -----------------------------------------------------------------
def _emit_line(part: str, data: dict) -> None:
    print(CHILD_MARKER + json.dumps({"part": part, **data}), flush=True)


def child_main(name: str, size: Optional[int], device: str, threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)
    measure(name, size, device, emit=_emit_line)


def _child_env() -> dict:
    """The child imports the same pyprune_ext as this process, wherever that is."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyprune_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def parse_child_output(stdout: str) -> dict:
    """The parts the child reported, by name."""
    parts = {}
    for line in stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            data = json.loads(line[len(CHILD_MARKER):])
            parts[data.pop("part")] = data
    return parts


def child_failure(returncode: int, stderr: str) -> str:
    """Why a child ended without reporting: the signal that killed it (SIGKILL is
    most often the out-of-memory killer), else the last line of its stderr."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"child killed by {name}{hint}"
    last = (stderr.strip().splitlines() or [""])[-1]
    return f"child exited with code {returncode}: {last}"[:300]


def run_case(name: str, timeout: float = DEFAULT_TIMEOUT, size: Optional[int] = None, device: str = "cpu",
             threads: Optional[int] = None) -> dict:
    """Measures case ``name`` in a subprocess; parts it did not finish in
    ``timeout`` seconds have status "timeout", parts of a crashed child "error"."""
    cmd = [sys.executable, "-m", "pyprune_ext.bench.coverage", "--child", name, "--device", device]
    if size is not None:
        cmd += ["--size", str(size)]
    if threads:
        cmd += ["--threads", str(threads)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
        stdout, missing = proc.stdout, None
        if proc.returncode != 0:
            missing = {"status": "error", "error": child_failure(proc.returncode, proc.stderr)}
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        missing = {"status": "timeout", "error": f"not done after {timeout:g} s"}
    parts = parse_child_output(stdout)
    record = {"model": name, "input_shape": [1, 3, input_size(name, size), input_size(name, size)]}
    record.update(parts.get("case", {}))
    for part in ("ours", "tp"):
        record[part] = parts.get(part) or missing or {"status": "error", "error": "the child reported nothing"}
    record["wall_s"] = time.perf_counter() - start
    return record


# -- the table ----------------------------------------------------------------------------------------
def _cell(text: str, limit: int = 70) -> str:
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text.replace("|", "\\|")


def _status(part: dict) -> str:
    status = part.get("status", "error")
    detail = part.get("reason") or part.get("error")
    return _cell(f"{status}: {detail}" if detail and status != "ok" else status)


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _diff(part: dict) -> str:
    value = part.get("removed_vs_masked")
    return "-" if value is None else f"{value:.1e}"


HEADERS = ["model", "ours: status", "prunable share", "params kept", "MACs kept",
           "removed==masked max rel diff", "analysis s", "TP: status", "TP params kept", "TP MACs kept",
           "TP analysis s"]


def table_row(record: dict) -> list[str]:
    ours, tp = record["ours"], record["tp"]
    return [record["model"], _status(ours), _fraction(ours.get("prunable_share")), _fraction(ours.get("params_kept")),
            _fraction(ours.get("macs_kept")), _diff(ours), _seconds(ours.get("analysis_s")), _status(tp),
            _fraction(tp.get("params_kept")), _fraction(tp.get("macs_kept")), _seconds(tp.get("analysis_s"))]


# -- command line -------------------------------------------------------------------------------------
def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser(prog: Optional[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", metavar="A,B,C", help="comma-separated cases (torchvision names or "
                        f"{', '.join(EXTRAS)}); default all")
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_TORCHVISION)} and the extra cases")
    parser.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds per case (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--size", type=_positive_int, metavar="N", help="input N x N for every case (default 224, "
                        "inception_v3 299); a model that needs another size then reports an error")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads in each child (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write every field as JSON (rewritten after each case)")
    parser.add_argument("--child", metavar="CASE", help=argparse.SUPPRESS)
    return parser


def select_cases(models: Optional[str], quick: bool) -> list[str]:
    """The cases ``--models`` / ``--quick`` choose (default all); ValueError naming unknown ones."""
    if models and quick:
        raise ValueError("give --models or --quick, not both")
    if quick:
        return quick_cases()
    if not models:
        return all_cases()
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--models {models!r} names no case")
    known = set(all_cases())
    unknown = [m for m in names if m not in known]
    if unknown:
        hint = "" if torchvision_models() else " (torchvision is not installed)"
        raise ValueError(f"--models: unknown cases {', '.join(unknown)}{hint}; choose from "
                         f"torchvision.models.list_models() and {', '.join(EXTRAS)}")
    return names


def _report(args, machine: str, records: list[dict]) -> dict:
    return {"benchmark": "coverage", "machine": machine, "device": args.device, "torch": torch.__version__,
            "torch_pruning": torch_pruning_version(), "prune_ratio": PRUNE_RATIO, "timeout_s": args.timeout,
            "size": args.size, "share_definition": SHARE_DEFINITION, "equal_tolerance": EQUAL_TOLERANCE,
            "results": records}


def main(argv=None, prog=None):
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.size, args.device, args.threads)
    try:
        cases = select_cases(args.models, args.quick)
    except ValueError as err:
        parser.error(str(err))
    machine = machine_name(args.device)
    if not torchvision_models():
        print("note: torchvision is not installed; only the extra cases run")
    if torch_pruning_version() is None:
        print("note: torch_pruning is not importable (pip install pyprune_ext[bench]); "
              "its columns read 'not installed'")
    records = []
    for i, name in enumerate(cases, 1):
        record = run_case(name, args.timeout, args.size, args.device, args.threads)
        records.append(record)
        print(f"[{i}/{len(cases)}] {name}: ours {record['ours']['status']}, TP {record['tp']['status']} "
              f"({record['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, _report(args, machine, records))
    print_table(f"Model-zoo coverage: prune {PRUNE_RATIO:.0%} of every prunable group; {machine}",
                HEADERS, [table_row(r) for r in records])
    print(f"\n{SHARE_DEFINITION}. Params / MACs kept: pyprune_ext.cost.count_cost after removal, "
          f"over the unpruned model. removed==masked: max |removed - masked| / max |masked| of the outputs.")


if __name__ == "__main__":
    main()
