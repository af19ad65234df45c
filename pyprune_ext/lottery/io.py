"""Atomic file writes and safe loading for lottery-ticket run directories.

Every file is written to a temporary file in the destination's own folder, flushed
to disk, then moved over the destination with ``os.replace`` (atomic on POSIX and
Windows when both are on the same file system, which the same folder guarantees).
A process killed at any moment therefore leaves either the old file or the new
one, never a partial file; a failed write removes its temporary file.

Loading always uses ``torch.load(weights_only=True)``: run directories may be
copied between machines and users, and the full unpickler would run arbitrary code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "load_json", "load_tensors",
           "save_tensors"]

# mkstemp creates files readable by the owner only; give run files the usual
# permissions instead (read once at import, as os.umask can only be read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it onto ``path``.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content
    (or stays absent) and the temporary file is removed (or, after a kill, left
    with a ``.tmp`` suffix that no reader looks at).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, 0o666 & ~_UMASK)
            write(f)
            f.flush()
            # fsync before the rename: otherwise a power loss can leave the new
            # name pointing at an empty file on some file systems.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_tensors(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: PathLike, payload: Any) -> Path:
    """Writes ``payload`` as indented JSON to ``path`` atomically."""
    # Serialise first: a value JSON cannot encode fails before any file is touched.
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=True) + "\n"
    return atomic_write_text(path, text)


def load_tensors(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"{path}: cannot be loaded with torch.load(weights_only=True): {err}") from err


def load_json(path: PathLike) -> Any:
    """Reads a JSON file, naming the file in any error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
