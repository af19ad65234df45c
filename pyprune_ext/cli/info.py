"""``pyprune info``: what is installed, what was compiled, what devices torch sees."""

from __future__ import annotations

import platform
from typing import Any, Dict

import torch

from .common import Console


def collect() -> Dict[str, Any]:
    import pyprune_ext
    build = pyprune_ext.build_info()
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
               for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    ops = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith("pyprune::") and not s.name.startswith("pyprune::_")})
    return {
        "pyprune_ext": pyprune_ext.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "built_against_torch": build["torch_version"],
        "cuda_kernels": build["cuda"],
        "cuda_arch_list": build["cuda_arch_list"] or None,
        "cpu_only_reason": build["cpu_only_reason"] or None,
        "openmp": build["openmp"],
        "cpu_threads": torch.get_num_threads(),
        "cuda_devices": devices,
        "ops": [f"torch.ops.pyprune.{name}" for name in ops],
    }


def run(args, console: Console) -> Dict[str, Any]:
    info = collect()
    devices = ", ".join(f"cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')})"
                        for d in info["cuda_devices"]) or "none"
    rows = [
        ("pyprune_ext", info["pyprune_ext"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'}; extension built against "
                  f"{info['built_against_torch']})"),
        ("python", info["python"]),
        ("CUDA kernels", f"compiled for {info['cuda_arch_list']}" if info["cuda_kernels"] else
                         "not compiled" + (f" ({info['cpu_only_reason']})" if info["cpu_only_reason"] else "")),
        ("CPU kernels", f"OpenMP, {info['cpu_threads']} threads" if info["openmp"] else "single-threaded"),
        ("CUDA devices", devices),
        ("ops", f"{len(info['ops'])}: " + ", ".join(name.rsplit('.', 1)[1] for name in info["ops"])),
    ]
    width = max(len(key) for key, _ in rows)
    console.result("\n".join(f"{key:<{width}}  {value}" for key, value in rows))
    console.emit_json(info)
    return info
