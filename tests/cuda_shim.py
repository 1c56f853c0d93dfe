"""A CUDA-shaped torch on a machine without a GPU, for tests.

torch's CUDA entry points (torch.cuda.set_device, current_device, device_count, is_available, the
memory queries, autocast on "cuda") are replaced by a shim that validates their arguments the way torch
does (device indices through torch's own `_get_device_index`, ordinals against the visible device
count, autocast dtypes) and records every call. Every tensor or module sent to a CUDA device (a
`device=` argument, `.to(...)`, `.cuda()`) is checked the same way, recorded with the device index it
would land on, and kept on the CPU, so the real code runs end to end and a test can say where each
tensor would have gone. What it cannot show: kernels, real memory, speed.

    with cuda_shim(physical=2) as shim:
        engine = HMR2PhalpEngine("cuda:1", options); ...
    assert shim.indices_used() == {1}
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch.cuda._utils import _get_device_index
from torch.overrides import TorchFunctionMode

CUDA_NAME = re.compile(r"^cuda(:\d+)?$")
AUTOCAST_CUDA_DTYPES = (torch.float16, torch.bfloat16)


class InvalidDeviceOrdinal(RuntimeError):
    """What CUDA says for an index beyond the visible devices ("invalid device ordinal")."""


def visible_count(physical: int, env: Mapping[str, str]) -> int:
    """CUDA_VISIBLE_DEVICES="1" leaves one device (numbered 0); "" leaves none; unset leaves all."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return physical
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry.isdigit() or int(entry) >= physical:
            break  # CUDA stops at the first invalid entry
        count += 1
    return count


@dataclass
class CudaShim:
    physical: int = 2
    total_mb: int = 8192
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    current: int = 0
    calls: list[tuple[str, Any]] = field(default_factory=list)
    placements: list[tuple[str, int]] = field(default_factory=list)
    initialized: bool = False

    @property
    def count(self) -> int:
        return visible_count(self.physical, self.env)

    # -- torch.cuda's functions -------------------------------------------------------------------

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def set_device(self, device: Any) -> None:
        index = _get_device_index(device)  # torch's own check: ValueError for torch.device("cuda")
        self.calls.append(("set_device", index))
        if index >= 0:
            self.check_ordinal(index)
            self.current = index
            self.initialized = True

    def current_device(self) -> int:
        self.require_a_device()
        self.initialized = True
        return self.current

    def is_initialized(self) -> bool:
        return self.initialized

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        self.ordinal_of(device, "mem_get_info")
        total = self.total_mb * 2**20
        return total, total

    def zero_bytes(self, device: Any = None) -> int:
        self.ordinal_of(device, "memory query")
        return 0

    def nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    # -- validation ---------------------------------------------------------------------------------

    def require_a_device(self) -> None:
        if self.count < 1:
            raise RuntimeError("No CUDA GPUs are available")

    def check_ordinal(self, index: int) -> None:
        self.require_a_device()
        if not 0 <= index < self.count:
            raise InvalidDeviceOrdinal(f"CUDA error: invalid device ordinal {index} (visible: {self.count})")

    def ordinal_of(self, device: Any, where: str) -> int:
        """The index a CUDA device argument means: None / "cuda" = the current device."""
        index = _get_device_index(device, optional=True) if device is not None else -1
        index = self.current if index is None or index < 0 else index
        self.check_ordinal(index)
        self.initialized = True
        self.placements.append((where, index))
        return index

    def indices_used(self) -> set[int]:
        return {index for _, index in self.placements}


def is_cuda_spec(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and bool(CUDA_NAME.match(value))


class CudaToCpu(TorchFunctionMode):
    """Every CUDA placement checked and recorded by the shim, then made on the CPU."""

    def __init__(self, shim: CudaShim):
        super().__init__()
        self.shim = shim

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        if func is torch.device:
            return func(*args, **kwargs)  # naming a device places nothing
        if func is torch.Tensor.cuda:
            device = args[1] if len(args) > 1 else kwargs.get("device")
            self.shim.ordinal_of(device, "Tensor.cuda")
            return args[0]
        args = tuple(self.to_cpu(value, name) for value in args)
        if "device" in kwargs and (is_cuda_spec(kwargs["device"]) or isinstance(kwargs["device"], int)):
            self.shim.ordinal_of(kwargs["device"], name)
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)

    def to_cpu(self, value: Any, name: str) -> Any:
        if is_cuda_spec(value):
            self.shim.ordinal_of(value, name)
            return torch.device("cpu")
        return value


def checked_autocast(shim: CudaShim, original: Any, as_asked: bool = False) -> Any:
    """torch.autocast("cuda", dtype=...) as torch checks it; run as CPU autocast in bfloat16, the
    reduced precision the CPU has, or with `as_asked` in the dtype asked (CPU autocast takes float16
    too in the torch of both venvs; its kernels are slow without avx512_fp16). CPU autocast's op lists are not
    CUDA's (layer_norm and softmax run in the input's dtype, not fp32): that the shim cannot model."""

    class Autocast(original):
        def __init__(self, device_type: str, dtype: Any = None, enabled: bool = True, cache_enabled: Any = None):
            if device_type == "cuda":
                shim.require_a_device()
                chosen = torch.float16 if dtype is None else dtype
                if enabled and chosen not in AUTOCAST_CUDA_DTYPES:
                    raise RuntimeError(f"In CUDA autocast, but the target dtype {chosen} is not supported")
                shim.calls.append(("autocast", str(chosen)))
                device_type, dtype = "cpu", chosen if as_asked else torch.bfloat16
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    return Autocast


def checked_load(shim: CudaShim, original: Any) -> Any:
    """torch.load(map_location=<a CUDA device>) checked and recorded, then mapped to the CPU."""

    def load(*args: Any, **kwargs: Any) -> Any:
        location = kwargs.get("map_location")
        if is_cuda_spec(location):
            shim.ordinal_of(location, "torch.load")
            kwargs["map_location"] = "cpu"
        return original(*args, **kwargs)

    return load


@contextlib.contextmanager
def cuda_shim(physical: int = 2, total_mb: int = 8192, env: Mapping[str, str] | None = None,
              autocast_as_asked: bool = False) -> Iterator[CudaShim]:
    shim = CudaShim(physical=physical, total_mb=total_mb, env=os.environ if env is None else env)
    replaced = {
        "is_available": shim.is_available, "device_count": shim.device_count, "set_device": shim.set_device,
        "current_device": shim.current_device, "is_initialized": shim.is_initialized,
        "mem_get_info": shim.mem_get_info, "memory_reserved": shim.zero_bytes,
        "memory_allocated": shim.zero_bytes, "max_memory_allocated": shim.zero_bytes,
        "max_memory_reserved": shim.zero_bytes, "reset_peak_memory_stats": shim.nothing,
        "empty_cache": shim.nothing, "synchronize": shim.nothing,
    }
    saved = {name: getattr(torch.cuda, name) for name in replaced}
    saved_autocast, saved_load = torch.autocast, torch.load
    for name, value in replaced.items():
        setattr(torch.cuda, name, value)
    torch.autocast = checked_autocast(shim, saved_autocast, autocast_as_asked)
    torch.load = checked_load(shim, saved_load)
    try:
        with CudaToCpu(shim):
            yield shim
    finally:
        torch.autocast, torch.load = saved_autocast, saved_load
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
