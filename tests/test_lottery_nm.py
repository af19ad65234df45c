"""N:M lottery tickets: the masks, their selection by magnitude against a plain loop,
the random N:M control, and a run whose masks stay N:M at every level and on resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from lottery_common import digits_run, single_thread, small_config  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import (LotteryConfig, MaskSet, NMPattern, control_masks, is_nm, nm_layers, nm_select,
                                 prune_by_magnitude, random_prune_nm)
from pyprune_ext.lottery.config import config_differences
from pyprune_ext.lottery.io import RunFileError
from pyprune_ext.lottery.nm import check_nm, groups_view, random_nm
from pyprune_ext.lottery.seeding import derive_seed

P24 = NMPattern(2, 4)


def test_patterns_parse_and_bad_ones_are_named():
    assert NMPattern.parse("2:4") == P24 and NMPattern.parse(" 1 : 8 ") == NMPattern(1, 8)
    assert str(P24) == "2:4" and P24.density == 0.5
    for bad in ("4:2", "0:4", "2-4", "2:4:8", "", "4:4"):
        with pytest.raises(ValueError, match="N:M|0 < N < M"):
            NMPattern.parse(bad)


def reference_select(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Plain loops: in each (row, kernel position, group of m inputs), keep the n kept weights
    of largest |w|, lower input index first on ties."""
    w, keep = weight.double(), mask.clone()
    out = torch.zeros_like(mask)
    spatial = [()] if w.dim() == 2 else list(itertools.product(range(w.shape[2]), range(w.shape[3])))
    for row in range(w.shape[0]):
        for pos in spatial:
            for start in range(0, w.shape[1], m):
                idx = [(row, i, *pos) for i in range(start, start + m)]
                candidates = [i for i in idx if keep[i]]
                candidates.sort(key=lambda i: (-abs(float(w[i])), i[1]))
                for i in candidates[:n]:
                    out[i] = True
    return out


@pytest.mark.parametrize("shape", [(6, 16), (5, 8, 3, 3), (3, 16, 1, 2)], ids=["linear", "conv3x3", "conv1x2"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_nm_select_equals_the_plain_loop(shape, n, m):
    g = torch.Generator().manual_seed(sum(shape) + n * 10 + m)
    weight = torch.randn(shape, generator=g)
    weight.view(-1)[::7] = weight.view(-1)[::7].round()  # ties in |w|
    weight.view(-1)[1::9] = -weight.view(-1)[::9][: weight.view(-1)[1::9].numel()]
    mask = torch.rand(shape, generator=g) > 0.25
    got = nm_select(weight, mask, NMPattern(n, m))
    assert torch.equal(got, reference_select(weight, mask, n, m))
    assert is_nm(got, NMPattern(n, m)) and not bool((got & ~mask).any())


def test_convolution_groups_run_over_input_channels_at_each_kernel_position():
    weight = torch.arange(2 * 8 * 2 * 2, dtype=torch.float32).view(2, 8, 2, 2)
    groups = groups_view(weight, P24)
    assert groups.shape == (2, 2, 2, 2, 4)
    assert torch.equal(groups[1, 0, 1, 1], weight[1, 4:8, 0, 1])


def test_a_full_level_keeps_exactly_n_of_every_m_and_is_n_to_m_afterwards():
    weight = torch.randn(10, 20, generator=torch.Generator().manual_seed(0))
    mask = nm_select(weight, torch.ones_like(weight, dtype=torch.bool), P24)
    assert bool((groups_view(mask, P24).sum(-1) == 2).all())
    broken = mask.clone()
    broken[3, :4] = True
    with pytest.raises(ValueError, match="fc.weight is not 2:4: a group of 4 inputs keeps 4 weights"):
        check_nm({"fc.weight": broken}, P24, ["fc.weight"])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        groups_view(torch.ones(3, 6), P24)
    with pytest.raises(ValueError, match="1-D tensor"):
        groups_view(torch.ones(8), P24)
    weight = torch.randn(2, 4)
    weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        nm_select(weight, torch.ones(2, 4, dtype=torch.bool), P24)


class SmallCNN(nn.Module):
    """A first conv with one input channel (no N:M form), then layers with one."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 12)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).flatten(1))


def test_prune_by_magnitude_with_a_pattern_leaves_incompatible_layers_dense_or_refuses_them():
    torch.manual_seed(0)
    model = SmallCNN()
    masks = MaskSet.ones(model)
    compatible, problems = nm_layers(masks, "2:4")
    assert compatible == ["conv2.weight", "fc.weight"]
    assert problems == {"conv1.weight": "its input dim (1) is not a multiple of 4"}
    nm = prune_by_magnitude(model, masks, pattern="2:4")
    assert bool(nm["conv1.weight"].all())
    for name in compatible:
        assert nm[name].float().mean() == 0.5 and is_nm(nm[name], P24)
        assert torch.equal(nm[name], nm_select(dict(model.named_parameters())[name], masks[name], P24))
    with pytest.raises(ValueError, match=r"conv1.weight has no 2:4 form: its input dim \(1\)"):
        prune_by_magnitude(model, masks, pattern="2:4", incompatible="error")
    with pytest.raises(ValueError, match="incompatible must be one of"):
        prune_by_magnitude(model, masks, pattern="2:4", incompatible="skip")
    later = prune_by_magnitude(model, nm, 0.2)  # unstructured on top keeps the pattern
    assert all(is_nm(later[n], P24) for n in compatible)
    assert int(later["fc.weight"].sum()) == int(nm["fc.weight"].sum()) - round(0.2 * int(nm["fc.weight"].sum()))


def test_random_nm_control_is_n_to_m_with_the_ticket_counts_and_seeded():
    torch.manual_seed(0)
    model = SmallCNN()
    ticket = prune_by_magnitude(model, prune_by_magnitude(model, MaskSet.ones(model), pattern="2:4"), 0.3)
    first = control_masks(ticket, "random", seed=5, level=2, pattern="2:4")
    again = random_prune_nm(ticket, "2:4", seed=derive_seed(5, "random-prune", 2))
    for name in ticket:
        assert int(first[name].sum()) == int(ticket[name].sum())
        assert torch.equal(first[name], again[name])
    assert all(is_nm(first[n], P24) for n in ("conv2.weight", "fc.weight"))
    assert not torch.equal(first["fc.weight"], ticket["fc.weight"])
    with pytest.raises(ValueError, match="more than 2:4 allows"):
        random_nm(torch.ones(2, 8, dtype=torch.bool), P24, torch.Generator().manual_seed(0))


def test_lottery_run_with_a_pattern_stays_n_to_m_and_a_broken_saved_mask_is_named(tmp_path):
    config = small_config(levels=2, pattern="2:4")
    results = digits_run(tmp_path / "run", config).run()
    assert [round(r["remaining"], 3) for r in results] == [1.0, 0.5, pytest.approx(0.4, abs=0.01)]
    masks = {level: MaskSet.load(tmp_path / "run" / f"level_{level:02d}" / "mask.pt") for level in (1, 2)}
    for level, mask in masks.items():
        check_nm(dict(mask.items()), P24, list(mask))
    assert bool((groups_view(masks[1]["fc1.weight"], P24).sum(-1) == 2).all())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pattern"] == "2:4"

    broken = dict(masks[2].items())
    broken["fc2.weight"] = torch.ones_like(broken["fc2.weight"])
    (tmp_path / "run" / "level_02" / "done").unlink()
    MaskSet(broken).save(tmp_path / "run" / "level_02" / "mask.pt")
    with pytest.raises(RunFileError, match=r"level 2's mask: fc2.weight is not 2:4.*delete"):
        digits_run(tmp_path / "run", config).run()


def test_config_checks_the_pattern_and_old_runs_without_one_still_match():
    assert LotteryConfig(iterations=10, pattern=" 2:4").pattern == "2:4"
    with pytest.raises(ValueError, match="N:M"):
        LotteryConfig(iterations=10, pattern="2/4")
    with pytest.raises(ValueError, match="pattern_incompatible"):
        LotteryConfig(iterations=10, pattern="2:4", pattern_incompatible="skip")
    current = LotteryConfig(iterations=10).to_dict()
    saved = {k: v for k, v in current.items() if k not in ("pattern", "pattern_incompatible")}
    assert config_differences(saved, current) == []
    assert config_differences(saved, LotteryConfig(iterations=10, pattern="2:4").to_dict()) == [
        "pattern: saved None, now '2:4'"]


def test_the_2to4_ticket_benchmark_runs_and_reports_its_densities(tmp_path, capsys):
    from benchmarks import lottery_nm

    lottery_nm.main(["--quick", "--no-progress", "--json", str(tmp_path / "nm.json"), "--out", str(tmp_path / "runs")])
    assert "2:4 tickets vs unstructured tickets vs random 2:4 masks" in capsys.readouterr().out
    rows = json.loads((tmp_path / "nm.json").read_text())["models"]["lenet300"]["rows"]
    assert rows[0]["target"] == "dense" and len(rows[0]["dense_test_accuracy"]) == 1
    half = rows[1]
    assert half["2:4"]["remaining_pct"] == half["2:4 random"]["remaining_pct"] == 50.0
    assert half["unstructured"]["remaining_pct"] is None  # level 3 is beyond --quick's 2 levels
    for variant in ("2:4", "2:4 random"):
        masks = MaskSet.load(tmp_path / "runs" / "lenet300" / "seed0" / variant.replace(" ", "_").replace(":", "to")
                             / "level_01" / "mask.pt")
        assert all(is_nm(m, P24) for m in masks.values())
