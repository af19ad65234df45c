"""Datasets for the examples, tests and benchmarks, read from local files only.

Image datasets from two sources share one interface (:class:`Splits`):

* **IDX datasets** (MNIST, Fashion-MNIST): the standard ``train-images-idx3-ubyte``
  / ``train-labels-idx1-ubyte`` / ``t10k-*`` files, gzip-compressed or raw, read by
  :func:`read_idx`. Fashion-MNIST is found by default where Debian's
  ``dataset-fashion-mnist`` package installs it (:data:`DEFAULT_ROOTS`); torchvision's
  download layout (``<root>/FashionMNIST/raw``, ``<root>/MNIST/raw``) is accepted too.
* **scikit-learn digits** (8x8 grayscale, 1797 images, shipped inside scikit-learn):
  the small built-in dataset for fast end-to-end tests.

and one text corpus has its own (:class:`TextSplits`):

* **Python standard library sources** (:func:`load_python_corpus`): the top-level
  ``*.py`` files of the running interpreter's standard library, a character-level
  corpus present wherever Python is. It depends on the Python version (the standard
  library changes between releases), so :attr:`TextSplits.source` names the folder
  read and :attr:`TextSplits.files` how many files.

Nothing is ever downloaded: a missing dataset raises :class:`FileNotFoundError`
naming the paths that were tried and how to get the files.

Splits follow the lottery-ticket paper: a validation set (default 5000 examples for
the IDX datasets) is held out of the training set, chosen by a seeded permutation,
and the official test set is kept whole. Images are float32 ``(N, 1, H, W)``
tensors, normalised to zero mean and unit variance; labels are int64. The text
corpus is split by position instead (the validation text follows the training
text) and holds int64 token ids.
"""

from __future__ import annotations

import gzip
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DATASETS",
    "DEFAULT_ROOTS",
    "IdxFormatError",
    "Loaders",
    "Splits",
    "TextLoader",
    "TextSplits",
    "find_idx_files",
    "load_dataset",
    "load_digits_dataset",
    "load_idx_dataset",
    "load_python_corpus",
    "make_loader",
    "make_loaders",
    "read_idx",
    "text_loader",
    "write_idx",
]

# --------------------------------------------------------------------------- IDX files

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """An IDX file is corrupt, truncated or not an IDX file at all."""


def _decompress(raw: bytes, path: Path) -> bytes:
    """Gunzips ``raw``, turning every flavour of gzip failure into IdxFormatError."""
    try:
        return gzip.decompress(raw)
    except EOFError as err:  # the compressed stream stops early: a cut-off download
        raise IdxFormatError(f"{path}: truncated gzip stream ({err})") from err
    except (OSError, zlib.error) as err:  # bad CRC, bad header, garbage inside
        raise IdxFormatError(f"{path}: corrupt gzip data ({err})") from err


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parses the bytes of an (uncompressed) IDX file, validating every size."""
    if len(data) < 4:
        raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an IDX header (4 bytes)")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00":
        magic = int.from_bytes(data[0:4], "big")
        raise IdxFormatError(
            f"{path}: not an IDX file: magic number 0x{magic:08X} does not start with two zero "
            "bytes (an IDX magic number is 0x0000TTNN, TT the type code, NN the number of dims)")
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IdxFormatError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IdxFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(
            f"{path}: truncated header: {ndim} dimensions need {header} header bytes, "
            f"the file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise IdxFormatError(
            f"{path}: truncated: shape {shape} of {dtype.name} needs {expected} data bytes, "
            f"the file has {found}")
    if found > expected:
        # Trailing bytes mean the header and the payload disagree: trusting the
        # header would silently drop data, so refuse.
        raise IdxFormatError(
            f"{path}: {found - expected} unexpected bytes after the data of shape {shape} "
            f"({expected} data bytes expected, {found} found)")
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    # Native byte order and a writable copy (np.frombuffer over bytes is read-only,
    # which torch.from_numpy warns about).
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: PathLike, *, expect_ndim: Optional[int] = None) -> np.ndarray:
    """Reads an IDX file (MNIST format), gzip-compressed or raw.

    Compression is detected from the gzip magic bytes, not the file name, so a
    decompressed file that kept its ``.gz`` name (or the reverse) still reads.

    Args:
        path: the file.
        expect_ndim: if given, the number of dimensions the file must have
            (3 for image files, 1 for label files).

    Returns:
        A writable numpy array in native byte order with the dtype and shape
        stored in the file.

    Raises:
        FileNotFoundError: the file does not exist.
        IdxFormatError (a ValueError): the file is not a valid IDX file, is
            truncated, has trailing bytes, or has the wrong number of dims.
    """
    path = Path(path)
    raw = path.read_bytes()
    data = _decompress(raw, path) if raw[:2] == _GZIP_MAGIC else raw
    array = _parse_idx(data, path)
    if expect_ndim is not None and array.ndim != expect_ndim:
        raise IdxFormatError(
            f"{path}: expected {expect_ndim} dimensions, the file has {array.ndim} "
            f"(shape {array.shape})")
    return array


def write_idx(path: PathLike, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    Useful to make small MNIST-format datasets for tests or subsets. The dtype
    must be one IDX can store (uint8, int8, int16, int32, float32, float64).
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"write_idx: dtype {array.dtype} cannot be stored in an IDX file "
                         f"(supported: {', '.join(sorted(str(d) for d in codes))})")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: need 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if path.suffix == ".gz":
        # mtime=0 keeps the bytes reproducible run to run.
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


# ------------------------------------------------------------------------- dataset info

@dataclass(frozen=True)
class _IdxInfo:
    """What is known about one IDX dataset."""

    title: str           # for messages
    torchvision_dir: str  # torchvision's folder name under the root
    mean: float          # published per-pixel mean of the 60000 training images, scaled to [0, 1]
    std: float
    how_to_get: str


#: Where each IDX dataset is looked for when ``root`` is not given. Fashion-MNIST:
#: the directory of Debian's ``dataset-fashion-mnist`` package. MNIST has no
#: packaged copy, so it needs an explicit root.
DEFAULT_ROOTS: Dict[str, Optional[str]] = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": None,
}

# MNIST's statistics are the ones the lottery-ticket paper and torchvision's examples
# use; Fashion-MNIST's are the same quantities for its 60000 training images, to
# the same 4 decimals (tests/test_data.py recomputes them from the installed files).
_IDX_INFO: Dict[str, _IdxInfo] = {
    "mnist": _IdxInfo(
        "MNIST", "MNIST", 0.1307, 0.3081,
        "pass root=<a directory holding the four MNIST IDX files>, e.g. a torchvision "
        "download directory (its MNIST/raw folder is searched)"),
    "fashion-mnist": _IdxInfo(
        "Fashion-MNIST", "FashionMNIST", 0.2860, 0.3530,
        "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
        f"{DEFAULT_ROOTS['fashion-mnist']}), or pass root=<a directory holding the four "
        "Fashion-MNIST IDX files> (a torchvision download directory works too)"),
}

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "fashion-mnist", "mnist")

# Standard IDX file stems, by role.
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _name_variants(stem: str) -> List[str]:
    """File names a stem may have on disk: gzip'd or not, and the dotted spelling
    ``train-images.idx3-ubyte`` some mirrors use."""
    dotted = stem.replace("-idx", ".idx")
    return [stem + ".gz", stem, dotted + ".gz", dotted]


def _candidate_dirs(root: Path, name: str) -> List[Path]:
    """The root itself, then torchvision's ``<root>/<Name>/raw`` layout."""
    return [root, root / _IDX_INFO[name].torchvision_dir / "raw"]


def _find_in_dir(directory: Path) -> Tuple[Dict[str, Path], List[str]]:
    """The IDX files present in ``directory`` by role, and the stems missing."""
    found: Dict[str, Path] = {}
    missing: List[str] = []
    for role, stem in _IDX_STEMS.items():
        for file_name in _name_variants(stem):
            if (directory / file_name).is_file():
                found[role] = directory / file_name
                break
        else:
            missing.append(stem)
    return found, missing


def _check_name(name: str, allowed) -> str:
    key = name.lower().replace("_", "-")
    if key not in allowed:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(allowed)}")
    return key


def find_idx_files(root: Optional[PathLike] = None, name: str = "fashion-mnist") -> Dict[str, Path]:
    """Locates the four IDX files of dataset ``name`` under ``root``.

    Looks in ``root`` itself, then in torchvision's layout ``root/<Name>/raw``
    (``FashionMNIST`` or ``MNIST``). Each file may be gzip'd (``.gz``) or raw.

    Returns:
        ``{"train_images", "train_labels", "test_images", "test_labels"} -> path``.

    Raises:
        FileNotFoundError: no directory holds all four files; the message lists
            every path tried and how to get the data.
    """
    name = _check_name(name, _IDX_INFO)
    info = _IDX_INFO[name]
    if root is None:
        root = DEFAULT_ROOTS[name]
        if root is None:
            raise FileNotFoundError(f"{info.title} has no default location: {info.how_to_get}")
    root = Path(root).expanduser()
    tried: List[str] = []
    for directory in _candidate_dirs(root, name):
        if not directory.is_dir():
            tried.append(f"  {directory} (no such directory)")
            continue
        found, missing = _find_in_dir(directory)
        if not missing:
            return found
        tried.extend(f"  {directory / stem}[.gz] (missing)" for stem in missing)
    raise FileNotFoundError(
        f"{info.title} IDX files not found under {root}. Looked in:\n" + "\n".join(tried)
        + f"\nTo get the data: {info.how_to_get}.")


# ------------------------------------------------------------------------------ splits

@dataclass(frozen=True)
class Splits:
    """Train / validation / test splits of one dataset.

    Attributes:
        name: dataset name (``"digits"``, ``"fashion-mnist"``, ``"mnist"``).
        train, val, test: ``TensorDataset(images, labels)``; images float32
            ``(N, C, H, W)`` normalised with ``mean``/``std``, labels int64.
            ``val`` may be empty (``val_size=0``).
        num_classes: number of classes.
        input_shape: ``(C, H, W)`` of one image.
        mean, std: the normalisation applied, in units of the [0, 1]-scaled
            pixels (``x = (pixel / max - mean) / std``); ``(0.0, 1.0)`` when off.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: Tuple[int, int, int]
    mean: float
    std: float

    def sizes(self) -> Tuple[int, int, int]:
        """``(len(train), len(val), len(test))``."""
        return len(self.train), len(self.val), len(self.test)


_NORMALIZE_MODES = ("default", "train", "none")


def _resolve_size(size: Union[int, float], n: int, what: str = "val_size", source: Optional[Path] = None) -> int:
    """An absolute count from a count or a fraction of ``n``; must leave training data.
    ``source``: the file the ``n`` examples come from, named when they are too few."""
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer)):
        raise TypeError(f"{what} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{what} as a fraction must be in [0, 1), got {size}")
        size = int(round(size * n))
    size = int(size)
    if size < 0:
        raise ValueError(f"{what}={size} must be >= 0")
    if size >= n:
        if source is not None:
            raise ValueError(f"{source}: {n} training images are too few to hold out {size} for validation "
                             f"({what}) and keep at least one for training")
        raise ValueError(f"{what}={size} must be smaller than the {n} examples it is taken from")
    return size


def _holdout_indices(n: int, val_size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into (train, val) index arrays, each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _to_tensor(images: np.ndarray, scale: float, mean: float, std: float) -> torch.Tensor:
    """(N, H, W) pixels -> normalised float32 (N, 1, H, W)."""
    x = images.astype(np.float32)
    x *= np.float32(1.0 / scale)
    x -= np.float32(mean)
    x /= np.float32(std)
    return torch.from_numpy(x).unsqueeze(1)


def _train_stats(images: np.ndarray, scale: float) -> Tuple[float, float]:
    """Mean and std of the [0, 1]-scaled pixels, accumulated in float64."""
    x = images.astype(np.float64) / scale
    return float(x.mean()), float(x.std())


def _make_splits(name, x_train, y_train, x_val, y_val, x_test, y_test, *, scale, mean, std,
                 num_classes) -> Splits:
    def dataset(x, y):
        return TensorDataset(_to_tensor(x, scale, mean, std), torch.from_numpy(y.astype(np.int64)))

    return Splits(name=name, train=dataset(x_train, y_train), val=dataset(x_val, y_val),
                  test=dataset(x_test, y_test), num_classes=num_classes,
                  input_shape=(1, int(x_train.shape[1]), int(x_train.shape[2])),
                  mean=float(mean), std=float(std))


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds "
                         f"{labels.shape[0]} labels")
    if images.dtype != np.uint8:
        raise ValueError(f"{img_path}: expected uint8 pixels, the file stores {images.dtype}")


def _check_labels(labels: np.ndarray, path: Path, num_classes: int) -> None:
    # Float labels (IDX can store them) would be truncated to integers by the int64
    # conversion, and NaN would become an arbitrary class: refuse any non-integer type.
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers (IDX type ubyte), the file stores {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), found values from "
                         f"{labels.min()} to {labels.max()}")


def load_idx_dataset(root: Optional[PathLike] = None, name: str = "fashion-mnist", *,
                     val_size: Union[int, float] = 5000, seed: int = 0,
                     normalize: str = "default") -> Splits:
    """Loads MNIST or Fashion-MNIST from local IDX files.

    Args:
        root: directory with the IDX files (or a torchvision download root);
            defaults to :data:`DEFAULT_ROOTS` (Debian's dataset-fashion-mnist
            location for Fashion-MNIST; MNIST needs a root).
        name: ``"fashion-mnist"`` or ``"mnist"``.
        val_size: training examples held out for validation (count, or fraction
            of the training set). 5000 as in the lottery-ticket paper.
        seed: seeds the choice of the validation examples.
        normalize: ``"default"``: the published statistics of the full training
            set (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530), so results are
            comparable with the literature; ``"train"``: mean/std of this
            training split (the validation examples excluded); ``"none"``: pixels
            scaled to [0, 1] only.

    Returns:
        :class:`Splits` with 28x28 images shaped ``(N, 1, 28, 28)``.

    Raises:
        FileNotFoundError: the files are not there (the message lists the paths).
        ValueError: a file is corrupt or the files disagree with each other.
    """
    name = _check_name(name, _IDX_INFO)
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    files = find_idx_files(root, name)
    x_full = read_idx(files["train_images"], expect_ndim=3)
    y_full = read_idx(files["train_labels"], expect_ndim=1)
    x_test = read_idx(files["test_images"], expect_ndim=3)
    y_test = read_idx(files["test_labels"], expect_ndim=1)
    _check_pair(x_full, y_full, files["train_images"], files["train_labels"])
    _check_pair(x_test, y_test, files["test_images"], files["test_labels"])
    if x_full.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"train images are {x_full.shape[1:]} but test images are "
                         f"{x_test.shape[1:]} ({files['train_images']}, {files['test_images']})")
    num_classes = 10
    _check_labels(y_full, files["train_labels"], num_classes)
    _check_labels(y_test, files["test_labels"], num_classes)
    if len(x_test) == 0:  # every evaluation would fail, after the training
        raise ValueError(f"{files['test_images']}: holds no images")

    n_val = _resolve_size(val_size, len(x_full), source=files["train_images"])
    train_idx, val_idx = _holdout_indices(len(x_full), n_val, seed)
    x_train, y_train = x_full[train_idx], y_full[train_idx]
    if normalize == "default":
        mean, std = _IDX_INFO[name].mean, _IDX_INFO[name].std
    elif normalize == "train":
        mean, std = _train_stats(x_train, 255.0)
    else:
        mean, std = 0.0, 1.0
    return _make_splits(name, x_train, y_train, x_full[val_idx], y_full[val_idx], x_test, y_test,
                        scale=255.0, mean=mean, std=std, num_classes=num_classes)


def _stratified_holdout(idx: np.ndarray, labels: np.ndarray, size: int,
                        seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Splits ``idx`` into (kept, held out) sorted index arrays, ``size`` held out,
    keeping class proportions (labels are indexed by ``idx``'s values)."""
    if size == 0:
        return np.sort(idx), idx[:0]
    from sklearn.model_selection import train_test_split
    kept, held = train_test_split(idx, test_size=size, stratify=labels[idx], random_state=seed)
    return np.sort(kept), np.sort(held)


# Fixed seed of the digits test split, so the test set is the same whatever the
# run's seed (as MNIST's official test set is): only the validation split varies.
_DIGITS_TEST_SEED = 0


def load_digits_dataset(*, val_size: Union[int, float] = 180, test_size: Union[int, float] = 360,
                        seed: int = 0, normalize: str = "default") -> Splits:
    """Loads scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn).

    The test split (``test_size``, default 360 = 20%) is stratified by class and
    fixed (independent of ``seed``); the validation split (``val_size``, default
    180 = 10%) is then stratified out of the rest with ``seed``. Pixels (0..16)
    are scaled to [0, 1] and, with ``normalize="default"`` or ``"train"``,
    standardised with the mean/std of the training split (digits has no
    published statistics). Images are shaped ``(N, 1, 8, 8)``.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits dataset needs scikit-learn: "
                          "pip install scikit-learn") from err
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)  # integer counts 0..16 stored as float64
    labels = bunch.target.astype(np.int64)
    n = len(images)
    n_test = _resolve_size(test_size, n, "test_size")
    rest, test_idx = _stratified_holdout(np.arange(n), labels, n_test, _DIGITS_TEST_SEED)
    n_val = _resolve_size(val_size, len(rest))
    train_idx, val_idx = _stratified_holdout(rest, labels, n_val, seed)
    mean, std = (0.0, 1.0) if normalize == "none" else _train_stats(images[train_idx], 16.0)
    return _make_splits("digits", images[train_idx], labels[train_idx], images[val_idx],
                        labels[val_idx], images[test_idx], labels[test_idx], scale=16.0,
                        mean=mean, std=std, num_classes=int(bunch.target.max()) + 1)


def load_dataset(name: str = "digits", root: Optional[PathLike] = None, *,
                 val_size: Optional[Union[int, float]] = None, seed: int = 0,
                 normalize: str = "default") -> Splits:
    """Single entry point: ``"digits"``, ``"fashion-mnist"`` or ``"mnist"``.

    ``val_size=None`` picks the dataset's default (5000 for the IDX datasets, 180
    for digits). ``root`` applies to the IDX datasets only. See
    :func:`load_idx_dataset` and :func:`load_digits_dataset`.
    """
    key = _check_name(name, DATASETS)
    if key == "digits":
        if root is not None:
            raise ValueError("the digits dataset ships with scikit-learn and takes no root")
        kwargs = {} if val_size is None else {"val_size": val_size}
        return load_digits_dataset(seed=seed, normalize=normalize, **kwargs)
    return load_idx_dataset(root, key, val_size=5000 if val_size is None else val_size,
                            seed=seed, normalize=normalize)


# ------------------------------------------------------------------------- data loaders

@dataclass(frozen=True)
class Loaders:
    """DataLoaders for the three splits (train shuffled, val/test in order)."""

    train: DataLoader
    val: DataLoader
    test: DataLoader


def make_loader(dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``.

    It owns a ``torch.Generator`` seeded with ``seed``, so two loaders built with
    the same seed yield the same batches epoch after epoch, whatever else touches
    torch's global random state.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      drop_last=drop_last, num_workers=num_workers)


def make_loaders(splits: Splits, batch_size: int = 60, *, eval_batch_size: int = 1000,
                 seed: int = 0, drop_last: bool = False, num_workers: int = 0) -> Loaders:
    """Loaders for :class:`Splits`: the training set shuffled with ``seed``
    (batch 60 as in the lottery-ticket paper), val and test unshuffled."""
    return Loaders(
        train=make_loader(splits.train, batch_size, shuffle=True, seed=seed, drop_last=drop_last,
                          num_workers=num_workers),
        val=make_loader(splits.val, eval_batch_size, num_workers=num_workers),
        test=make_loader(splits.test, eval_batch_size, num_workers=num_workers),
    )


# --------------------------------------------------------------------------- text corpus

def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


class TextLoader:
    """Batches of ``(x, y)`` windows of a token sequence, ``y`` being ``x`` shifted
    by one position: ``x`` ``(B, context)`` holds tokens ``s .. s+context-1`` and
    ``y`` tokens ``s+1 .. s+context`` of the same window.

    One pass (epoch) cuts the sequence into windows starting ``context`` tokens
    apart, so the inputs do not overlap and every token after the first is a
    target once. With ``shuffle``, each pass shifts the cuts by a random offset
    (within the tokens left over after the last whole window, so every pass has
    the same number of windows) and visits the windows in a random order; without
    it, the cuts start at 0 and the windows come in order.

    The randomness comes from a ``torch.Generator`` owned by the loader and seeded
    with ``seed``, so two loaders built alike yield the same batches in the same
    order, pass after pass, whatever else uses torch's global random state.

    ``steps=None``: iterating makes one pass, ``len()`` batches, the last one
    smaller unless ``drop_last``. ``steps=n``: iterating yields exactly ``n`` full
    batches, taking windows from as many passes as needed (a batch may span two
    passes); the usual way to train a language model for a number of steps. Each
    new iteration starts a new pass, the generator going on from where it stands.
    """

    def __init__(self, tokens: torch.Tensor, context: int, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, steps: Optional[int] = None, drop_last: bool = False):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise ValueError("tokens must be a 1-D integer tensor of token ids")
        self.context = _positive_int(context, "context")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.steps = None if steps is None else _positive_int(steps, "steps")
        if len(tokens) < self.context + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one window: context={self.context} needs "
                             f"{self.context + 1} (the input and its shifted target)")
        self.tokens = tokens.long()
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.num_windows = (len(tokens) - 1) // self.context
        self.generator = torch.Generator().manual_seed(seed)

    def _pass(self) -> torch.Tensor:
        """The ``(num_windows, context + 1)`` windows of one pass, in visiting order."""
        spare = len(self.tokens) - 1 - self.num_windows * self.context
        offset = int(torch.randint(spare + 1, (1,), generator=self.generator)) if self.shuffle else 0
        windows = self.tokens[offset:offset + self.num_windows * self.context + 1]
        windows = windows.unfold(0, self.context + 1, self.context)
        if self.shuffle:
            windows = windows[torch.randperm(self.num_windows, generator=self.generator)]
        return windows

    @staticmethod
    def _split(windows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __len__(self) -> int:
        if self.steps is not None:
            return self.steps
        full, rest = divmod(self.num_windows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.steps is None:
            windows = self._pass()
            for start in range(0, len(self) * self.batch_size, self.batch_size):
                yield self._split(windows[start:start + self.batch_size])
            return
        windows, at = self._pass(), 0
        for _ in range(self.steps):
            parts: List[torch.Tensor] = []
            need = self.batch_size
            while need:
                if at == len(windows):
                    windows, at = self._pass(), 0
                take = min(need, len(windows) - at)
                parts.append(windows[at:at + take])
                at, need = at + take, need - take
            yield self._split(torch.cat(parts) if len(parts) > 1 else parts[0])


def text_loader(tokens: torch.Tensor, context: int, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                steps: Optional[int] = None, drop_last: bool = False) -> TextLoader:
    """A :class:`TextLoader` over ``tokens`` (1-D token ids): ``(x, y)`` batches of
    ``context`` positions, ``y`` shifted by one, deterministic for a given ``seed``.

    Raises:
        ValueError: ``tokens`` hold fewer than ``context + 1`` ids, or a size is
            not a positive integer.
    """
    return TextLoader(tokens, context, batch_size, shuffle=shuffle, seed=seed, steps=steps, drop_last=drop_last)


@dataclass(frozen=True)
class TextSplits:
    """A character-level corpus split into training and validation token ids.

    Attributes:
        train, val: int64 1-D tensors of token ids; ``val`` follows ``train`` in
            the text read.
        vocab: the characters of the training text, sorted; token id ``i`` is
            ``vocab[i]``, and id ``len(vocab)`` (:attr:`unknown_id`) stands for
            any validation character the training text lacks.
        context: the window length the corpus was checked for (and the default
            of :meth:`loader`).
        source: the folder read (by default the standard library of the Python that
            ran, which fixes the text: it differs between Python versions).
        files: how many files were read (the last one possibly in part).
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab: List[str]
    context: int
    source: Path
    files: int

    @property
    def unknown_id(self) -> int:
        """The id of characters that are not in :attr:`vocab`: ``len(vocab)``."""
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        """Ids a model must embed and predict: the characters plus the unknown id."""
        return len(self.vocab) + 1

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as int64 token ids, unknown characters as :attr:`unknown_id`."""
        return _encode(text, np.array([ord(c) for c in self.vocab], dtype=np.int64), self.unknown_id)

    def decode(self, ids) -> str:
        """Token ids back to text; the unknown id becomes U+FFFD."""
        table = self.vocab + ["\ufffd"]
        return "".join(table[int(i)] for i in torch.as_tensor(ids).reshape(-1))

    def loader(self, split: str = "train", batch_size: int = 32, *, context: Optional[int] = None,
               shuffle: Optional[bool] = None, seed: int = 0, steps: Optional[int] = None,
               drop_last: bool = False) -> TextLoader:
        """:func:`text_loader` over ``split`` (``"train"`` or ``"val"``) with this
        corpus's ``context`` unless given; ``shuffle`` defaults to True for train
        and False for val, as with :func:`make_loaders`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tokens = self.train if split == "train" else self.val
        return text_loader(tokens, self.context if context is None else context, batch_size,
                           shuffle=(split == "train") if shuffle is None else shuffle, seed=seed, steps=steps,
                           drop_last=drop_last)


def _code_points(text: str) -> np.ndarray:
    """The characters of ``text`` as an array of code points (one entry each)."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4").astype(np.int64)


def _encode(text: str, codes: np.ndarray, unknown: int) -> torch.Tensor:
    """Token ids of ``text`` for the sorted code points ``codes``; absent ones -> ``unknown``."""
    points = _code_points(text)
    if len(codes) == 0:
        return torch.full((len(points),), unknown, dtype=torch.int64)
    ids = np.searchsorted(codes, points)
    known = (ids < len(codes)) & (codes[np.minimum(ids, len(codes) - 1)] == points)
    return torch.from_numpy(np.where(known, ids, unknown).astype(np.int64))


def _read_python_sources(root: Path, max_chars: int) -> Tuple[str, int]:
    """The top-level ``*.py`` files of ``root`` in name order, each followed by a
    newline, cut at ``max_chars`` characters; and the number of files read."""
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"Python corpus folder {root} {what}")
    paths = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)
    if not paths:
        raise FileNotFoundError(f"Python corpus folder {root} holds no .py files")
    parts: List[str] = []
    total = 0
    for path in paths:
        # Bytes decoded here rather than read_text: no newline translation and no
        # locale, and errors="replace" turns a stray non-UTF-8 byte into U+FFFD
        # the same way on every machine.
        text = path.read_bytes().decode("utf-8", errors="replace") + "\n"
        parts.append(text[:max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "".join(parts), len(parts)


def load_python_corpus(*, max_chars: int = 2_000_000, val_fraction: float = 0.1, context: int = 128,
                       root: Optional[PathLike] = None) -> TextSplits:
    """Character-level corpus from Python source files: by default the running
    interpreter's standard library, which every machine with Python has, so
    language-model tests and benchmarks need no download.

    The top-level ``*.py`` files of ``root`` (not its subfolders, so neither
    ``site-packages`` nor the test suite) are read in name order as UTF-8 (bytes
    that are not UTF-8 become U+FFFD), each followed by a newline, and the text is
    cut at ``max_chars`` characters. The corpus depends on the Python version,
    whose standard library differs; ``source`` in the result names the folder.

    The split is by position, at a character: the first ``1 - val_fraction`` of
    the text (rounded to a character) is the training text, the rest the
    validation text. A character cut rather than a file boundary, so that the
    split sizes follow ``val_fraction`` however long the files are (the
    standard library's range from a hundred characters to over 200,000); the
    validation text is then the end of one file and the files after it, code
    the model has not seen. Token ids: the sorted characters of the training
    text, plus one unknown id (``len(vocab)``) for validation characters
    outside them.

    Args:
        max_chars: characters to read at most (the files are read in order until
            there are that many).
        val_fraction: the share of the text held out for validation, in [0, 1);
            0 leaves ``val`` empty.
        context: the window length the corpus must provide one window of (in
            both splits), and the default of :meth:`TextSplits.loader`.
        root: the folder to read; default ``sysconfig.get_paths()["stdlib"]``.

    Raises:
        FileNotFoundError: ``root`` does not exist, is not a folder, or holds no
            ``.py`` file.
        ValueError: ``max_chars``, ``val_fraction`` or ``context`` is out of range,
            or a split is too short for one window of ``context + 1`` characters.
    """
    max_chars = _positive_int(max_chars, "max_chars")
    context = _positive_int(context, "context")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a fraction in [0, 1), got {val_fraction!r}")
    source = Path(sysconfig.get_paths()["stdlib"] if root is None else root).expanduser()
    text, files = _read_python_sources(source, max_chars)
    n_val = int(round(val_fraction * len(text)))
    train_text, val_text = text[:len(text) - n_val], text[len(text) - n_val:]
    for name, part in (("training", train_text), ("validation", val_text)):
        if len(part) < context + 1 and (name == "training" or val_fraction > 0):
            raise ValueError(
                f"{source}: {len(text)} characters from {files} files leave {len(part)} {name} characters, too few "
                f"for one window of context + 1 = {context + 1}; raise max_chars, or lower context or val_fraction")
    codes = np.unique(_code_points(train_text))
    vocab = [chr(c) for c in codes]
    return TextSplits(train=_encode(train_text, codes, len(vocab)), val=_encode(val_text, codes, len(vocab)),
                      vocab=vocab, context=context, source=source, files=files)
