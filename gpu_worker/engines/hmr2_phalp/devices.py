"""Which CUDA device the engine means: `cuda`, `cuda:N`, under any CUDA_VISIBLE_DEVICES.

torch.cuda.set_device needs an index (torch.device("cuda") has none and raises ValueError), and
PHALP's hard-coded .cuda() calls land on the *current* device, so the engine resolves the configured
name to one indexed torch.device and makes it current. Indices count the devices CUDA_VISIBLE_DEVICES
leaves visible, as every CUDA program sees them."""
from __future__ import annotations

import os
from typing import Any, Mapping


def cuda_index(name: str) -> int | None:
    """"cuda" -> None (the current device), "cuda:N" -> N; anything else is refused."""
    text = str(name).strip().lower()
    if text == "cuda":
        return None
    prefix, _, index = text.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise ValueError(f"engine.device={name!r}: expected cuda, cuda:N or cpu")
    return int(index)


def visible_devices_note(env: Mapping[str, str] = os.environ) -> str:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    return "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r} renumbers the visible ones from 0)"


def resolve_cuda_device(torch: Any, name: str, env: Mapping[str, str] = os.environ) -> Any:
    """The configured CUDA device as an indexed torch.device, checked against what torch sees."""
    index = cuda_index(name)
    count = int(torch.cuda.device_count())
    if count < 1:
        raise RuntimeError(f"engine.device={name} but torch {torch.__version__} sees no CUDA device"
                           + visible_devices_note(env))
    if index is None:
        index = int(torch.cuda.current_device())
    if index >= count:
        raise RuntimeError(f"engine.device={name} but torch sees {count} CUDA device(s), "
                           f"numbered 0..{count - 1}" + visible_devices_note(env))
    return torch.device("cuda", index)


def make_current(torch: Any, device: Any) -> None:
    """PHALP's .cuda() means "the current device": make it the configured one, and create the CUDA
    context now rather than on frame 0."""
    torch.cuda.set_device(device.index)
    torch.zeros(1, device=device)
