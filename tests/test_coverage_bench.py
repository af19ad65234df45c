"""The model-zoo coverage benchmark (pyprune_ext.bench.coverage): the extra cases and
resnet18 at a small input, through the same measuring code the child process runs,
one case through a real child, the table, and `pyprune bench all` leaving it out."""

import json
import math

import pytest
import torch
from torch import nn

from pyprune_ext import bench
from pyprune_ext.bench import coverage
from pyprune_ext.graph import registered_layers

SMALL = 32  # input side: the extra cases and resnet18 run in well under a second here

OURS_OK_FIELDS = {"status", "analysis_s", "groups", "prunable_groups", "exact_prunable_groups", "channels",
                  "prunable_channels", "prunable_share", "prunable_unit_share", "refusals", "warnings",
                  "params_kept", "macs_kept", "removed_vs_masked", "removed_equals_masked"}
TP_OK_FIELDS = {"status", "version", "analysis_s", "prune_s", "params_kept", "macs_kept", "output_shape_ok",
                "output_shape"}


@pytest.fixture(scope="module")
def extra_records():
    return {name: coverage.measure(name, size=SMALL) for name in coverage.EXTRAS}


def check_ours_ok(record):
    ours = record["ours"]
    assert ours["status"] == "ok", ours
    assert OURS_OK_FIELDS <= set(ours)
    assert 0 < ours["prunable_share"] <= 1 and 0 < ours["prunable_channels"] <= ours["channels"]
    assert ours["removed_equals_masked"] and ours["removed_vs_masked"] <= coverage.EQUAL_TOLERANCE
    # 30% of the channels go: the layers shrink, never to nothing
    assert 0 < ours["params_kept"] < 1 and 0 < ours["macs_kept"] < 1
    assert ours["analysis_s"] > 0


@pytest.mark.parametrize("name", list(coverage.EXTRAS))
def test_extra_case_removed_equals_masked(extra_records, name):
    record = extra_records[name]
    assert record["input_shape"] == [1, 3, SMALL, SMALL]
    assert record["output_shape"] == [1, coverage.EXTRA_CLASSES] and record["params"] > 0
    check_ours_ok(record)


def test_chunk_gate_channels_are_prunable(extra_records):
    ours = extra_records["extra_chunk"]["ours"]
    # conv1's 32 outputs are split by torch.chunk into a value and a gate pruned alike; the gate's
    # sigmoid maps 0 to 0.5, but the product with the (zeroed) value is 0 again, so masking stays
    # exact: conv1's 32 and conv2's 32 are prunable, only the classifier's outputs are not
    assert ours["prunable_channels"] == 32 + 32
    assert ours["channels"] == 32 + 32 + coverage.EXTRA_CLASSES
    assert [r["reason"] for r in ours["refusals"]] == ["feeds the model output"]
    assert ours["removed_equals_masked"]


def test_share_counts_grouped_units_as_their_channels(extra_records):
    ours = extra_records["extra_groupnorm"]["ours"]
    # conv1 16 + conv2 32 channels prunable (in units of 4), the classifier's 10 not
    assert (ours["prunable_channels"], ours["channels"]) == (48, 58)
    assert ours["prunable_share"] == pytest.approx(48 / 58)


def test_user_layer_is_registered_only_while_its_case_runs(extra_records):
    assert extra_records["extra_user_layer"]["ours"]["status"] == "ok"
    assert coverage.ChannelScale not in registered_layers()


def test_unregistered_user_layer_is_refused_by_name():
    """Without its registration the same model's scaled channels are not prunable."""
    model = coverage.UserLayerNet().eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    ours = coverage.measure_ours(model, x, coverage.count_cost(model, x))
    assert any("scale.gamma" in r["reason"] for r in ours["refusals"])
    assert ours["prunable_channels"] < ours["channels"] - coverage.EXTRA_CLASSES


def test_refused_model_reports_the_first_reason():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()  # its only layer feeds the output
    x = torch.randn(1, 3, 8, 8)
    ours = coverage.measure_ours(model, x, coverage.count_cost(model, x))
    assert ours["status"] == "refused" and ours["reason"] == "feeds the model output"
    assert ours["prunable_share"] == 0 and "params_kept" not in ours


def test_resnet18_small_input():
    pytest.importorskip("torchvision")
    record = coverage.measure("resnet18", size=SMALL)
    check_ours_ok(record)
    assert record["output_shape"] == [1, 1000]
    assert record["ours"]["prunable_share"] > 0.5


@pytest.mark.skipif(coverage.torch_pruning_version() is None, reason="torch_pruning is not installed")
def test_torch_pruning_side(extra_records):
    for name, record in extra_records.items():
        tp = record["tp"]
        assert tp["status"] in ("ok", "wrong output shape", "error"), (name, tp)
        if tp["status"] == "ok":
            assert TP_OK_FIELDS <= set(tp)
            assert tp["output_shape"] == record["output_shape"]
            assert 0 < tp["params_kept"] < 1 and 0 < tp["macs_kept"] < 1
    # a plain chain of convs: Torch-Pruning prunes it too
    assert extra_records["extra_conv_transpose"]["tp"]["status"] == "ok"


def test_torch_pruning_not_installed_is_reported(monkeypatch, extra_records):
    monkeypatch.setattr(coverage, "torch_pruning_version", lambda: None)
    model = coverage.GroupNormNet().eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    tp = coverage.measure_torch_pruning(model, x, coverage.count_cost(model, x), [1, 10])
    assert tp == {"status": "not installed"}
    row = coverage.table_row({"model": "m", "ours": extra_records["extra_groupnorm"]["ours"], "tp": tp})
    assert row[7] == "not installed" and row[8:] == ["-", "-", "-"]


def test_child_process_reports_json_lines():
    record = coverage.run_case("extra_grouped_conv", timeout=120, size=SMALL, device="cpu")
    check_ours_ok(record)
    assert record["output_shape"] == [1, coverage.EXTRA_CLASSES] and record["wall_s"] > 0
    json.dumps(record)  # plain data all the way down
    if coverage.torch_pruning_version() is not None:
        assert record["tp"]["status"] == "ok"
    else:
        assert record["tp"]["status"] == "not installed"


def test_child_that_does_not_finish_is_a_timeout():
    # no child can import torch in 10 ms
    record = coverage.run_case("extra_chunk", timeout=0.01, size=SMALL, device="cpu")
    assert record["ours"]["status"] == record["tp"]["status"] == "timeout"
    assert "0.01 s" in record["ours"]["error"]


def test_child_failure_names_the_signal_or_the_last_error_line():
    assert coverage.child_failure(-9, "W1203 a log line\n") == "child killed by SIGKILL (out of memory?)"
    assert coverage.child_failure(1, "log\nValueError: bad\n") == "child exited with code 1: ValueError: bad"


def test_parse_child_output_ignores_other_lines():
    out = "Torch-Pruning says hello\n" + coverage.CHILD_MARKER + json.dumps({"part": "ours", "status": "ok"})
    assert coverage.parse_child_output(out) == {"ours": {"status": "ok"}}


def test_table_and_json_report(tmp_path, capsys, monkeypatch, extra_records):
    monkeypatch.setattr(coverage, "run_case", lambda name, *a, **k: {**extra_records[name], "wall_s": 1.0})
    out = tmp_path / "coverage.json"
    coverage.main(["--models", "extra_chunk,extra_groupnorm", "--json", str(out)], prog="pyprune bench coverage")
    text = capsys.readouterr().out
    assert "| " + " | ".join(coverage.HEADERS) + " |" in text
    assert "| extra_chunk | ok |" in text and "prunable share = " in text
    report = json.loads(out.read_text())
    assert report["machine"] and report["prune_ratio"] == 0.3 and report["share_definition"]
    assert [r["model"] for r in report["results"]] == ["extra_chunk", "extra_groupnorm"]
    assert math.isclose(report["results"][1]["ours"]["prunable_share"], 48 / 58)


def test_status_cell_escapes_pipes_and_shortens():
    cell = coverage._status({"status": "refused", "reason": "a | b " + "x" * 200})
    assert cell.startswith("refused: a \\| b") and cell.endswith("...") and len(cell) < 80


def test_select_cases():
    assert coverage.select_cases(None, True)[-len(coverage.EXTRAS):] == list(coverage.EXTRAS)
    assert coverage.select_cases("extra_chunk, extra_groupnorm", False) == ["extra_chunk", "extra_groupnorm"]
    with pytest.raises(ValueError, match="unknown cases nope"):
        coverage.select_cases("extra_chunk,nope", False)
    with pytest.raises(ValueError, match="not both"):
        coverage.select_cases("extra_chunk", True)


def test_bench_all_leaves_coverage_out():
    assert "coverage" in bench.NAMES and "coverage" in bench.EXCLUDED_FROM_ALL
    assert "coverage" not in bench.IN_ALL
    assert set(bench.IN_ALL) | set(bench.EXCLUDED_FROM_ALL) == set(bench.NAMES)


def test_cli_bench_all_does_not_run_coverage(monkeypatch, capsys):
    from pyprune_ext.cli.main import main
    ran = []
    monkeypatch.setattr(bench, "run", lambda name, argv: ran.append((name, argv)))
    assert main(["bench", "all", "--device", "cpu", "--quick"]) == 0
    assert [name for name, _ in ran] == list(bench.IN_ALL)
    assert "not run: coverage" in capsys.readouterr().out


def test_cli_forwards_coverage_options(monkeypatch):
    from pyprune_ext.cli.main import main
    ran = []
    monkeypatch.setattr(bench, "run", lambda name, argv: ran.append((name, argv)))
    assert main(["bench", "coverage", "--device", "cpu", "--models", "extra_chunk", "--timeout", "30"]) == 0
    assert ran == [("coverage", ["--device", "cpu", "--models", "extra_chunk", "--timeout", "30.0"])]


@pytest.mark.parametrize("argv, message", [
    (["bench", "coverage", "--models", "nope"], "--models: unknown cases nope"),
    (["bench", "taylor", "--models", "resnet18"], "--models applies to coverage only"),
    (["bench", "all", "--timeout", "5"], "--timeout applies to coverage only"),
    (["bench", "coverage", "--timeout", "0"], "--timeout: expected a finite number > 0"),
])
def test_cli_bad_coverage_options_fail_in_one_line(argv, message, capsys):
    from pyprune_ext.cli.main import main
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_zero_initialised_layers_are_redrawn():
    """A zero classifier (ViT's) would make every output zero and removed == masked trivial."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    nn.init.zeros_(model[1].weight)
    before = model[0].weight.clone()
    coverage.redraw_zero_weights(model)
    assert model[1].weight.abs().sum() > 0 and torch.equal(model[0].weight, before)
