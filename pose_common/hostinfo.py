"""Facts about the host and the GPU for crash reports and GET /v1/diagnostics. NVML is optional:
without a GPU (or under WSL, where per-process queries are unsupported) fields say why."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import metadata
from typing import Any, Optional

import psutil

PACKAGES = ("pose-service", "pyzmq", "msgpack", "aiohttp", "structlog", "hydra-core", "av", "numpy", "psutil",
            "nvidia-ml-py", "torch", "mediapipe", "hmr2", "phalp", "detectron2")


def system_memory() -> dict[str, Any]:
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    return {"total": vm.total, "available": vm.available, "percent": vm.percent,
            "swap_total": swap.total, "swap_used": swap.used}


@lru_cache(maxsize=1)
def is_wsl() -> bool:
    try:
        with open("/proc/version") as fh:
            return "microsoft" in fh.read().lower()
    except OSError:
        return False


def host_facts() -> dict[str, Any]:
    facts = {"platform": platform.platform(), "python": platform.python_version(),
             "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "memory": system_memory(),
             "wsl": is_wsl(), "load_avg": os.getloadavg()}
    if is_wsl():
        facts["wsl_vm_memory_limit"] = psutil.virtual_memory().total
        facts["wsl_note"] = "the VM's memory limit is what Linux sees as total; raise it in .wslconfig"
    return facts


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def gpu_facts(pids: tuple[int, ...] = ()) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML: {exc}"}
    try:
        return {"available": True, "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "devices": [_device(pynvml, i, pids) for i in range(pynvml.nvmlDeviceGetCount())]}
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _device(pynvml, index: int, pids: tuple[int, ...]) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    device = {"index": index, "name": _text(pynvml.nvmlDeviceGetName(handle)),
              "memory_total": mem.total, "memory_used": mem.used, "memory_free": mem.free}
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        device["processes"] = [{"pid": p.pid, "used": p.usedGpuMemory, "ours": p.pid in pids} for p in procs]
    except pynvml.NVMLError as exc:
        device["processes"] = f"not available ({exc}); WSL does not support per-process queries"
    return device


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@lru_cache(maxsize=1)
def package_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
