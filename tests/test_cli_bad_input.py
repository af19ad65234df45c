"""Bad input to the ``pyprune`` command: every bad option value, broken data
folder and damaged run file ends in exactly one line on stderr that names the
option or the file, and exit code 2, before any long work starts; a damaged cache
is rebuilt; a diverging training stops with a clear message; a moved run
directory resumes.

As in tests/test_cli.py, the many error cases call ``main(argv)`` in this process
(the same code path as the command, without an interpreter start each), and one
case of each kind also runs as a real ``python -m pyprune_ext`` subprocess, where
the exit code and stderr are the process's own. Every case fails within the first
second or so (tiny settings), so the file stays fast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyprune_ext.cli import main
from pyprune_ext.cli.common import cpu_count
from pyprune_ext.data import write_idx

# One thread per subprocess: the runs are tiny, and the machine may be shared.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def pyprune(*args, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m pyprune_ext ARGS`` in ``cwd``; returns the finished process."""
    return subprocess.run([sys.executable, "-m", "pyprune_ext", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _check_one_line(code, stderr: str, names, report: str) -> str:
    assert code == 2, report
    assert "Traceback" not in stderr, report
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, report
    for name in names:
        assert name in lines[0], (name, report)
    return lines[0]


def one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """The process exited with code 2 and exactly one non-empty stderr line, which
    names each of ``names``; returns that line."""
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return _check_one_line(result.returncode, result.stderr, names, report)


def main_error(argv, capsys, *names: str, cwd: Path = None) -> str:
    """``main(argv)`` in this process: the same checks as :func:`one_line_error`."""
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    finally:
        os.chdir(before)
    captured = capsys.readouterr()
    report = f"exit {code}\nstdout:\n{captured.out}\nstderr:\n{captured.err}"
    return _check_one_line(code, captured.err, names, report)


# --------------------------------------------------------------- option values

TINY_LOTTERY = ("--levels", 1, "--iterations", 4, "--eval-every", 2, "--quiet")

BAD_OPTIONS = [
    (["lottery", "--epochs", "inf"], ["--epochs", "finite"]),
    (["lottery", "--epochs", "1e309"], ["--epochs", "finite"]),
    (["taylor", "--epochs", "nan"], ["--epochs", "finite"]),
    (["lottery", "--epochs", "1e300"], ["--epochs", "at most"]),
    (["lottery", "--lr", "inf"], ["--lr", "finite"]),
    (["taylor", "--lr", "-0.1"], ["--lr", "> 0"]),
    (["lottery", "--seed", "4294967296"], ["--seed", "4294967295"]),
    (["lottery", "--seed", "-1"], ["--seed"]),
    (["lottery", "--threads", "1e29"], ["--threads"]),
    (["lottery", "--threads", str(10**29)], ["--threads", "CPUs"]),
    (["taylor", "--threads", "100000"], ["--threads", f"from 1 to {cpu_count()}"]),
    (["lottery", "--levels", "1e29"], ["--levels"]),
    (["lottery", "--levels", str(10**29)], ["--levels", "2147483647"]),
    (["taylor", "--batch-size", "1e29"], ["--batch-size"]),
    (["taylor", "--batch-size", str(10**29)], ["--batch-size", "2147483647"]),
    (["lottery", "--iterations", str(2**63)], ["--iterations"]),
    (["taylor", "--every", str(2**64)], ["--every"]),
    (["lottery", "--rate", "nan"], ["--rate"]),
    (["lottery", "--nproc", str(10**30)], ["--nproc"]),
    (["taylor", "--normalize", "flops"], ["--normalize", "'macs'"]),
    (["lottery", "--pattern", "2/4"], ["--pattern", "N:M"]),
    (["lottery", "--pattern", "4:2"], ["--pattern", "0 < N < M"]),
]


@pytest.mark.parametrize("argv, names", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_values(tmp_path, capsys, argv, names):
    main_error([*argv, "--out", tmp_path / "out"], capsys, *names)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _path_cases(tmp_path: Path):
    (tmp_path / "file").write_text("a regular file\n")
    (tmp_path / "folder").mkdir()
    return [
        (["lottery", *TINY_LOTTERY, "--export", tmp_path / "folder"], ["--export", "is a directory"]),
        (["taylor", "--export", tmp_path / "file" / "model.pt"], ["--export", "is a file, not a folder"]),
        (["lottery", *TINY_LOTTERY, "--export", tmp_path / "file" / "a" / "t.pt"], ["--export", "not a folder"]),
        (["lottery", *TINY_LOTTERY, "--out", tmp_path / "file"], ["--out", "not a directory"]),
        (["taylor", "--out", tmp_path / "file" / "run"], ["--out", "not a folder"]),
        (["bench", "masked", "--quick", "--json-dir", tmp_path / "file" / "json"], ["--json-dir", "not a folder"]),
        (["bench", "masked", "--quick", "--json-dir", tmp_path / "file"], ["--json-dir", "not a directory"]),
        (["lottery", *TINY_LOTTERY, "--export-level", 3, "--export", tmp_path / "t.pt"],
         ["--export-level 3", "0..1"]),
        (["lottery", *TINY_LOTTERY, "--export-level", 1], ["--export-level", "needs --export"]),
    ]


def test_output_paths_are_checked_before_the_run(tmp_path, capsys):
    """--export, --out and bench --json-dir that cannot be written fail at once,
    not after the training."""
    for argv, names in _path_cases(tmp_path):
        main_error(argv, capsys, *names, cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # nothing ran, nothing written


# -------------------------------------------------------------------- data folders

N_TRAIN = 5010  # the command holds out 5000 validation images


def mnist_folder(directory: Path, train_images=None, train_labels=None, test_images=None, test_labels=None,
                 n_train: int = N_TRAIN) -> Path:
    """Four small IDX files (4x4 images); any of them replaced by the array given."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 4, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 20, dtype=np.uint8),
    }
    given = dict(zip(arrays, (train_images, train_labels, test_images, test_labels)))
    directory.mkdir(parents=True)
    for stem, array in arrays.items():
        write_idx(directory / stem, array if given[stem] is None else given[stem])
    return directory


LABELS = np.arange(N_TRAIN) % 10
BAD_FOLDERS = {
    "label 10": (dict(train_labels=np.where(LABELS == 3, 10, LABELS).astype(np.uint8)),
                 ["train-labels-idx1-ubyte", "[0, 10)", "10"]),
    "negative label": (dict(test_labels=np.full(20, -1, np.int8)), ["t10k-labels-idx1-ubyte", "[0, 10)", "-1"]),
    "float labels": (dict(train_labels=(LABELS + 0.5).astype(np.float32)),
                     ["train-labels-idx1-ubyte", "integers", "float32"]),
    "NaN label": (dict(train_labels=np.where(LABELS == 3, np.nan, LABELS).astype(np.float64)),
                  ["train-labels-idx1-ubyte", "integers", "float64"]),
    "counts differ": (dict(train_labels=LABELS[:-1].astype(np.uint8)),
                      ["train-images-idx3-ubyte", "5010 images", "train-labels-idx1-ubyte", "5009 labels"]),
    "int16 images": (dict(test_images=np.zeros((20, 4, 4), np.int16)), ["t10k-images-idx3-ubyte", "uint8", "int16"]),
    "sizes differ": (dict(test_images=np.zeros((20, 5, 5), np.uint8)),
                     ["train images are (4, 4)", "test images are (5, 5)"]),
    "too few for validation": (dict(n_train=100), ["train-images-idx3-ubyte", "100 training images are too few",
                                                   "5000"]),
    "no test images": (dict(test_images=np.zeros((0, 4, 4), np.uint8), test_labels=np.zeros(0, np.uint8)),
                       ["t10k-images-idx3-ubyte", "no images"]),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_broken_mnist_folders(tmp_path, capsys, case):
    defect, names = BAD_FOLDERS[case]
    folder = mnist_folder(tmp_path / "mnist", **defect)
    line = main_error(["lottery", "--dataset", "mnist", "--data-dir", folder, *TINY_LOTTERY,
                       "--out", tmp_path / "out"], capsys, "--dataset mnist", *names)
    assert str(folder) in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ run directories

RUN = ("lottery", *TINY_LOTTERY, "--control", "reinit", "--json")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny lottery run (ticket levels 0-1, reinit level 1), run by the
    command itself; copied by each test. Returns its folder and its summary rows."""
    base = tmp_path_factory.mktemp("lottery")
    result = pyprune(*RUN, "--out", base / "run", cwd=base)
    assert result.returncode == 0, result.stderr
    return base / "run", rows(result.stdout)


def rows(stdout: str):
    drop = ("wall_time_s", "step_time_ms")
    return [{k: v for k, v in r.items() if k not in drop} for r in json.loads(stdout)["levels"]]


def damage(run: Path, case: str) -> str:
    """Damages ``run`` as ``case`` says; returns the (end of the) path to blame."""
    ticket = run / "ticket"
    if case in ("config []", "config null"):
        (ticket / "config.json").write_text(case.split()[1] + "\n")
        return "ticket/config.json"
    if case == "control config []":
        (run / "reinit" / "config.json").write_text("[]\n")
        return "reinit/config.json"
    if case == "config not UTF-8":
        (ticket / "config.json").write_bytes(b'{"levels": 1, "note": "\xff\xfe"}\n')
        return "ticket/config.json"
    if case == "metrics {}":
        (ticket / "level_00" / "metrics.json").write_text("{}\n")
        return "level_00/metrics.json"
    if case == "metrics not UTF-8":
        (run / "reinit" / "level_01" / "metrics.json").write_bytes(b"\x80\x81\n")
        return "reinit/level_01/metrics.json"
    if case == "done without mask.pt":
        (ticket / "level_01" / "mask.pt").unlink()
        return "mask.pt"
    if case == "no rewind_point.pt":
        (ticket / "rewind_point.pt").unlink()
        shutil.rmtree(ticket / "level_01")  # level 1 must start again: it rewinds to the lost point
        return "ticket/rewind_point.pt"
    if case == "damaged checkpoint":
        shutil.rmtree(ticket / "level_01")
        (ticket / "level_01").mkdir()
        torch.save({"format": "pyprune_ext.lottery.checkpoint", "iteration": 2}, ticket / "level_01" / "checkpoint.pt")
        return "level_01/checkpoint.pt"
    raise AssertionError(case)


DAMAGES = ["config []", "config null", "control config []", "config not UTF-8", "metrics {}", "metrics not UTF-8",
           "done without mask.pt", "no rewind_point.pt", "damaged checkpoint"]


@pytest.mark.parametrize("case", DAMAGES)
def test_damaged_run_files(finished_run, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    blamed = damage(run, case)
    main_error([*RUN, "--out", run], capsys, blamed, cwd=tmp_path)


def test_a_moved_run_directory_resumes(finished_run, tmp_path):
    """The path is not part of what a run is: the ticket run and its controls,
    moved together, resume at the new path without training anything again."""
    shutil.copytree(finished_run[0], tmp_path / "copy")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tmp_path / "copy", tmp_path / "elsewhere" / "moved")
    moved = tmp_path / "elsewhere" / "moved"
    stamps = {p: p.stat().st_mtime_ns for p in moved.rglob("final.pt")}
    assert len(stamps) == 3
    after = pyprune(*RUN, "--out", moved, cwd=tmp_path / "elsewhere")
    assert after.returncode == 0, after.stderr
    assert rows(after.stdout) == finished_run[1]
    assert {p: p.stat().st_mtime_ns for p in moved.rglob("final.pt")} == stamps  # nothing retrained
    saved = json.loads((moved / "reinit" / "config.json").read_text())
    assert saved["control_source"] == os.path.join("..", "ticket")  # relative: no absolute path stored


# ------------------------------------------------------------------ diverging training

def test_a_diverging_lottery_training_stops_with_a_clear_message(tmp_path):
    result = pyprune("lottery", *TINY_LOTTERY, "--lr", "1e30", "--control", "none", "--out", tmp_path / "run",
                     cwd=tmp_path)
    line = one_line_error(result, "ticket level 0", "training loss became", "iteration", "--lr")
    assert str(tmp_path / "run") in line  # where not to rerun with another --lr
    assert not (tmp_path / "run" / "ticket" / "level_00" / "done").exists()


def test_a_diverging_taylor_training_stops_the_same_way(tmp_path, capsys):
    main_error(["taylor", "--model", "lenet300", "--iterations", 4, "--lr", "1e30", "--quiet",
                "--out", tmp_path / "run"], capsys, "training (dense)", "the loss became", "--lr")


# ------------------------------------------------------------- the real command

def test_each_kind_of_error_from_the_real_command(finished_run, tmp_path):
    """One case of each kind above as a real process: its own exit code 2 and
    exactly one stderr line (no usage text, no traceback, no warnings)."""
    one_line_error(pyprune("lottery", "--epochs", "inf", cwd=tmp_path), "argument --epochs", "finite")
    argv, names = _path_cases(tmp_path)[1]
    one_line_error(pyprune(*argv, cwd=tmp_path), *names)
    defect, names = BAD_FOLDERS["float labels"]
    folder = mnist_folder(tmp_path / "mnist", **defect)
    one_line_error(pyprune("lottery", "--dataset", "mnist", "--data-dir", folder, cwd=tmp_path), *names)
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    blamed = damage(run, "metrics {}")
    one_line_error(pyprune(*RUN, "--out", run, cwd=tmp_path), blamed)


# ------------------------------------------------------------------- caches

def test_a_damaged_dense_cache_is_rebuilt(tmp_path, capsys):
    """taylor's dense.json is a cache, like dense.pt: damaged, it is rebuilt (the
    dense model trained again), never an error that blocks every rerun."""
    argv = ["taylor", "--model", "lenet300", "--iterations", "3", "--finetune-epochs", "0", "--channels", "2",
            "--every", "1", "--quiet", "--json", "--out", str(tmp_path / "run")]

    def taylor() -> dict:
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    assert taylor()["dense_training"]["source"] == "trained"
    assert taylor()["dense_training"]["source"] == "reused"
    cache = tmp_path / "run" / "dense.json"
    settings = json.loads(cache.read_text())["settings"]
    for content in [b"[]\n", b"\xff\xfe\n", b"not json",
                    json.dumps({"settings": settings, "training": {"steps": 3}}).encode()]:
        cache.write_bytes(content)
        assert taylor()["dense_training"]["source"] == "trained", content
        assert json.loads(cache.read_text())["settings"] == settings  # rewritten whole
