"""pyprune_ext.data: IDX reading and validation, dataset discovery, splits, loaders, and the
character corpus of Python sources with its window loader."""

import gzip
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyprune_ext import data
from pyprune_ext.data import IdxFormatError, read_idx, write_idx

FASHION_ROOT = Path(data.DEFAULT_ROOTS["fashion-mnist"])


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """IDX bytes built by hand from the format's definition (independent of write_idx)."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return header + big_endian.tobytes()


def put(path: Path, payload: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_idx_dir(directory: Path, n_train=50, n_test=20, size=(28, 28), seed=0, compress=True):
    """A tiny MNIST-format dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        put(directory / (stem + (".gz" if compress else "")), idx_bytes(array, 0x08), compress)
    return arrays


# ----------------------------------------------------------------------------- read_idx

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B),
                                        (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_round_trips_exactly(tmp_path, compress, dtype, code):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    path = put(tmp_path / ("a.idx" + (".gz" if compress else "")), idx_bytes(array, code), compress)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype).newbyteorder("=")
    assert got.shape == (3, 5, 7)
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8)
    gz_named_raw = put(tmp_path / "labels.gz", idx_bytes(array, 0x08), compress=False)
    raw_named_gz = put(tmp_path / "labels", idx_bytes(array, 0x08), compress=True)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_idx_matches_the_format(tmp_path, suffix):
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
    path = write_idx(tmp_path / ("x" + suffix), array)
    raw = path.read_bytes()
    assert (gzip.decompress(raw) if suffix else raw) == idx_bytes(array, 0x0C)
    np.testing.assert_array_equal(read_idx(path), array)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _expect_format_error(path: Path, pattern: str):
    with pytest.raises(IdxFormatError, match=pattern) as info:
        read_idx(path)
    assert str(path) in str(info.value), "the error must name the file"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_data_is_an_error(tmp_path, compress):
    payload = idx_bytes(np.zeros((4, 28, 28), np.uint8), 0x08)
    path = put(tmp_path / "cut", payload[:-1], compress)
    _expect_format_error(path, r"truncated.*3136 data bytes.*3135")


def test_trailing_bytes_are_an_error(tmp_path):
    payload = idx_bytes(np.zeros(10, np.uint8), 0x08) + b"\x00\x00"
    _expect_format_error(put(tmp_path / "long", payload, False), "2 unexpected bytes")


def test_truncated_gzip_stream_is_an_error(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32), 0x0C))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    _expect_format_error(path, "truncated gzip")


def test_corrupt_gzip_is_an_error(tmp_path):
    compressed = bytearray(gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32), 0x0C)))
    compressed[-8] ^= 0xFF  # the CRC32 of the uncompressed data
    path = tmp_path / "bad.gz"
    path.write_bytes(bytes(compressed))
    _expect_format_error(path, "corrupt gzip")


@pytest.mark.parametrize("payload,pattern", [
    (b"\x00\x00", "too short"),
    (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic number 0x00010801"),
    (b"PK\x03\x04 not an idx file", "not an IDX file"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX type code 0x07"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 5), "truncated header"),
])
def test_bad_headers_are_errors(tmp_path, payload, pattern):
    _expect_format_error(put(tmp_path / "bad", payload, False), pattern)


def test_expect_ndim(tmp_path):
    path = put(tmp_path / "labels", idx_bytes(np.zeros((2, 3), np.uint8), 0x08), False)
    with pytest.raises(IdxFormatError, match="expected 1 dimensions"):
        read_idx(path, expect_ndim=1)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# ------------------------------------------------------------------- finding the files

@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_dataset_from_flat_dir(tmp_path, compress):
    arrays = make_idx_dir(tmp_path, n_train=50, n_test=20, compress=compress)
    splits = data.load_idx_dataset(tmp_path, "mnist", val_size=10, seed=3)
    assert splits.sizes() == (40, 10, 20)
    assert splits.input_shape == (1, 28, 28)
    assert splits.num_classes == 10 and splits.name == "mnist"
    x_train, y_train = splits.train.tensors
    assert x_train.dtype == torch.float32 and x_train.shape == (40, 1, 28, 28)
    assert y_train.dtype == torch.int64

    # Un-normalising gives back the exact pixels; train+val is a partition of the file.
    def pixels(x):
        return torch.round((x * splits.std + splits.mean) * 255).to(torch.uint8).squeeze(1).numpy()

    x_val, y_val = splits.val.tensors
    images = np.concatenate([pixels(x_train), pixels(x_val)])
    labels = np.concatenate([y_train.numpy(), y_val.numpy()])
    original = arrays["train-images-idx3-ubyte"]
    order = [int(np.flatnonzero((original == img).all(axis=(1, 2)))[0]) for img in images]
    assert sorted(order) == list(range(50))
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"][order])
    np.testing.assert_array_equal(pixels(splits.test.tensors[0]), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_default_normalisation_constants(tmp_path):
    make_idx_dir(tmp_path)
    splits = data.load_idx_dataset(tmp_path, "mnist", val_size=5)
    assert (splits.mean, splits.std) == (0.1307, 0.3081)
    raw = data.load_idx_dataset(tmp_path, "mnist", val_size=5, normalize="none")
    torch.testing.assert_close(splits.train.tensors[0], (raw.train.tensors[0] - 0.1307) / 0.3081)
    assert 0.0 <= raw.train.tensors[0].min() and raw.train.tensors[0].max() <= 1.0


def test_train_normalisation_uses_the_training_split(tmp_path):
    make_idx_dir(tmp_path, n_train=200)
    x = data.load_idx_dataset(tmp_path, "mnist", val_size=50, normalize="train").train.tensors[0]
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std(unbiased=False).item() - 1) < 1e-4


@pytest.mark.parametrize("name,folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_torchvision_layout_is_found(tmp_path, name, folder):
    make_idx_dir(tmp_path / folder / "raw", compress=False)
    files = data.find_idx_files(tmp_path, name)
    assert files["train_images"] == tmp_path / folder / "raw" / "train-images-idx3-ubyte"
    assert data.load_idx_dataset(tmp_path, name, val_size=5).sizes() == (45, 5, 20)


def test_torchvision_layout_of_the_other_dataset_is_not_taken(tmp_path):
    make_idx_dir(tmp_path / "MNIST" / "raw")
    with pytest.raises(FileNotFoundError):
        data.find_idx_files(tmp_path, "fashion-mnist")


def test_dotted_file_names_are_found(tmp_path):
    directory = tmp_path / "kaggle"
    make_idx_dir(directory, compress=False)
    for path in directory.iterdir():
        path.rename(directory / path.name.replace("-idx", ".idx"))
    assert data.load_idx_dataset(directory, "mnist", val_size=5).sizes() == (45, 5, 20)


def test_missing_directory_message_lists_paths_and_remedy(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("fashion-mnist", root)
    message = str(info.value)
    assert str(root) in message
    assert str(root / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_missing_file_message_names_it(tmp_path):
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        data.load_idx_dataset(tmp_path, "mnist")
    message = str(info.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in message
    assert f"{tmp_path / 't10k-labels-idx1-ubyte'}[.gz] (missing)" in message
    assert str(tmp_path / "train-images-idx3-ubyte") not in message, "only missing files are listed"


def test_mnist_without_root_explains():
    with pytest.raises(FileNotFoundError, match="root="):
        data.load_dataset("mnist")


def test_image_label_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    put(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(49, np.uint8), 0x08), True)
    with pytest.raises(ValueError, match="50 images but .* 49 labels"):
        data.load_idx_dataset(tmp_path, "mnist", val_size=5)


def test_labels_out_of_range(tmp_path):
    make_idx_dir(tmp_path)
    put(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.full(20, 10, np.uint8), 0x08), True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        data.load_idx_dataset(tmp_path, "mnist", val_size=5)


@pytest.mark.parametrize("stem, array, pattern", [
    ("train-labels-idx1-ubyte", (np.arange(50) % 10 + 0.5).astype(np.float32),
     r"train-labels-idx1-ubyte.gz: labels must be integers .*float32"),  # truncated to ints before
    ("train-labels-idx1-ubyte", np.where(np.arange(50) == 7, np.nan, 1.0),
     r"train-labels-idx1-ubyte.gz: labels must be integers .*float64"),
    ("t10k-labels-idx1-ubyte", np.full(20, -3, np.int8), r"t10k-labels-idx1-ubyte.gz: labels must lie in .*-3"),
    ("t10k-images-idx3-ubyte", np.zeros((20, 28, 28), np.float32), r"t10k-images-idx3-ubyte.gz: expected uint8"),
    ("t10k-images-idx3-ubyte", np.zeros((20, 14, 14), np.uint8), r"train images are \(28, 28\) but test images "
                                                                 r"are \(14, 14\)"),
    ("t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), r"t10k-images-idx3-ubyte.gz: holds no images"),
])
def test_bad_dataset_contents_are_named(tmp_path, stem, array, pattern):
    make_idx_dir(tmp_path)
    if stem == "t10k-images-idx3-ubyte" and len(array) == 0:
        write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    write_idx(tmp_path / f"{stem}.gz", array)
    with pytest.raises(ValueError, match=pattern):
        data.load_idx_dataset(tmp_path, "mnist", val_size=5)


def test_too_few_images_for_the_validation_split_names_the_file(tmp_path):
    make_idx_dir(tmp_path, n_train=30)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: 30 training images are too few to hold "
                                         r"out 5000 for validation"):
        data.load_idx_dataset(tmp_path, "mnist")


def test_corrupt_file_in_dataset_names_it(tmp_path):
    make_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        data.load_idx_dataset(tmp_path, "mnist", val_size=5)


# ------------------------------------------------------------------------------- splits

def test_val_split_is_deterministic_and_seeded(tmp_path):
    make_idx_dir(tmp_path, n_train=100)

    def val_images(seed):
        return data.load_idx_dataset(tmp_path, "mnist", val_size=20, seed=seed).val.tensors[0]

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


@pytest.mark.parametrize("val_size,n_val", [(0, 0), (0.2, 10), (49, 49)])
def test_val_size_counts_and_fractions(tmp_path, val_size, n_val):
    make_idx_dir(tmp_path)
    assert data.load_idx_dataset(tmp_path, "mnist", val_size=val_size).sizes() == (50 - n_val, n_val, 20)


@pytest.mark.parametrize("val_size,error", [(50, ValueError), (-1, ValueError), (1.0, ValueError),
                                            ("10", TypeError), (True, TypeError)])
def test_bad_val_size(tmp_path, val_size, error):
    make_idx_dir(tmp_path)
    with pytest.raises(error, match="val_size"):
        data.load_idx_dataset(tmp_path, "mnist", val_size=val_size)


def test_unknown_names_and_modes(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="normalize"):
        data.load_dataset("mnist", tmp_path, normalize="zscore")


# ------------------------------------------------------------ the real Fashion-MNIST files

@pytest.fixture(scope="module")
def fashion():
    if not FASHION_ROOT.is_dir():
        pytest.skip(f"{FASHION_ROOT} absent (apt-get install dataset-fashion-mnist)")
    return data.load_dataset("fashion-mnist")


def test_fashion_mnist_loads_from_the_default_path(fashion):
    assert fashion.sizes() == (55000, 5000, 10000)
    assert fashion.input_shape == (1, 28, 28) and fashion.num_classes == 10
    x, y = fashion.train.tensors
    assert x.shape == (55000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    # Fashion-MNIST's training set has exactly 6000 images per class.
    counts = torch.bincount(torch.cat([y, fashion.val.tensors[1]]), minlength=10)
    assert counts.tolist() == [6000] * 10
    assert torch.bincount(fashion.test.tensors[1]).tolist() == [1000] * 10


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_published_fashion_statistics_match_the_files():
    files = data.find_idx_files(None, "fashion-mnist")
    pixels = read_idx(files["train_images"]).astype(np.float64) / 255
    info = data._IDX_INFO["fashion-mnist"]
    assert pixels.mean() == pytest.approx(info.mean, abs=5e-4)
    assert pixels.std() == pytest.approx(info.std, abs=5e-4)


# ------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")
    return data.load_dataset("digits")


def test_digits_splits(digits):
    n_train, n_val, n_test = digits.sizes()
    assert (n_val, n_test) == (180, 360) and n_train + n_val + n_test == 1797
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    x, y = digits.train.tensors
    assert x.shape == (n_train, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    # Stratified: every class in every split, in proportion (about 18 per class in val).
    for split, lo in ((digits.val, 15), (digits.test, 33)):
        assert torch.bincount(split.tensors[1], minlength=10).min().item() >= lo


def test_digits_test_split_fixed_val_split_seeded(digits):
    other = data.load_dataset("digits", seed=1)
    # Test images are the same examples whatever the seed (their normalisation follows
    # the training split, so compare labels and un-normalised pixels).
    def raw(splits, part):
        return getattr(splits, part).tensors[0] * splits.std + splits.mean

    torch.testing.assert_close(raw(other, "test"), raw(digits, "test"))
    assert not torch.allclose(raw(other, "val"), raw(digits, "val"))
    again = data.load_dataset("digits", seed=0)
    assert torch.equal(again.val.tensors[0], digits.val.tensors[0])


def test_digits_takes_no_root(tmp_path):
    with pytest.raises(ValueError, match="no root"):
        data.load_dataset("digits", tmp_path)


# ------------------------------------------------------------------------------ loaders

def test_loaders_are_deterministic_per_seed(tmp_path):
    make_idx_dir(tmp_path, n_train=100)
    splits = data.load_idx_dataset(tmp_path, "mnist", val_size=10)

    def order(seed, epochs=2):
        loader = data.make_loaders(splits, batch_size=16, seed=seed).train
        return [y.tolist() for _ in range(epochs) for _, y in loader]

    torch.manual_seed(123)
    first = order(0)
    torch.manual_seed(456)  # the global RNG must not matter
    assert order(0) == first
    assert order(1) != first
    assert first[:7] != first[7:], "each epoch draws a new order"


def test_eval_loaders_keep_order_and_shapes(tmp_path):
    make_idx_dir(tmp_path, n_train=100)
    splits = data.load_idx_dataset(tmp_path, "mnist", val_size=10)
    loaders = data.make_loaders(splits, batch_size=32, eval_batch_size=8)
    x, y = next(iter(loaders.train))
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    test_labels = torch.cat([y for _, y in loaders.test])
    assert torch.equal(test_labels, splits.test.tensors[1])
    assert sum(len(y) for _, y in loaders.val) == 10
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(splits.train, 0)


# ------------------------------------------------------------------------- text corpus

# Three top-level sources (written out of name order), plus what must be skipped:
# a subfolder's .py file and a file of another kind.
SOURCES = {
    "b_second.py": "def f(x):\n    return x + 1\n" * 6,
    "a_first.py": "import os\nprint(os.sep)\n" * 6,
    "c_third.py": "value = [1, 2, 3]\n" * 8 + "# the end: Zebra Quux\n",
}
SOURCE_TEXT = "".join(SOURCES[name] + "\n" for name in sorted(SOURCES))


def make_source_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in SOURCES.items():
        (directory / name).write_text(text, encoding="utf-8")
    (directory / "sub").mkdir()
    (directory / "sub" / "nested.py").write_text("NESTED = True\n")
    (directory / "notes.txt").write_text("not python\n")
    return directory


@pytest.fixture
def sources(tmp_path):
    return make_source_dir(tmp_path / "src")


def test_python_corpus_reads_top_level_files_in_name_order(sources):
    corpus = data.load_python_corpus(root=sources, val_fraction=0.2, context=8)
    assert corpus.source == sources and corpus.files == 3 and corpus.context == 8
    assert corpus.train.dtype == corpus.val.dtype == torch.int64 and corpus.train.dim() == 1
    text = corpus.decode(corpus.train) + corpus.decode(corpus.val)
    known = set(corpus.vocab)
    assert text == "".join(c if c in known else "\ufffd" for c in SOURCE_TEXT)
    assert "NESTED" not in text and "not python" not in text


def test_python_corpus_split_sizes_and_vocabulary(sources):
    n = len(SOURCE_TEXT)
    corpus = data.load_python_corpus(root=sources, val_fraction=0.25, context=8)
    assert len(corpus.val) == round(0.25 * n) and len(corpus.train) + len(corpus.val) == n
    train_text = SOURCE_TEXT[:len(corpus.train)]
    assert corpus.vocab == sorted(set(train_text))
    assert corpus.unknown_id == len(corpus.vocab) and corpus.vocab_size == len(corpus.vocab) + 1
    assert torch.equal(corpus.train, torch.tensor([corpus.vocab.index(c) for c in train_text]))
    # c_third.py's capitals sit in the validation text only: they get the unknown id
    val_text = SOURCE_TEXT[len(corpus.train):]
    unseen = [i for i, c in enumerate(val_text) if c not in corpus.vocab]
    assert {val_text[i] for i in unseen} >= {"Z", "Q"}
    assert torch.equal((corpus.val == corpus.unknown_id).nonzero().flatten(), torch.tensor(unseen))
    assert corpus.train.max() < corpus.unknown_id
    assert torch.equal(corpus.encode(val_text), corpus.val)
    assert data.load_python_corpus(root=sources, val_fraction=0.0, context=8).val.numel() == 0


def test_python_corpus_max_chars_cuts_the_text(sources):
    first = len(SOURCES["a_first.py"]) + 1
    corpus = data.load_python_corpus(root=sources, max_chars=first + 30, val_fraction=0.1, context=8)
    assert corpus.files == 2 and len(corpus.train) + len(corpus.val) == first + 30
    assert corpus.decode(corpus.train).startswith(SOURCES["a_first.py"] + "\ndef f(x)")


def test_python_corpus_is_deterministic_and_replaces_bad_bytes(sources):
    (sources / "d_bytes.py").write_bytes(b"x = '\xff\xfe'\n" * 20)
    a = data.load_python_corpus(root=sources, val_fraction=0.1, context=8)
    b = data.load_python_corpus(root=sources, val_fraction=0.1, context=8)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.vocab == b.vocab
    assert "\ufffd" in a.vocab  # undecodable bytes become U+FFFD (here in the training text)


def test_text_loader_windows_shift_by_one(sources):
    corpus = data.load_python_corpus(root=sources, val_fraction=0.2, context=8)
    loader = corpus.loader("val", batch_size=4)  # not shuffled by default: windows in order from 0
    windows = (len(corpus.val) - 1) // 8
    assert len(loader) == math.ceil(windows / 4)
    batches = list(loader)
    x, y = batches[0]
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(x[1], corpus.val[8:16]) and torch.equal(y[1], corpus.val[9:17])
    assert sum(len(bx) for bx, _ in batches) == windows
    assert len(data.text_loader(corpus.val, 8, 4, drop_last=True)) == windows // 4

    # token i is i: a row's first token is where its window starts
    tokens = torch.arange(203)
    offsets = set()
    for seed in range(8):
        shuffled = list(data.text_loader(tokens, 8, 5, shuffle=True, seed=seed))
        xs, ys = torch.cat([b[0] for b in shuffled]), torch.cat([b[1] for b in shuffled])
        starts = xs[:, 0]
        assert len(xs) == 202 // 8 and torch.equal(xs, starts[:, None] + torch.arange(8))
        assert torch.equal(ys, xs + 1)
        offset = int(starts.min())
        assert torch.equal(starts.sort().values, offset + 8 * torch.arange(len(xs)))  # no overlap, no gap
        assert not torch.equal(starts, starts.sort().values)  # visited in a random order
        offsets.add(offset)
    assert offsets == {0, 1, 2}  # the cuts move within the 2 tokens left over


def test_text_loader_is_deterministic_per_seed(sources):
    tokens = data.load_python_corpus(root=sources, val_fraction=0.1, context=8).train

    def run(seed, passes=2):
        loader = data.text_loader(tokens, 8, 4, shuffle=True, seed=seed)
        return [x.tolist() for _ in range(passes) for x, _ in loader]

    torch.manual_seed(1)
    first = run(0)
    torch.manual_seed(2)  # the global RNG must not matter
    assert run(0) == first and run(1) != first
    half = len(first) // 2
    assert first[:half] != first[half:], "each pass draws a new order"

    steps = data.text_loader(tokens, 8, 7, shuffle=True, seed=0, steps=25)
    batches = [x for x, _ in steps]
    assert len(steps) == len(batches) == 25 and all(x.shape == (7, 8) for x in batches)
    assert 25 * 7 > (len(tokens) - 1) // 8  # it spans several passes
    again = [x for x, _ in data.text_loader(tokens, 8, 7, shuffle=True, seed=0, steps=25)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_python_corpus_errors(tmp_path, sources):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing} does not exist")):
        data.load_python_corpus(root=missing)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.load_python_corpus(root=sources / "a_first.py")
    empty = tmp_path / "empty"
    (empty / "pkg").mkdir(parents=True)
    (empty / "pkg" / "mod.py").write_text("x = 1\n" * 100)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty} holds no .py files")):
        data.load_python_corpus(root=empty)
    for kwargs, name in [({"max_chars": 0}, "max_chars"), ({"max_chars": 2.5}, "max_chars"),
                         ({"max_chars": True}, "max_chars"), ({"context": 0}, "context"),
                         ({"val_fraction": 1.0}, "val_fraction"), ({"val_fraction": -0.1}, "val_fraction"),
                         ({"val_fraction": "0.1"}, "val_fraction")]:
        with pytest.raises(ValueError, match=name):
            data.load_python_corpus(root=sources, **kwargs)
    with pytest.raises(ValueError, match="leave 54 training characters, too few for one window of context"):
        data.load_python_corpus(root=sources, max_chars=60, val_fraction=0.1, context=64)
    with pytest.raises(ValueError, match="validation characters, too few"):
        data.load_python_corpus(root=sources, val_fraction=0.01, context=64)
    tokens = torch.arange(8)
    with pytest.raises(ValueError, match="8 tokens are too few for one window: context=8 needs 9"):
        data.text_loader(tokens, 8, 2)
    with pytest.raises(ValueError, match="batch_size"):
        data.text_loader(tokens, 4, 0)
    with pytest.raises(ValueError, match="1-D integer"):
        data.text_loader(tokens.float(), 4, 2)
    with pytest.raises(ValueError, match="split must be"):
        data.load_python_corpus(root=sources, context=8).loader("test")


def test_python_corpus_from_the_standard_library():
    import sysconfig
    corpus = data.load_python_corpus(max_chars=20_000, context=64)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert corpus.source == stdlib and corpus.files >= 1
    assert len(corpus.train) == 18_000 and len(corpus.val) == 2_000
    first = min((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: p.name)
    expected = first.read_bytes().decode("utf-8", errors="replace")[:1000]
    assert corpus.decode(corpus.train[:len(expected)]) == expected
    assert len(corpus.vocab) > 50  # letters, digits, punctuation, whitespace
    x, y = next(iter(corpus.loader("train", 8, steps=1)))
    assert x.shape == y.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])
