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
from typing import Any, Callable, Dict, Sequence, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["RunFileError", "atomic_write", "atomic_write_json", "atomic_write_text", "load_json", "load_json_object",
           "load_tensors", "save_tensors"]


class RunFileError(ValueError):
    """A file of a run directory is missing, damaged or not what it should be
    (not valid JSON, not UTF-8, not a JSON object, a required entry missing). The
    message names the file and says what to do."""

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
    """Reads a JSON file (UTF-8), naming the file in any error: FileNotFoundError
    when it is absent, :class:`RunFileError` (a ValueError) when it is not UTF-8
    text or not valid JSON."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); the file is damaged") from err
    except IsADirectoryError:
        raise RunFileError(f"{path}: is a directory, not a JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}: not valid JSON ({err})") from err


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(type(value), "a value")


def load_json_object(path: PathLike, required: Sequence[str] = ()) -> Dict[str, Any]:
    """:func:`load_json` for a file that must hold a JSON object with at least the
    keys ``required``; anything else (``[]``, ``null``, ``{}``) is a RunFileError."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected a JSON object, the file holds {_json_kind(data)}; the file is damaged")
    missing = [key for key in required if key not in data]
    if missing:
        raise RunFileError(f"{path}: lacks {', '.join(map(repr, missing))}; the file is damaged")
    return data
