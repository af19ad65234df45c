"""The ``pyprune`` command line, run as users run it: in subprocesses, on tiny
settings, checking the files written and the numbers reported; every error path
(exit code 2, one line, no traceback); Ctrl-C; resume after a killed run; and the
exported model loaded where pyprune_ext cannot be imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pyprune_ext.cli import main
from pyprune_ext.data import load_dataset
from pyprune_ext.models import build_model
from pyprune_ext.taylor import apply_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS_CHANCE = 0.1


def pyprune(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pyprune_ext ARGS`` in ``cwd``; returns the finished process."""
    return subprocess.run([sys.executable, "-m", "pyprune_ext", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# A process started with SIGINT ignored (a test run in the background of a non-interactive
# shell) passes that on, and Python then installs no KeyboardInterrupt handler: the started
# command is given Python's own handler back, as it has when a user runs it.
_WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('pyprune_ext', run_name='__main__', alter_sys=True)")


def start_pyprune(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WITH_CTRL_C, *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {path} appeared:\n"
                                 + process.stderr.read())
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


# The exported file must load with plain torch where pyprune_ext is not importable.
_LOAD_WITHOUT_PYPRUNE = textwrap.dedent("""
    import sys
    sys.modules["pyprune_ext"] = None   # any import of pyprune_ext now raises ImportError
    import torch
    try:
        import pyprune_ext  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("pyprune_ext was importable")
    model = torch.export.load(sys.argv[1]).module()
    images = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(images)
    weights = {name: value for name, value in model.state_dict().items() if name.endswith("weight")}
    torch.save({"predictions": logits.argmax(1), "one": model(images[:1]).shape,
                "zeros": {n: int((w == 0).sum()) for n, w in weights.items()},
                "sizes": {n: w.numel() for n, w in weights.items()}}, sys.argv[3])
""")


def run_export_without_pyprune(model_file: Path, images: torch.Tensor, tmp_path: Path) -> dict:
    torch.save(images, tmp_path / "images.pt")
    script = tmp_path / "load_export.py"
    script.write_text(_LOAD_WITHOUT_PYPRUNE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok(subprocess.run([sys.executable, str(script), str(model_file), str(tmp_path / "images.pt"),
                       str(tmp_path / "result.pt")], cwd=tmp_path, capture_output=True, text=True, env=env,
                      timeout=120))
    return torch.load(tmp_path / "result.pt")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


# ---------------------------------------------------------------------- taylor

def test_taylor_prunes_to_the_flops_target_and_exports(tmp_path, digits):
    out, exported = tmp_path / "run", tmp_path / "pruned.pt2"
    result = ok(pyprune("taylor", "--epochs", 2, "--finetune-epochs", 1, "--target-flops", 0.6, "--every", 5,
                        "--out", out, "--export", exported, "--quiet", "--json", cwd=tmp_path))
    metrics = json.loads(result.stdout)  # --json: stdout is exactly the JSON result
    assert "test accuracy" in result.stderr  # the summary table goes to stderr

    assert metrics["model"] == "resnet20" and metrics["dataset"] == "digits"
    assert metrics["flops_kept"] <= 0.6 and metrics["flops_kept"] > 0.45
    assert metrics["pruned"]["macs"] == pytest.approx(metrics["flops_kept"] * metrics["dense"]["macs"], rel=1e-9)
    assert metrics["pruned"]["params"] < metrics["dense"]["params"]
    assert metrics["dense"]["test_accuracy"] > 5 * DIGITS_CHANCE
    assert metrics["pruned"]["test_accuracy"] > 5 * DIGITS_CHANCE
    assert metrics["pruning_steps"] == len(metrics["steps"]) >= 1
    flops = [s["flops_kept"] for s in metrics["steps"]]
    assert flops == sorted(flops, reverse=True) and flops[-1] <= 0.6

    for name in ("config.json", "dense.pt", "dense.json", "metrics.json", "summary.csv", "steps.csv", "layers.csv",
                 "pruned_state.pt", "plan.json"):
        assert (out / name).is_file(), name
    assert is_png(out / "accuracy_vs_flops.png") and is_png(out / "channels_per_layer.png")
    assert json.loads((out / "metrics.json").read_text())["pruned"] == metrics["pruned"]
    assert len((out / "steps.csv").read_text().splitlines()) == 1 + metrics["pruning_steps"]

    # The folder's plan + state_dict rebuild the pruned model with pyprune_ext.
    example = digits.train.tensors[0][:2]
    rebuilt = apply_plan(build_model("resnet20", digits.input_shape, 10), example,
                         json.loads((out / "plan.json").read_text()))
    rebuilt.load_state_dict(torch.load(out / "pruned_state.pt", weights_only=True))
    images, labels = digits.test.tensors
    with torch.no_grad():
        rebuilt_accuracy = float((rebuilt.eval()(images).argmax(1) == labels).float().mean())
    assert rebuilt_accuracy == pytest.approx(metrics["pruned"]["test_accuracy"], abs=1.5 / len(labels))

    # The export runs with plain torch, any batch size, and gives the reported accuracy.
    assert metrics["export"]["max_abs_difference"] <= 1e-4
    loaded = run_export_without_pyprune(exported, images, tmp_path)
    assert loaded["one"] == (1, 10)
    exported_accuracy = float((loaded["predictions"] == labels).float().mean())
    assert exported_accuracy == pytest.approx(metrics["pruned"]["test_accuracy"], abs=1.5 / len(labels))


def test_taylor_channel_and_parameter_targets_and_dense_reuse(tmp_path):
    common = ("--model", "lenet300", "--epochs", 1, "--finetune-epochs", 0, "--every", 2, "--quiet", "--json")
    by_channels = json.loads(ok(pyprune("taylor", *common, "--channels", 7, "--prune-per-step", 3,
                                        "--out", tmp_path / "a", cwd=tmp_path)).stdout)
    removed = sum(l["out_before"] - l["out_after"] for l in by_channels["layers"])
    assert removed == 7  # 3 + 3 + 1: the last step takes only what the target needs
    by_params = ok(pyprune("taylor", *common, "--target-params", 0.5, "--out", tmp_path / "a", cwd=tmp_path))
    metrics = json.loads(by_params.stdout)
    assert 0.4 < metrics["params_kept"] <= 0.5
    # Same training settings in the same folder: the dense model is reused, not retrained.
    assert metrics["dense_training"]["source"] == "reused"
    assert metrics["dense"]["test_accuracy"] == by_channels["dense"]["test_accuracy"]
    # ... and pruning goes the same way as when the dense model was trained in the same run.
    again = json.loads(ok(pyprune("taylor", *common, "--channels", 7, "--prune-per-step", 3,
                                  "--out", tmp_path / "a", cwd=tmp_path)).stdout)
    assert again["dense_training"]["source"] == "reused"
    assert again["steps"] == by_channels["steps"] and again["layers"] == by_channels["layers"]
    assert again["pruned"]["test_accuracy"] == by_channels["pruned"]["test_accuracy"]


def test_taylor_vit_loses_heads_and_neurons_and_exports(tmp_path):
    """The small ViT: heads (MultiheadAttention rows, out_proj columns) and MLP neurons are pruned,
    the per-layer table shows both, and the export loads with plain torch."""
    result = json.loads(ok(pyprune("taylor", "--model", "vit", "--epochs", 1, "--finetune-epochs", 0, "--every", 2,
                                   "--criterion", "fo_gate", "--channels", 40, "--prune-per-step", 8, "--quiet",
                                   "--normalize", "macs", "--json", "--export", tmp_path / "vit.pt", "--out", tmp_path / "run",
                                   cwd=tmp_path)).stdout)
    layers = {l["name"]: l for l in result["layers"]}
    assert result["options"]["normalize"] == "macs"
    assert layers["blocks.0.attn"]["out_before"] == 64 and layers["blocks.0.attn.out_proj"]["in_before"] == 64
    assert all(layers[f"blocks.{i}.attn"]["out_after"] == layers[f"blocks.{i}.attn.out_proj"]["in_after"]
               and layers[f"blocks.{i}.attn"]["out_after"] % 16 == 0 for i in range(4))  # whole heads
    assert sum(l["out_before"] - l["out_after"] for n, l in layers.items() if n.endswith("mlp.0")) > 0
    model = torch.export.load(tmp_path / "vit.pt").module()
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


# --------------------------------------------------------------------- lottery

LOTTERY_TINY = ("--levels", 2, "--iterations", 60, "--eval-every", 20, "--quiet")


def test_lottery_tickets_controls_files_and_export(tmp_path, digits):
    out, exported = tmp_path / "run", tmp_path / "ticket.pt"
    result = ok(pyprune("lottery", *LOTTERY_TINY, "--out", out, "--export", exported, "--json", cwd=tmp_path))
    payload = json.loads(result.stdout)
    rows = {(r["variant"], r["level"]): r for r in payload["levels"]}
    assert set(rows) == {("ticket", 0), ("ticket", 1), ("ticket", 2), ("reinit", 1), ("reinit", 2),
                         ("random", 1), ("random", 2)}
    # Per-layer 20% of the remaining weights per level: 80%, then 64% (rounding per layer).
    for variant in ("ticket", "reinit", "random"):
        assert rows[(variant, 1)]["remaining_pct"] == pytest.approx(80.0, abs=0.05)
        assert rows[(variant, 2)]["remaining_pct"] == pytest.approx(64.0, abs=0.05)
    for row in payload["levels"]:
        assert row["early_stop_test_accuracy"] > 5 * DIGITS_CHANCE
        assert row["early_stop_iteration"] in (20, 40, 60)

    for variant in ("ticket", "reinit", "random"):
        assert (out / variant / "summary.csv").is_file()
    assert (out / "ticket" / "level_02" / "mask.pt").is_file()
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 7
    assert is_png(out / "accuracy_vs_remaining.png") and is_png(out / "early_stop_vs_remaining.png")

    # The exported ticket (level 2) runs with plain torch; pruned weights are zeros in the file.
    assert payload["export"]["level"] == 2
    loaded = run_export_without_pyprune(exported, digits.test.tensors[0], tmp_path)
    zeros, sizes = sum(loaded["zeros"].values()), sum(loaded["sizes"].values())
    assert 1 - zeros / sizes == pytest.approx(0.64, abs=0.002)
    accuracy = float((loaded["predictions"] == digits.test.tensors[1]).float().mean())
    assert accuracy == pytest.approx(rows[("ticket", 2)]["final_test_accuracy"], abs=1.5 / len(digits.test))


def test_lottery_resumes_after_kill_and_matches_an_uninterrupted_run(tmp_path):
    args = ("--levels", 3, "--iterations", 200, "--eval-every", 50, "--control", "random", "--quiet")
    killed = start_pyprune("lottery", *args, "--out", tmp_path / "killed", cwd=tmp_path)
    wait_for(tmp_path / "killed" / "ticket" / "level_01" / "done", killed)
    killed.kill()  # SIGKILL: no cleanup at all
    killed.wait()
    finished_before = (tmp_path / "killed" / "ticket" / "level_00" / "final.pt").stat().st_mtime_ns

    resumed = json.loads(ok(pyprune("lottery", *args, "--json", "--out", tmp_path / "killed", cwd=tmp_path)).stdout)
    straight = json.loads(ok(pyprune("lottery", *args, "--json", "--out", tmp_path / "straight", cwd=tmp_path)).stdout)
    # A finished level is never recomputed.
    assert (tmp_path / "killed" / "ticket" / "level_00" / "final.pt").stat().st_mtime_ns == finished_before
    drop_times = lambda rows: [{k: v for k, v in r.items() if not k.endswith("time_s") and k != "step_time_ms"}
                               for r in rows]  # noqa: E731
    assert drop_times(resumed["levels"]) == drop_times(straight["levels"])
    for level in range(4):
        name = f"level_{level:02d}/mask.pt"
        a = torch.load(tmp_path / "killed" / "ticket" / name, weights_only=True)["masks"]
        b = torch.load(tmp_path / "straight" / "ticket" / name, weights_only=True)["masks"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    process = start_pyprune("lottery", "--levels", 20, "--iterations", 100000, "--quiet", "--out", tmp_path / "run",
                            cwd=tmp_path)
    wait_for(tmp_path / "run" / "ticket" / "level_00" / "checkpoint.pt", process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert (tmp_path / "run" / "ticket" / "config.json").is_file()
    assert (tmp_path / "run" / "ticket" / "level_00" / "checkpoint.pt").is_file()


# ---------------------------------------------------------------- other commands

def test_model_file_runs_a_users_factory(tmp_path):
    (tmp_path / "my_model.py").write_text(textwrap.dedent("""
        import math
        from torch import nn

        def tiny(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(),
                                 nn.Linear(32, num_classes))
    """))
    result = ok(pyprune("lottery", "--model-file", "my_model.py:tiny", "--levels", 1, "--iterations", 40,
                        "--control", "none", "--quiet", "--json", "--out", tmp_path / "run", cwd=tmp_path))
    rows = json.loads(result.stdout)["levels"]
    assert [r["level"] for r in rows] == [0, 1]
    assert rows[1]["remaining_pct"] == pytest.approx(80.0, abs=0.1)


def test_info_and_console_script(tmp_path):
    import pyprune_ext
    info = json.loads(ok(pyprune("info", "--json", cwd=tmp_path)).stdout)
    assert info["pyprune_ext"] == pyprune_ext.__version__ and info["torch"] == torch.__version__
    assert info["cuda_kernels"] == pyprune_ext.build_info()["cuda"]
    assert "torch.ops.pyprune.taylor_channel_stats" in info["ops"]
    assert len(info["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    script = Path(sys.executable).with_name("pyprune")
    if script.exists():  # installed as a console script by pip
        text = ok(subprocess.run([str(script), "info"], capture_output=True, text=True, timeout=120)).stdout
        assert "CUDA kernels" in text and pyprune_ext.__version__ in text


def test_bench_prints_a_table(tmp_path):
    result = ok(pyprune("bench", "taylor", "--quick", "--device", "cpu", "--json-dir", tmp_path, cwd=tmp_path))
    assert "| " in result.stdout and "---:" in result.stdout
    assert json.loads((tmp_path / "taylor.json").read_text())


def test_lottery_pattern_makes_n_to_m_tickets_and_random_n_to_m_controls(tmp_path, capsys, digits):
    from pyprune_ext.lottery import MaskSet, is_nm, NMPattern

    out = tmp_path / "run"
    code = main(["lottery", "--levels", "2", "--iterations", "20", "--eval-every", "10", "--quiet", "--pattern", "2:4",
                 "--control", "random", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {(r["variant"], r["level"]): r for r in json.loads((out / "summary.json").read_text())["levels"]}
    for variant in ("ticket", "random"):
        assert rows[(variant, 1)]["remaining_pct"] == pytest.approx(50.0, abs=0.05)  # 2:4 everywhere (64, 300, 100)
        assert rows[(variant, 2)]["remaining_pct"] == pytest.approx(40.0, abs=0.1)  # then 20% unstructured
    for variant_dir in (out / "ticket", out / "random"):
        for level in (1, 2):
            masks = MaskSet.load(next(variant_dir.glob(f"**/level_{level:02d}/mask.pt")))
            assert all(is_nm(mask, NMPattern(2, 4)) for mask in masks.values())


# ----------------------------------------------------------------------- errors

def _user_error(argv, capsys) -> str:
    """Runs main(argv) in-process; it must fail with exit code 2 and one clear message."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["taylor", "--bogus"], "unrecognized arguments: --bogus"),
    (["taylor", "--target-flops", "1.5"], "--target-flops: expected a fraction kept, strictly between 0 and 1"),
    (["taylor", "--target-flops", "0"], "strictly between 0 and 1"),
    (["taylor", "--target-flops", "0.5", "--channels", "3"], "not allowed with argument"),
    (["taylor", "--epochs", "1", "--iterations", "5"], "not allowed with argument"),
    (["lottery", "--rate", "1.0"], "--rate: expected a fraction strictly between 0 and 1"),
    (["lottery", "--levels", "-1"], "--levels: expected an integer from 0 to 2147483647"),
    (["lottery", "--control", "bogus"], "--control takes a comma-separated list"),
    (["taylor", "--model", "alexnet"], "invalid choice: 'alexnet'"),
    (["taylor", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fmnist"],
     "--data-dir /nonexistent/fmnist: no such directory"),
    (["lottery", "--data-dir", "/tmp"], "--data-dir applies to fashion-mnist and mnist"),
    (["bench", "bogus"], "unknown benchmark 'bogus'"),
    ([], "usage: pyprune"),
])
def test_bad_options_exit_2_with_a_clear_message(argv, message, capsys):
    assert message in _user_error(argv, capsys)


def test_missing_dataset_says_what_was_looked_for_and_how_to_get_it(tmp_path, capsys):
    err = _user_error(["taylor", "--dataset", "fashion-mnist", "--data-dir", tmp_path], capsys)
    assert "Looked in" in err and "train-images-idx3-ubyte" in err and "To get the data" in err
    err = _user_error(["lottery", "--dataset", "mnist"], capsys)
    assert "--data-dir" in err


def test_cuda_that_cannot_work_is_refused(capsys):
    if torch.cuda.is_available():
        import pyprune_ext
        if pyprune_ext.build_info()["cuda"]:
            pytest.skip("CUDA is built and present here: --device cuda is valid")
    err = _user_error(["lottery", "--device", "cuda", "--levels", "0", "--iterations", "1"], capsys)
    assert "--device cuda" in err


def test_model_file_errors(tmp_path, capsys):
    (tmp_path / "models.py").write_text(textwrap.dedent("""
        from torch import nn
        def not_a_module():
            return 42
        def wrong_output():
            return nn.Flatten()
        def broken():
            raise RuntimeError("boom")
    """))
    (tmp_path / "syntax.py").write_text("def f(:\n")
    cases = {
        f"{tmp_path}/absent.py:f": "does not exist",
        f"{tmp_path}/models.py": "must look like path/to/file.py:function",
        f"{tmp_path}/models.py:nothing": "has no function named 'nothing'",
        f"{tmp_path}/models.py:not_a_module": "must return a torch.nn.Module",
        f"{tmp_path}/models.py:wrong_output": "class scores of shape (batch, 10)",
        f"{tmp_path}/models.py:broken": "RuntimeError: boom",
        f"{tmp_path}/syntax.py:f": "importing",
    }
    for spec, message in cases.items():
        err = _user_error(["lottery", "--model-file", spec, "--out", tmp_path / "out"], capsys)
        assert message in err, (spec, err)


def test_a_folder_with_another_run_is_refused(tmp_path, capsys):
    ok(pyprune("lottery", "--levels", 0, "--iterations", 5, "--control", "none", "--quiet", "--out", tmp_path,
               cwd=tmp_path))
    err = _user_error(["lottery", "--levels", 0, "--iterations", 5, "--control", "none", "--rate", 0.5,
                       "--quiet", "--out", tmp_path], capsys)
    assert "different config" in err and "rate" in err
    err = _user_error(["lottery", "--levels", 0, "--iterations", 5, "--control", "none", "--quiet",
                       "--export", tmp_path / "t.pt", "--export-level", 3, "--out", tmp_path], capsys)
    assert "--export-level 3" in err


def test_load_of_a_missing_or_wrong_state_dict(tmp_path, capsys):
    err = _user_error(["taylor", "--load", tmp_path / "absent.pt", "--out", tmp_path / "out"], capsys)
    assert "--load" in err and "absent.pt" in err
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    err = _user_error(["taylor", "--load", tmp_path / "other.pt", "--out", tmp_path / "out"], capsys)
    assert "--load" in err and "other.pt" in err
