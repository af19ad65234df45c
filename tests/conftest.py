"""Shared fixtures: every op test runs on the CPU, and on CUDA when a GPU is present."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device present")
    if request.param == "cuda":
        import pyprune_ext
        if not pyprune_ext.build_info()["cuda"]:
            pytest.fail("a GPU is present but pyprune_ext was built without CUDA kernels")
    return request.param
