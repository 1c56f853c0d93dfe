"""MediaPipe Pose (legacy solutions API) on the CPU: one person, 33 named landmarks, image pixels
plus world coordinates in metres (hip-centred). mediapipe==0.10.21 ships only the full model
(model_complexity=1); other complexities try to download and fail offline. The second pass (roi.py) runs
the same two model files by LiteRT, without the graph, and, where `make install` put it, a detector made
for persons (rider_models.py); without it the second pass runs as before and `describe()` says so
(engine.options.person_detector=false turns it off, and engine.options.person_detector_dir says where
else it lies)."""
from __future__ import annotations

import os
from typing import Any, Optional, Protocol

import numpy as np

from gpu_worker.engines.base import Engine, FrameOut, LoadStage, Person
from gpu_worker.engines.rider_models import (
    MIN_MODEL_BYTES,
    RiderModels,
    bundled_models,
    first_pass_confidence,
    tracking_confidence,
)
from gpu_worker.errors import WeightsMissing

LANDMARK_NAMES = [
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_pinky",
    "right_pinky", "left_index", "right_index", "left_thumb", "right_thumb", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle", "left_heel", "right_heel",
    "left_foot_index", "right_foot_index",
]


class PoseGraph(Protocol):
    """What the engine uses of mediapipe.solutions.pose.Pose (mediapipe ships no type information)."""

    def process(self, image: np.ndarray) -> Any: ...

    def close(self) -> None: ...


def _built(graph: Optional[PoseGraph]) -> PoseGraph:
    """A graph the load stages (or begin_video) built before any frame or image reaches it."""
    if graph is None:
        raise RuntimeError("MediaPipe pose graph used before it was built")
    return graph


class MediaPipeEngine(Engine):
    name = "mediapipe"
    joint_names = LANDMARK_NAMES

    def __init__(self, device: str, options: dict[str, Any]):
        super().__init__("cpu", options)
        self._mp: Any = None  # the mediapipe module once the runtime stage imported it (untyped: no stubs)
        self._video_pose: Optional[PoseGraph] = None
        self._image_pose: Optional[PoseGraph] = None
        self.rider_models = RiderModels(self.options)
        self.second_pass = self.rider_models.search

    @property
    def version(self) -> str:
        return getattr(self._mp, "__version__", "unloaded")

    def stages(self) -> list[LoadStage]:
        return [LoadStage("runtime", self._import), LoadStage("weights", self._check_weights),
                LoadStage("model", self._build), LoadStage("detector", self._warm_up)]

    def _import(self) -> None:
        import mediapipe
        self._mp = mediapipe

    def _check_weights(self) -> None:
        for path in bundled_models(os.path.dirname(self._mp.__file__)):
            if not os.path.isfile(path) or os.path.getsize(path) < MIN_MODEL_BYTES:
                raise WeightsMissing(f"{path} missing or truncated: reinstall mediapipe==0.10.21 "
                                     "(the last release that bundles its pose models)")

    def _new_pose(self, static: bool) -> PoseGraph:
        return self._mp.solutions.pose.Pose(
            static_image_mode=static, model_complexity=1, smooth_landmarks=True,
            min_detection_confidence=first_pass_confidence(self.options),
            min_tracking_confidence=tracking_confidence(self.options))

    def _build(self) -> None:
        self._image_pose = self._new_pose(static=True)
        self.rider_models.build(os.path.dirname(self._mp.__file__))

    def _warm_up(self) -> None:
        # the pose graph once, then the second pass's models: a broken runtime fails here, not on frame 0
        _built(self._image_pose).process(np.zeros((256, 256, 3), dtype=np.uint8))
        self.rider_models.warm_up()

    def begin_video(self, width: int, height: int, fps: float) -> None:
        if self._video_pose is not None:
            self._video_pose.close()
        self._video_pose = self._new_pose(static=False)
        self.second_pass.forget()

    def push(self, index: int, pts_s: float, rgb: np.ndarray) -> list[FrameOut]:
        persons = persons_in(_built(self._video_pose).process(rgb), rgb.shape[1], rgb.shape[0])
        return [FrameOut(index, self.second_pass.fill(persons, rgb))]

    def end_video(self) -> list[FrameOut]:
        if self._video_pose is not None:
            self._video_pose.close()
            self._video_pose = None
        return []

    def infer_image(self, rgb: np.ndarray) -> list[Person]:
        return self.second_pass.fill(self._find_in_image(rgb), rgb, follow=False)

    def _find_in_image(self, rgb: np.ndarray) -> list[Person]:
        return persons_in(_built(self._image_pose).process(rgb), rgb.shape[1], rgb.shape[0])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "person_detector": self.rider_models.describe_person_detector()}

    def close(self) -> None:
        for pose in (self._video_pose, self._image_pose):
            if pose is not None:
                pose.close()


def persons_in(result: Any, width: int, height: int) -> list[Person]:
    """MediaPipe Pose's answer as the engine's persons: none, or one with his 33 landmarks (the box over
    them all, clipped to the frame; the score their mean visibility). None either when every landmark lies
    beyond one edge of the frame: after a cut to an empty shot the graph kept a pose 70-220 px above the
    picture for frames (generated set, seed 35), a box with no height in it."""
    if result.pose_landmarks is None:
        return []
    image = [(lm.x * width, lm.y * height, lm.visibility) for lm in result.pose_landmarks.landmark]
    world = [(lm.x, lm.y, lm.z) for lm in result.pose_world_landmarks.landmark]
    xs = [p[0] for p in image]
    ys = [p[1] for p in image]
    bbox = [max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys))]
    if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
        return []
    return [{
        "track_id": 1,
        "score": round(float(np.mean([p[2] for p in image])), 4),
        "bbox_xyxy": [round(v, 2) for v in bbox],
        "keypoints_2d": [[round(x, 2), round(y, 2), round(v, 4)] for x, y, v in image],
        "keypoints_3d": [[round(x, 5), round(y, 5), round(z, 5)] for x, y, z in world],
    }]
