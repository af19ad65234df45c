"""LotteryRun end to end on digits: levels, files, metrics, summary, controls,
rerun without recomputation, config mismatch, late rewinding."""

import csv
import json
import os
import re
import shutil

import pytest
import torch

from lottery_common import digits_run, single_thread, small_config  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import LotteryConfig, MaskSet, RewindPoint, classification_step, count_to_prune
from pyprune_ext.lottery.io import RunFileError, load_tensors
from pyprune_ext.lottery.training import NonFiniteLossError

LEVEL_FILES = {"mask.pt", "rewind.pt", "final.pt", "metrics.json", "done"}


@pytest.fixture(scope="module")
def ticket_run(tmp_path_factory):
    """Levels 0..3 (dense, then three prunings at 20%, output 10%)."""
    run_dir = tmp_path_factory.mktemp("ticket")
    results = digits_run(run_dir, small_config(levels=3)).run()
    return run_dir, results


def test_levels_files_and_accuracy(ticket_run):
    run_dir, results = ticket_run
    assert [m["level"] for m in results] == [0, 1, 2, 3]
    for m in results:
        assert set(os.listdir(run_dir / f"level_{m['level']:02d}")) == LEVEL_FILES  # checkpoint removed
        stop = m["early_stop"]
        assert stop["iteration"] in {e["iteration"] for e in m["evaluations"]}
        assert stop["val_loss"] == min(e["val_loss"] for e in m["evaluations"])
        assert stop["test_accuracy"] > 0.5 and m["final"]["test_accuracy"] > 0.5  # chance: 0.1
        assert [e["iteration"] for e in m["evaluations"]] == [20, 40, 60]
        assert m["wall_time_s"] > 0 and m["step_time_ms"] > 0
    assert {"config.json", "rewind_point.pt", "summary.csv", "summary.json"} <= set(os.listdir(run_dir))
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]


def test_masks_follow_the_schedule_and_weights_stay_pruned(ticket_run):
    run_dir, results = ticket_run
    expected = None
    for level in range(4):
        masks = MaskSet.load(run_dir / f"level_{level:02d}" / "mask.pt")
        kept = {n: k for n, (k, _) in masks.counts().items()}
        if expected is None:
            expected = {n: s for n, (_, s) in masks.counts().items()}
        assert kept == expected
        expected = {n: k - count_to_prune(0.1 if n == "fc3.weight" else 0.2, k) for n, k in kept.items()}
        final = load_tensors(run_dir / f"level_{level:02d}" / "final.pt")
        for name, mask in masks.items():
            assert bool((final[name][~mask] == 0).all())
            assert torch.equal(final[name.replace("weight", "mask")], mask)
        assert results[level]["remaining"] == pytest.approx(masks.remaining().total)


def test_each_level_starts_from_the_masked_initialisation(ticket_run):
    run_dir, _ = ticket_run
    init = load_tensors(run_dir / "level_00" / "rewind.pt")
    point = RewindPoint.load(run_dir / "rewind_point.pt")
    assert point.iteration == 0
    assert all(torch.equal(point.model_state[k], v) for k, v in init.items())
    for level in (1, 3):
        start = load_tensors(run_dir / f"level_{level:02d}" / "rewind.pt")
        masks = MaskSet.load(run_dir / f"level_{level:02d}" / "mask.pt")
        for name, value in init.items():
            expected = value * masks[name] if name in masks else value
            assert torch.equal(start[name], expected), (level, name)


def test_summary_csv_and_json(ticket_run):
    run_dir, results = ticket_run
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["level"]) for r in rows] == [0, 1, 2, 3]
    remaining = [float(r["remaining_pct"]) for r in rows]
    assert remaining[0] == 100.0 and remaining == sorted(remaining, reverse=True)
    assert float(rows[1]["remaining_pct[fc1.weight]"]) == 80.0
    assert float(rows[1]["remaining_pct[fc3.weight]"]) == 90.0
    for row, m in zip(rows, results):
        assert int(row["early_stop_iteration"]) == m["early_stop"]["iteration"]
        assert float(row["early_stop_test_accuracy"]) == pytest.approx(m["early_stop"]["test_accuracy"])
        assert float(row["wall_time_s"]) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["levels"] == 3 and len(summary["levels"]) == 4


def test_rerun_skips_finished_levels_and_extends(ticket_run, tmp_path):
    run_dir, results = ticket_run
    calls = []

    def counting_step(model, batch, optimizer):
        calls.append(1)
        return classification_step(model, batch, optimizer)

    mtime = os.stat(run_dir / "level_02" / "final.pt").st_mtime_ns
    again = digits_run(run_dir, small_config(levels=3), train_step=counting_step).run()
    assert calls == [] and again == json.loads(json.dumps(results))
    assert os.stat(run_dir / "level_02" / "final.pt").st_mtime_ns == mtime
    # More levels extend the run (on a copy: the fixture is shared): only level 4 trains.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    extended = digits_run(copy, small_config(levels=4), train_step=counting_step).run()
    assert len(calls) == 60 and [m["level"] for m in extended] == [0, 1, 2, 3, 4]
    assert json.loads((copy / "config.json").read_text())["levels"] == 4


def test_config_mismatch_is_an_error(ticket_run):
    run_dir, _ = ticket_run
    with pytest.raises(ValueError, match=r"different config(.|\n)*rate: saved 0.2, now 0.3"):
        digits_run(run_dir, small_config(levels=3, rate=0.3)).run()
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        digits_run(run_dir, small_config(levels=3, seed=1)).run()


def test_controls_on_the_ticket_run(ticket_run, tmp_path):
    run_dir, _ = ticket_run
    reinit = digits_run(tmp_path / "reinit", small_config(levels=3, control="reinit",
                                                          control_source=str(run_dir))).run()
    random = digits_run(tmp_path / "random", small_config(levels=3, control="random",
                                                          control_source=str(run_dir))).run()
    assert [m["level"] for m in reinit] == [1, 2, 3] == [m["level"] for m in random]
    ticket_init = load_tensors(run_dir / "level_00" / "rewind.pt")
    for level in (1, 3):
        ticket_mask = MaskSet.load(run_dir / f"level_{level:02d}" / "mask.pt")
        reinit_mask = MaskSet.load(tmp_path / "reinit" / f"level_{level:02d}" / "mask.pt")
        random_mask = MaskSet.load(tmp_path / "random" / f"level_{level:02d}" / "mask.pt")
        assert reinit_mask == ticket_mask
        assert random_mask.counts() == ticket_mask.counts() and random_mask != ticket_mask
        reinit_start = load_tensors(tmp_path / "reinit" / f"level_{level:02d}" / "rewind.pt")
        random_start = load_tensors(tmp_path / "random" / f"level_{level:02d}" / "rewind.pt")
        w, m = ticket_init["fc1.weight"], ticket_mask["fc1.weight"]
        assert not torch.equal(reinit_start["fc1.weight"][m], w[m])  # fresh initialisation
        rm = random_mask["fc1.weight"]
        assert torch.equal(random_start["fc1.weight"], w * rm)  # original initialisation, random mask
    for m in reinit + random:
        assert m["early_stop"]["test_accuracy"] > 0.5
    with pytest.raises(RuntimeError, match="has not finished level 4"):
        digits_run(tmp_path / "too_far", small_config(levels=6, control="reinit", control_source=str(run_dir))).run()
    with pytest.raises(ValueError, match="recipe differs(.|\n)*iterations"):
        digits_run(tmp_path / "other", small_config(levels=1, iterations=40, control="random",
                                                    control_source=str(run_dir))).run()


def test_late_rewinding_with_optimizer_state(tmp_path):
    k = 25
    config = small_config(levels=1, rewind_iteration=k, rewind_optimizer=True, lr_milestones=[40])
    results = digits_run(tmp_path, config).run()
    point = RewindPoint.load(tmp_path / "rewind_point.pt")
    assert point.iteration == k and point.optimizer_state is not None
    assert point.data_state["epoch"] * 21 + point.data_state["position"] == k  # 1257 / 60 -> 21 batches
    assert results[1]["start_iteration"] == k
    assert [e["iteration"] for e in results[1]["evaluations"]] == [40, 60]
    level0_at_k = load_tensors(tmp_path / "level_00" / "rewind.pt")
    assert all(torch.equal(point.model_state[n], v) for n, v in level0_at_k.items())
    masks = MaskSet.load(tmp_path / "level_01" / "mask.pt")
    start = load_tensors(tmp_path / "level_01" / "rewind.pt")
    assert torch.equal(start["fc2.weight"], level0_at_k["fc2.weight"] * masks["fc2.weight"])


def test_done_level_with_missing_file_is_an_error(tmp_path):
    config = small_config(levels=0, iterations=20)
    digits_run(tmp_path, config).run()
    (tmp_path / "level_00" / "final.pt").unlink()
    with pytest.raises(RunFileError, match=r"marked done but lacks \['final.pt'\]"):
        digits_run(tmp_path, config).run()


@pytest.mark.parametrize("name, content, message", [
    ("config.json", b"[]", "expected a JSON object, the file holds an array"),
    ("config.json", b"null", "expected a JSON object, the file holds null"),
    ("config.json", b"{}", "lacks 'levels', 'control'"),
    ("config.json", b"\xff{}", "not UTF-8"),
    ("level_00/metrics.json", b"{}", "lacks 'level'"),
    ("level_00/metrics.json", b'{"level": 0, "remaining": 1, "remaining_per_layer": 3, "early_stop": null, '
                              b'"final": null, "wall_time_s": 1, "step_time_ms": 1}', "not a level's metrics"),
])
def test_damaged_run_files_are_named(tmp_path, name, content, message):
    config = small_config(levels=0, iterations=20)
    digits_run(tmp_path, config).run()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RunFileError, match=message) as caught:
        digits_run(tmp_path, config).run()
    assert str(tmp_path / name) in str(caught.value)


def test_a_diverging_training_stops_before_saving(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"ticket level 0: the training loss became (nan|inf) at "
                                                 r"iteration (\d+)") as caught:
        digits_run(tmp_path, small_config(levels=1, iterations=20, lr=1e30, checkpoint_every=1)).run()
    diverged_at = int(re.search(r"iteration (\d+)", str(caught.value)).group(1))
    assert not (tmp_path / "level_00" / "done").exists()
    if diverged_at > 1:  # the last checkpoint is from before the step that diverged
        assert load_tensors(tmp_path / "level_00" / "checkpoint.pt")["iteration"] == diverged_at - 1


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of iterations and epochs"):
        LotteryConfig(iterations=10, epochs=1)
    with pytest.raises(ValueError, match="needs control_source"):
        LotteryConfig(iterations=10, control="random")
    with pytest.raises(ValueError, match="rewind_iteration=10 must be below"):
        LotteryConfig(iterations=10, rewind_iteration=10)
    assert LotteryConfig.from_dict(LotteryConfig(epochs=2).to_dict()) == LotteryConfig(epochs=2)


def test_a_moved_ticket_run_and_control_resume(tmp_path):
    """The path is not part of what a run is: a ticket run and its control moved
    together resume at the new place without training anything again."""
    ticket = small_config(levels=1, iterations=20)

    def control(source):
        return small_config(levels=1, iterations=20, control="random", control_source=str(source))

    digits_run(tmp_path / "old" / "ticket", ticket).run()
    digits_run(tmp_path / "old" / "random", control(tmp_path / "old" / "ticket")).run()
    assert json.loads((tmp_path / "old" / "random" / "config.json").read_text())["control_source"] == \
        os.path.join("..", "ticket")  # stored relative to the run directory
    shutil.move(tmp_path / "old", tmp_path / "new")
    calls = []

    def counting_step(model, batch, optimizer):
        calls.append(1)
        return classification_step(model, batch, optimizer)

    new = tmp_path / "new"
    digits_run(new / "ticket", ticket, train_step=counting_step).run()
    results = digits_run(new / "random", control(new / "ticket"), train_step=counting_step).run()
    assert calls == [] and [m["level"] for m in results] == [1]
