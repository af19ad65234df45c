"""Shared fixtures: every op test runs on the CPU, and on CUDA when a GPU is present.

CUDA tests carry the ``cuda`` marker: the ``cuda`` parameter of the ``device``
fixture has it, and tests that need a GPU for another reason (a device mismatch,
a mixed-device model) are marked ``@pytest.mark.cuda`` by hand. So ``-m cuda``
selects them all, and a run can count them: with ``--outcomes-json FILE`` the
session writes ``{nodeid: {"cuda": bool, "outcome": ..., "skip_reason": ...}}``
(outcome "passed", "failed" or "skipped"; "collected" under ``--collect-only``).
scripts/gpu_check.sh uses that to fail when a CUDA test skips on a machine with
a GPU. Without the option nothing changes.
"""

import json
import os
import tempfile

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device present")
    if request.param == "cuda":
        import pyprune_ext
        if not pyprune_ext.build_info()["cuda"]:
            pytest.fail("a GPU is present but pyprune_ext was built without CUDA kernels")
    return request.param


def pytest_addoption(parser):
    parser.addoption("--outcomes-json", metavar="FILE", default=None,
                     help="write every test's outcome and whether it is a CUDA test to FILE (JSON)")


def pytest_configure(config):
    path = config.getoption("--outcomes-json")
    # Under pytest-xdist the workers' reports reach the controller, which writes
    # the file; the workers themselves record nothing.
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(OutcomeRecorder(path), "pyprune-outcomes-json")


class OutcomeRecorder:
    """Collects one outcome per test from the reports of its phases (setup,
    call, teardown) and writes them at the end of the session."""

    def __init__(self, path):
        self.path = path
        self.outcomes = {}

    def _entry(self, nodeid, cuda):
        entry = self.outcomes.setdefault(nodeid, {"cuda": cuda, "outcome": "collected", "skip_reason": None})
        entry["cuda"] = entry["cuda"] or cuda
        return entry

    def pytest_collection_finish(self, session):
        # session.items is the final selection (after -m / -k); empty on an xdist controller
        for item in session.items:
            self._entry(item.nodeid, item.get_closest_marker("cuda") is not None)

    def pytest_runtest_logreport(self, report):
        entry = self._entry(report.nodeid, "cuda" in report.keywords)
        if report.failed:
            entry["outcome"] = "failed"
        elif report.skipped and entry["outcome"] != "failed":
            entry["outcome"] = "skipped"
            entry["skip_reason"] = _skip_reason(report)
        elif report.when == "call" and report.passed and entry["outcome"] == "collected":
            entry["outcome"] = "passed"

    def pytest_sessionfinish(self, session):
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".outcomes-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.outcomes, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def _skip_reason(report):
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
