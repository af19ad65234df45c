"""The transformer pruning benchmark runs end to end on tiny settings: every criterion
reaches the MACs target, the table and JSON hold what the docs table reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pyprune_ext import data

FASHION_ROOT = Path(data.DEFAULT_ROOTS["fashion-mnist"])


def check_results(results, criteria, metric, dense_units):
    assert set(results) == {"dense", "dense_control", *criteria}
    longest = max(results[c]["epochs"] for c in criteria)
    assert results["dense_control"]["extra_epochs"] == longest
    for criterion in criteria:
        r = results[criterion]
        if criterion == "tp_taylor":  # it steps by channel ratios: it may stop short when its steps run out
            assert r["flops_kept"] < 1 and (r["target_reached"] or r["steps"] == 12)
            assert r["target_reached"] == (r["flops_kept"] <= 0.5)
        else:
            assert r["flops_kept"] <= 0.5
        assert all(r[k] <= dense_units[k] for k in dense_units) and any(r[k] < dense_units[k] for k in dense_units)


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_quick_vit_run_reaches_the_target_for_every_criterion(tmp_path, capsys):
    from benchmarks import transformer_pruning

    out = tmp_path / "vit.json"
    criteria = ["fo_gate/macs", "l2", "random", "tp_taylor"]
    transformer_pruning.main(["vit", "--quick", "--criteria", *criteria, "--json", str(out)])
    results = json.loads(out.read_text())["results"]["vit"]
    if transformer_pruning.torch_pruning_version() is None:
        criteria.remove("tp_taylor")
    check_results(results, criteria, "accuracy", {"heads": 16, "neurons": 512, "width": 64})
    assert all(0 < results[c]["accuracy_final"] <= 1 for c in criteria)
    assert "| fo_gate/macs |" in capsys.readouterr().out


def test_quick_gpt_run_reaches_the_target_and_reports_perplexity(tmp_path, capsys):
    from benchmarks import transformer_pruning

    out = tmp_path / "gpt.json"
    criteria = ["so_fisher/macs", "tp_taylor"]
    transformer_pruning.main(["gpt", "--quick", "--criteria", *criteria, "--json", str(out)])
    results = json.loads(out.read_text())["results"]["gpt"]
    if transformer_pruning.torch_pruning_version() is None:
        criteria.remove("tp_taylor")
    check_results(results, criteria, "perplexity", {"heads": 16, "neurons": 2048, "width": 128})
    assert all(1 < results[c]["perplexity_final"] for c in criteria)
    assert 1 < results["dense"]["perplexity"] and 1 < results["dense_control"]["perplexity"]
    assert "perplexity final" in capsys.readouterr().out


def test_criteria_are_checked_before_anything_runs():
    from benchmarks import transformer_pruning

    assert transformer_pruning.parse_criterion("so_fisher/macs") == ("so_fisher", "macs")
    assert transformer_pruning.parse_criterion("random") == ("random", None)
    for bad in ("fo_magic", "fo_gate/flops", "tp_taylor/macs"):
        with pytest.raises(argparse.ArgumentTypeError):
            transformer_pruning.parse_criterion(bad)
    with pytest.raises(SystemExit):
        transformer_pruning.main(["vit", "--criteria", "fo_gate/latency"])
