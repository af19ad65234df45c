"""MaskSet: prunable selection, report, atomic save / validated load, apply, and
pruned weights staying exactly zero through Adam steps."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lottery_common import single_thread  # noqa: F401  (autouse fixture)
from pyprune_ext.lottery import MaskSet, io as lottery_io, prunable_parameters
from pyprune_ext.models import lenet300, resnet20
from pyprune_ext.nn import MaskedConv2d, MaskedLinear


def half_masks(model, seed=0, prunable=None):
    """Random masks keeping about half of each prunable tensor."""
    g = torch.Generator().manual_seed(seed)
    return MaskSet({n: torch.rand(p.shape, generator=g) < 0.5
                    for n, p in prunable_parameters(model, prunable).items()})


def test_default_prunable_are_linear_and_conv_weights():
    assert MaskSet.ones(lenet300(64, 10)).names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    names = MaskSet.ones(resnet20(10, 1)).names
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert all(n.endswith(".weight") and "bn" not in n for n in names)
    assert "layer2.0.shortcut.0.weight" in names  # the 1x1 shortcut conv is a conv


def test_prunable_patterns_and_errors():
    model = lenet300(64, 10)
    assert MaskSet.ones(model, ["fc1.*"]).names == ["fc1.weight", "fc1.bias"]
    assert MaskSet.ones(model, lambda n, m, p: n == "fc2.weight").names == ["fc2.weight"]
    with pytest.raises(ValueError, match="'fc9.weight' matches no parameter"):
        MaskSet.ones(model, ["fc9.weight"])


def test_remaining_and_report():
    model = lenet300(64, 10)
    masks = MaskSet.ones(model)
    fc1 = masks["fc1.weight"].clone()
    fc1[:150] = False  # half of fc1 (300 rows)
    masks = MaskSet({**masks, "fc1.weight": fc1})
    rem = masks.remaining()
    assert rem.per_layer == {"fc1.weight": 0.5, "fc2.weight": 1.0, "fc3.weight": 1.0}
    assert rem.size == 64 * 300 + 300 * 100 + 100 * 10
    assert rem.kept == rem.size - 150 * 64
    assert rem.total == pytest.approx(rem.kept / rem.size)
    report = masks.report()
    assert "fc1.weight" in report and "50.00%" in report and "total" in report.splitlines()[-1]


def test_constructor_rejects_non_bool():
    with pytest.raises(TypeError, match="bool"):
        MaskSet({"w": torch.ones(3)})


def test_save_load_round_trip(tmp_path):
    model = lenet300(64, 10)
    masks = half_masks(model)
    path = tmp_path / "sub" / "mask.pt"
    masks.save(path)
    loaded = MaskSet.load(path, model)
    assert loaded == masks and loaded.names == masks.names
    assert all(m.dtype == torch.bool for m in loaded.values())
    assert [p.name for p in path.parent.iterdir()] == ["mask.pt"]  # no temp file left


def test_load_validates_against_the_model(tmp_path):
    path = tmp_path / "mask.pt"
    MaskSet.ones(lenet300(64, 10)).save(path)
    with pytest.raises(ValueError, match=r"'fc1.weight' has shape \[300, 64\] but the parameter has shape \[300, 784\]"):
        MaskSet.load(path, lenet300(784, 10))
    with pytest.raises(ValueError, match="names no parameter"):
        MaskSet.load(path, nn.Sequential(nn.Linear(3, 3)))


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"fc1.weight": torch.ones(2, 2, dtype=torch.bool)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a MaskSet file"):
        MaskSet.load(tmp_path / "plain.pt")
    state = MaskSet({"w": torch.ones(2, dtype=torch.bool)}).state_dict()
    state["masks"]["w"] = torch.ones(2)
    torch.save(state, tmp_path / "float.pt")
    with pytest.raises(ValueError, match="must be a bool tensor"):
        MaskSet.load(tmp_path / "float.pt")
    torch.save({"format": object()}, tmp_path / "pickle.pt")  # needs the unsafe unpickler
    with pytest.raises(ValueError, match="weights_only"):
        MaskSet.load(tmp_path / "pickle.pt")
    with pytest.raises(FileNotFoundError):
        MaskSet.load(tmp_path / "absent.pt")


def test_crashing_writer_leaves_no_partial_file(tmp_path, monkeypatch):
    model = lenet300(64, 10)
    path = tmp_path / "mask.pt"
    old = MaskSet.ones(model)
    old.save(path)

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lottery_io.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        half_masks(model).save(path)
    with pytest.raises(OSError, match="disk full"):
        half_masks(model).save(tmp_path / "new.pt")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["mask.pt"]  # no new.pt, no temp file
    assert MaskSet.load(path, model) == old  # the previous content is intact


def test_apply_replaces_layers_and_zeroes_pruned(tmp_path):
    model = lenet300(64, 10)
    masks = half_masks(model)
    same = model.fc1.weight
    masks.apply(model)
    assert isinstance(model.fc1, MaskedLinear) and model.fc1.weight is same
    for name, param in model.named_parameters():
        if name in masks:
            assert bool((param[~masks[name]] == 0).all())
    conv = resnet20(10, 1)
    MaskSet.ones(conv).apply(conv)
    assert isinstance(conv.conv1, MaskedConv2d)


def test_pruned_weights_stay_zero_through_adam_steps():
    torch.manual_seed(0)
    model = lenet300(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    x, y = torch.randn(60, 64), torch.randint(0, 10, (60,))

    def steps(n):
        for _ in range(n):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    steps(3)  # Adam moments now non-zero everywhere: they would move pruned weights
    masks = half_masks(model, seed=1, prunable=["fc*.weight", "fc3.bias"])  # a bias too: the fallback path
    masks.apply(model)
    steps(5)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert bool((params[name][~mask] == 0).all()), name
        assert bool((params[name][mask] != 0).any()), name  # kept weights still train
