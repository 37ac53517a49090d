"""Hardware and software record stored with every measurement and report, so numbers stay comparable."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .telemetry import cpu_model_name, read_telemetry

PACKAGES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "optuna": "optuna",
            "fvcore": "fvcore", "numpy": "numpy", "nvidia_ml_py": "nvidia-ml-py"}
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding tpsexplore/ (when not installed)


def environment_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Flat JSON-serialisable dict: versions, torch numerics flags, GPU (through NVML telemetry), CPU, OS, host.

    ``device`` is the device the measurement runs on ("auto", "cpu", "cuda", "cuda:N"); GPU keys are None on CPU and
    ``nvml_error`` says why when GPU data is missing. Never raises because a package, git or NVML is absent.
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    info: dict[str, Any] = {"python": platform.python_version(),
                            "python_implementation": platform.python_implementation()}
    for key, dist in PACKAGES.items():
        info[key] = _version(dist)
    info["torch"] = torch.__version__
    info.update(_tpsexplore_version())
    info.update({
        "cuda_runtime": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "device": str(dev),
    })
    info.update(_gpu_info(dev))
    info.update({
        "cpu_model": cpu_model_name(),
        "cpu_arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "os": platform.platform(),
        "hostname": socket.gethostname(),
    })
    return info


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError:
        return None


def _gpu_info(dev: torch.device) -> dict[str, Any]:
    keys = ("gpu_name", "gpu_uuid", "gpu_driver", "gpu_cuda_driver", "gpu_power_limit_w", "gpu_max_sm_clock_mhz",
            "gpu_memory_bytes", "gpu_capability", "gpu_sm_count", "nvml_error")
    out: dict[str, Any] = dict.fromkeys(keys)
    if dev.type != "cuda":
        out["nvml_error"] = f"device is {dev.type}: NVML telemetry covers NVIDIA GPUs only"
        return out
    if not torch.cuda.is_available():
        out["nvml_error"] = "torch.cuda.is_available() is False"
        return out
    index = torch.cuda.current_device() if dev.index is None else dev.index
    props = torch.cuda.get_device_properties(index)
    out.update(gpu_name=props.name, gpu_memory_bytes=int(props.total_memory),
               gpu_capability=f"{props.major}.{props.minor}", gpu_sm_count=props.multi_processor_count)
    tel = read_telemetry(torch.device("cuda", index))
    out.update(gpu_name=tel.name or props.name, gpu_uuid=tel.uuid, gpu_driver=tel.driver_version,
               gpu_cuda_driver=tel.cuda_driver_version, gpu_power_limit_w=tel.power_limit_w,
               gpu_max_sm_clock_mhz=tel.max_sm_clock_mhz, nvml_error=tel.nvml_error)
    return out


def _tpsexplore_version() -> dict[str, Any]:
    """Package version (installed metadata, else pyproject.toml) and the git commit of the checkout, if any."""
    version = _version("tpsexplore")
    if version is None:
        try:
            import tomllib
            with open(_PACKAGE_ROOT / "pyproject.toml", "rb") as fh:
                version = tomllib.load(fh).get("project", {}).get("version")
        except (ImportError, OSError, ValueError):
            version = None
    commit = _git(["rev-parse", "HEAD"])
    status = _git(["status", "--porcelain", "--untracked-files=no"]) if commit else None
    return {"tpsexplore": version, "git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def _git(args: list[str]) -> str | None:
    if not (_PACKAGE_ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(_PACKAGE_ROOT), *args], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
