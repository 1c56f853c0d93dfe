"""Fault injection on top of any engine: real segfaults, aborts, SIGKILLs, exits, hangs and
exceptions (including torch's own CUDA OOM / AcceleratorError types) at a named stage or frame.

`at`: "start" (worker start), "stage:NAME" or "frame:N". `times`: how many firings in total across
worker restarts (counted in a file), null = every time."""
from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any, Optional

import numpy as np

from gpu_worker.engines.base import Engine, FrameOut, LoadStage, Person
from pose_common.faults import KINDS, counter_path


def fire(kind: str, where: str, hang_s: float) -> None:
    """Make `kind` happen now, for real."""
    if kind == "segfault":
        ctypes.string_at(0)
    elif kind == "abort":
        os.abort()
    elif kind == "bus_error":
        os.kill(os.getpid(), signal.SIGBUS)
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(255)  # what exit(-1) and a dying WSL VM look like from here
    elif kind in ("hang", "slow"):
        time.sleep(hang_s)  # the heartbeat thread keeps beating: only a progress deadline sees this
    elif kind == "raise":
        raise RuntimeError(f"injected exception at {where}")
    elif kind == "cuda_oom":
        import torch
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {where})")
    elif kind == "cuda_sticky":
        raise sticky_cuda_error(where)
    elif kind == "load_failure":
        from gpu_worker.errors import WeightsMissing
        raise WeightsMissing(f"injected: model file missing at {where}")
    else:
        raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")



def sticky_cuda_error(where: str) -> Exception:
    """An illegal memory access as the installed torch raises it: AcceleratorError with its code from
    torch 2.8 on, the plain RuntimeError with CUDA's text before (torch 2.1 to 2.7)."""
    import torch
    message = f"CUDA error: an illegal memory access was encountered (injected at {where})"
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is None:
        return RuntimeError(message)
    exc = accelerator_error(message)
    exc.error_code = 700  # torch's stub omits the error_code its C++ side sets
    return exc


class FaultPlan:
    """Decides whether to fire at a point, counting firings in a file that survives restarts."""

    def __init__(self, kind: str, at: str, times: Optional[int], counter_dir: str, hang_s: float):
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")
        self.kind, self.at, self.times, self.hang_s = kind, at or "start", times, hang_s
        if kind.startswith("cuda"):
            import torch  # noqa: F401  -- loaded up front, as in a real GPU worker, not inside a frame deadline
        self.counter_path = counter_path(kind, self.at, counter_dir)

    def maybe_fire(self, where: str) -> None:
        if where != self.at or not self._take():
            return
        fire(self.kind, where, self.hang_s)

    def _take(self) -> bool:
        fired = self.fired()
        if self.times is not None and fired >= self.times:
            return False
        with open(self.counter_path, "w") as fh:  # written before firing: a crash must still count
            fh.write(str(fired + 1))
        return True

    def fired(self) -> int:
        try:
            with open(self.counter_path) as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return 0


class FaultEngine(Engine):
    """Wraps another engine; its stages and frames pass through the fault plan first."""

    name = "fault"

    def __init__(self, inner: Engine, plan: Optional[FaultPlan]):
        super().__init__(inner.device, inner.options)
        self.inner, self.plan = inner, plan
        self.joint_names = inner.joint_names

    @property
    def version(self) -> str:
        return self.inner.version

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "fault": f"{self.plan.kind}@{self.plan.at}" if self.plan else None}

    def arm(self, plan: FaultPlan) -> None:
        self.plan = plan

    def check(self, where: str) -> None:
        if self.plan is not None:
            self.plan.maybe_fire(where)

    def stages(self) -> list[LoadStage]:
        return [LoadStage(s.name, self._guarded(s)) for s in self.inner.stages()]

    def _guarded(self, stage: LoadStage):
        def run() -> None:
            self.check(f"stage:{stage.name}")
            stage.run()
        return run

    def probe_stages(self) -> list[LoadStage]:
        return [LoadStage(s.name, self._guarded(s)) for s in self.inner.probe_stages()]

    def begin_video(self, width: int, height: int, fps: float) -> None:
        self.inner.begin_video(width, height, fps)

    def push(self, index: int, pts_s: float, rgb: np.ndarray) -> list[FrameOut]:
        self.check(f"frame:{index}")
        return self.inner.push(index, pts_s, rgb)

    def end_video(self) -> list[FrameOut]:
        return self.inner.end_video()

    def infer_image(self, rgb: np.ndarray) -> list[Person]:
        self.check("image")
        return self.inner.infer_image(rgb)

    def close(self) -> None:
        self.inner.close()

    def mesh_faces(self):
        return self.inner.mesh_faces()
