"""An engine that decodes frames and finds nobody. It exists to measure the daemon's own overhead
and to drive supervision tests fast; results say engine "noop", so nobody mistakes them for poses."""
from __future__ import annotations

import time

import numpy as np

from gpu_worker.engines.base import Engine, FrameOut, LoadStage


class NoopEngine(Engine):
    name = "noop"
    joint_names: list[str] = []

    @property
    def version(self) -> str:
        return "1"

    def stages(self) -> list[LoadStage]:
        # stage_delay_s gives each stage a duration, so tests can act while the worker is loading
        delay = float(self.options.get("stage_delay_s", 0.0))
        return [LoadStage(n, lambda: time.sleep(delay)) for n in ("runtime", "weights", "model", "detector")]

    def begin_video(self, width: int, height: int, fps: float) -> None:
        pass

    def push(self, index: int, pts_s: float, rgb: np.ndarray) -> list[FrameOut]:
        delay = float(self.options.get("frame_delay_s", 0.0))
        if delay:
            time.sleep(delay)  # paces a job so tests can act on it mid-way
        return [FrameOut(index, [])]

    def infer_image(self, rgb: np.ndarray) -> list:
        return []
