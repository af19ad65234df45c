"""setup.py's build decisions: the CUDA arch lists torch accepts, how they reach
the C++ code (a generated header, never a -D list that nvcc would split at
commas), the refusal under build isolation, and the error for a GPU whose
architecture was not compiled in."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import pyprune_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")


def load_setup_module():
    """setup.py as a module: it calls setup() only when run as __main__."""
    spec = importlib.util.spec_from_file_location("pyprune_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_setup_module()

# (what a user sets, what the build records as compiled)
ARCH_LISTS = [
    ("8.0;9.0", "8.0;9.0"),
    ("8.0 9.0", "8.0;9.0"),
    ("8.0,9.0", "8.0;9.0"),
    (" 8.0;;9.0; ", "8.0;9.0"),
    ("9.0+PTX", "9.0+PTX"),
    ("9.0a", "9.0a"),
    ("9.0", "9.0"),
    ("8.6;9.0+PTX", "8.6;9.0+PTX"),
    ("Hopper", "9.0+PTX"),
]


@pytest.mark.parametrize("requested, recorded", ARCH_LISTS)
def test_arch_list_is_normalised_parsed_by_torch_and_recorded(requested, recorded):
    arch_list = build.requested_arch_list({"TORCH_CUDA_ARCH_LIST": requested})
    assert ";;" not in arch_list and not arch_list.startswith(";") and not arch_list.endswith(";")
    flags = build.arch_flags(arch_list)
    assert flags and all(flag.startswith("-gencode=arch=compute_") for flag in flags)
    assert build.compiled_archs(flags) == recorded
    header = build.build_config_header(recorded)
    assert f'#define PYPRUNE_CUDA_ARCHS "{recorded}"' in header
    assert "@" not in header


def test_arch_flags_leave_the_environment_as_it_was(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    build.arch_flags("9.0")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5"


def test_unset_arch_list_defaults_without_a_gpu():
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        expected = ";".join(f"{a}.{b}" for a, b in sorted(caps))
    else:
        expected = build.DEFAULT_ARCH_LIST
    assert build.requested_arch_list({}) == expected
    assert build.requested_arch_list({"TORCH_CUDA_ARCH_LIST": "  "}) == expected


@pytest.mark.parametrize("bad", ["7.7", "sm_90", "9"])
def test_unknown_arch_is_refused_by_torchs_parser(bad):
    with pytest.raises(ValueError, match="Unknown CUDA arch"):
        build.arch_flags(build.requested_arch_list({"TORCH_CUDA_ARCH_LIST": bad}))


@pytest.mark.skipif(not os.path.exists(NVCC), reason="nvcc is not installed")
@pytest.mark.parametrize("requested", ["8.0;9.0", "8.0 9.0", "9.0+PTX"])
def test_nvcc_compiles_with_the_generated_header_and_flags(tmp_path, requested):
    """The defect this guards against: nvcc failing on the flags setup.py passes
    ('macro names must be identifiers' from a -D list with commas)."""
    arch_list = build.requested_arch_list({"TORCH_CUDA_ARCH_LIST": requested})
    flags = build.arch_flags(arch_list)
    include = tmp_path / "include"
    (include / "pyprune").mkdir(parents=True)
    (include / "pyprune" / "build_config.h").write_text(build.build_config_header(build.compiled_archs(flags)))
    source = tmp_path / "probe.cu"
    source.write_text(
        "#include <pyprune/build_config.h>\n"
        "#ifndef PYPRUNE_WITH_CUDA\n#error PYPRUNE_WITH_CUDA is not defined\n#endif\n"
        "static_assert(sizeof(PYPRUNE_CUDA_ARCHS) > 1, \"empty arch list\");\n"
        "__global__ void probe(float* x) { x[threadIdx.x] = 1.0f; }\n")
    command = [NVCC, "-c", str(source), "-o", str(tmp_path / "probe.o"), f"-I{include}",
               "-DPYPRUNE_WITH_CUDA"] + build.NVCC_FLAGS + flags
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "probe.o").stat().st_size > 0


def test_compiled_archs_match_the_recorded_build():
    info = pyprune_ext.build_info()
    from pyprune_ext import _build_config
    assert info["cuda"] == _build_config.WITH_CUDA
    assert info["cuda_arch_list"] == _build_config.CUDA_ARCH_LIST
    if info["cuda"]:
        assert info["cuda_arch_list"] and info["cpu_only_reason"] == ""
    else:
        assert info["cuda_arch_list"] == ""
        assert info["cpu_only_reason"] == _build_config.CPU_ONLY_REASON != ""


def test_missing_arch_error_names_the_gpu_the_build_and_the_fix():
    message = torch.ops.pyprune._missing_arch_message(8, 6, "NVIDIA A10")
    archs = pyprune_ext.build_info()["cuda_arch_list"] or "no CUDA architecture"
    assert "NVIDIA A10" in message and "compute capability 8.6" in message and "sm_86" in message
    assert f"compiled for {archs}." in message
    assert 'TORCH_CUDA_ARCH_LIST="8.6" pip install --no-build-isolation' in message


# Runs setup.py as pip's isolated build would: without an importable torch.
WITHOUT_TORCH = r"""
import runpy, sys
sys.modules["torch"] = None  # import torch -> ImportError
sys.argv = ["setup.py", "--version"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_setup_without_torch_stops_at_once_and_says_no_build_isolation():
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("pyprune_ext is compiled against the torch")
    assert "pip install --no-build-isolation ." in result.stderr


def test_bad_pyprune_cuda_value_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("PYPRUNE_CUDA", "yes")
    with pytest.raises(SystemExit) as exc:
        build.cuda_build_choice()
    assert str(exc.value) == "pyprune_ext: PYPRUNE_CUDA must be 0 or 1, got 'yes'"


def test_pyprune_cuda_1_without_nvcc_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("PYPRUNE_CUDA", "1")
    monkeypatch.setattr(build.cpp_extension, "CUDA_HOME", None)
    with pytest.raises(SystemExit) as exc:
        build.cuda_build_choice()
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith("pyprune_ext: PYPRUNE_CUDA=1 but the CUDA kernels cannot be built")
    assert "nvcc was not found" in text


def test_without_nvcc_the_build_is_cpu_only_and_says_why(monkeypatch):
    monkeypatch.delenv("PYPRUNE_CUDA", raising=False)
    monkeypatch.setattr(build.cpp_extension, "CUDA_HOME", None)
    with_cuda, reason = build.cuda_build_choice()
    assert not with_cuda and "nvcc was not found" in reason
    monkeypatch.setenv("PYPRUNE_CUDA", "0")
    assert build.cuda_build_choice() == (False, "PYPRUNE_CUDA=0")


def test_cmake_architectures_spelling():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import build_libtorch
    assert build_libtorch.cmake_architectures("8.0;9.0") == "80;90"
    assert build_libtorch.cmake_architectures("8.0 9.0+PTX") == "80;90"
    assert build_libtorch.cmake_architectures("9.0a") == "90a"


def test_ci_reads_the_readmes_two_commands():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from readme_commands import readme_commands
    with open(os.path.join(ROOT, "README.md")) as f:
        setup_and_run, setup_and_test = readme_commands(f.read())
    assert setup_and_run.startswith("bash scripts/setup.sh && ") and "pyprune taylor" in setup_and_run
    assert setup_and_test == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    with pytest.raises(SystemExit, match="no ```bash block"):
        readme_commands("# title\n")
    with pytest.raises(SystemExit, match="expected two commands"):
        readme_commands("## Two commands\n```bash\n# comment\nbash a.sh\n```\n")
