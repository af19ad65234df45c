"""``--export``: the pruned model as a file that plain torch loads and runs,
without pyprune_ext.

The format is a ``torch.export`` program (``torch.export.save``): the graph and the
weights, no Python class needed to load it, so neither pyprune_ext nor the code
that defined the model has to be importable. Load it with::

    import torch
    model = torch.export.load("model.pt").module()
    logits = model(images)          # any batch size

The program is exported in eval mode (BatchNorm uses its running statistics).
After saving, the file is loaded back and checked against the model.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from ..lottery.io import atomic_write
from .common import UsageError

# float32 reruns of the same graph differ only by summation order.
_TOLERANCE = 1e-4


def _export_program(model: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), True
    except Exception:  # a model that specialises on its batch size: export it at the example's
        pass
    try:
        return torch.export.export(model, (example,)), False
    except Exception as err:
        raise UsageError(f"--export: torch.export cannot capture this model ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the model is still saved in the "
                         "output folder as a state_dict") from None


def export_model(model: nn.Module, example: torch.Tensor, path: Path) -> Dict[str, Any]:
    """Exports ``model`` (eval mode, on the CPU) to ``path`` atomically and checks
    that the saved file reproduces the model's output on ``example``."""
    model = model.eval().cpu()
    example = example.cpu()
    program, dynamic_batch = _export_program(model, example)
    try:
        atomic_write(path, lambda f: torch.export.save(program, f))
    except OSError as err:  # the path was checked up front; the disk may still be full or the folder gone
        raise UsageError(f"--export {path}: cannot write it ({err.strerror or err})") from None
    loaded = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()
    with torch.no_grad():
        expected, got = model(example), loaded(example)
    difference = float((expected - got).abs().max())
    if not difference <= _TOLERANCE:
        raise RuntimeError(f"--export: the exported program's output differs from the model's by {difference:.3g}")
    return {"path": str(path), "format": "torch.export", "dynamic_batch": dynamic_batch,
            "input_shape": list(example.shape[1:]), "max_abs_difference": difference,
            "load_with": f"torch.export.load({str(path)!r}).module()"}
