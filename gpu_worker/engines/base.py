"""The one interface every engine implements. Engines never see sockets or the ledger."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Person = dict[str, Any]
"""{track_id, score, bbox_xyxy, keypoints_2d[[x,y,conf]], keypoints_3d[[x,y,z]], smpl?, camera?, vertices?}"""


@dataclass
class FrameOut:
    index: int
    persons: list[Person]


@dataclass
class LoadStage:
    name: str
    run: Callable[[], None]


class Engine(ABC):
    name: str = "engine"
    joint_names: list[str] = []

    def __init__(self, device: str, options: dict[str, Any]):
        self.device = device
        self.options = dict(options or {})

    @property
    def version(self) -> str:
        return "unknown"

    @abstractmethod
    def stages(self) -> list[LoadStage]:
        """Load steps in order. The one named "detector" is what the probe process runs."""

    def probe_stages(self) -> list[LoadStage]:
        """What the detector probe runs: every stage up to and including "detector"."""
        chosen = []
        for stage in self.stages():
            chosen.append(stage)
            if stage.name == "detector":
                break
        return chosen

    def check(self, where: str) -> None:  # noqa: B027 - a hook only the fault wrapper overrides
        """Fault-injection hook (see engines.fault); a no-op for real engines."""

    @abstractmethod
    def begin_video(self, width: int, height: int, fps: float) -> None:
        """Fresh per-video state (tracker); models stay loaded."""

    @abstractmethod
    def push(self, index: int, pts_s: float, rgb: np.ndarray) -> list[FrameOut]:
        """Feed one frame; return the frames that are now final (engines with lag return later)."""

    def end_video(self) -> list[FrameOut]:
        """Flush frames still held back at the end of the video."""
        return []

    @abstractmethod
    def infer_image(self, rgb: np.ndarray) -> list[Person]:
        """Single image, independent of any video state."""

    def close(self) -> None:  # noqa: B027 - engines holding no native resources keep this
        """Release native resources (GPU memory, graphs) before the process ends."""

    def mesh_faces(self):
        """Triangles of the engine's mesh (an N x 3 int array), or None for engines without one."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "device": self.device}
