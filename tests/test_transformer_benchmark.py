"""The transformer pruning benchmark runs end to end on tiny settings: every criterion
reaches the MACs target, the table and JSON hold what the docs table reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyprune_ext import data

FASHION_ROOT = Path(data.DEFAULT_ROOTS["fashion-mnist"])


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_quick_run_reaches_the_target_for_every_criterion(tmp_path, capsys):
    from benchmarks import transformer_pruning

    out = tmp_path / "vit.json"
    transformer_pruning.main(["--quick", "--criteria", "fo_gate", "l2", "random", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dense", "dense_control", "fo_gate", "l2", "random"}
    longest = max(results[c]["pruning_epochs"] for c in ("fo_gate", "l2", "random"))
    assert results["dense_control"]["extra_epochs"] == longest
    for criterion in ("fo_gate", "l2", "random"):
        r = results[criterion]
        assert r["flops_kept"] <= 0.5 and 0 < r["accuracy_final"] <= 1
        assert r["heads"] <= 16 and r["neurons"] <= 512 and (r["heads"] < 16 or r["neurons"] < 512)
    assert "| fo_gate |" in capsys.readouterr().out
