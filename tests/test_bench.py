"""The installed benchmark registry (pyprune_ext.bench) that `pyprune bench` calls.
Only the registry and argument handling: running a benchmark takes too long here."""

import importlib

import pytest
import torch

from pyprune_ext import bench


def test_registry_names():
    assert bench.NAMES == ("taylor", "masked", "magnitude", "coverage", "semi_structured")
    assert all(isinstance(text, str) and text for text in bench.BENCHMARKS.values())


@pytest.mark.parametrize("name", bench.NAMES)
def test_each_benchmark_module_has_main(name):
    module = importlib.import_module(f"pyprune_ext.bench.{name}")
    assert callable(module.main)


def test_unknown_name_names_the_choices():
    with pytest.raises(ValueError, match="taylor, masked, magnitude"):
        bench.run("nope", [])


@pytest.mark.parametrize("name", bench.NAMES)
def test_help_exits_cleanly_under_the_cli_name(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.run(name, ["--help"])
    assert exit_info.value.code == 0
    assert f"usage: pyprune bench {name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["taylor", "masked", "magnitude", "coverage"])
def test_repository_shims_point_at_the_package(name):
    shim = importlib.import_module(f"benchmarks.{name}")
    assert shim.main is importlib.import_module(f"pyprune_ext.bench.{name}").main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_semi_structured_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU with 2:4 sparse tensor cores"):
        bench.run("semi_structured", [])
    with pytest.raises(SystemExit):
        bench.run("semi_structured", ["--batches", "many"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):  # what `pyprune bench semi_structured --device cpu` passes
        bench.run("semi_structured", ["--device", "cpu", "--quick", "--json", "unused.json"])
