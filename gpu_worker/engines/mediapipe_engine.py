"""MediaPipe Pose (legacy solutions API) on the CPU: one person, 33 named landmarks, image pixels
plus world coordinates in metres (hip-centred). mediapipe==0.10.21 ships only the full model
(model_complexity=1); other complexities try to download and fail offline. The second pass (roi.py) runs
the same two model files by LiteRT, without the graph (pose_detection.py, pose_landmarks.py), and, where
`make install` put it, a detector made for persons (person_detection.py); without it the second pass runs
as before and `describe()` says so (engine.options.person_detector=false turns it off, and
engine.options.person_detector_dir says where else it lies)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from gpu_worker.engines import person_detection
from gpu_worker.engines.base import Engine, FrameOut, LoadStage, Person
from gpu_worker.engines.pose_detection import PoseDetector
from gpu_worker.engines.pose_landmarks import LandmarkModel
from gpu_worker.engines.roi import MIN_PERSON_SCORE, RiderSearch, faint_detection_confidence, min_detection_confidence
from gpu_worker.errors import WeightsMissing

LANDMARK_NAMES = [
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye",
    "right_eye_outer", "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_pinky",
    "right_pinky", "left_index", "right_index", "left_thumb", "right_thumb", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle", "left_heel", "right_heel",
    "left_foot_index", "right_foot_index",
]
BUNDLED_MODELS = ("modules/pose_detection/pose_detection.tflite",
                  "modules/pose_landmark/pose_landmark_full.tflite")
MIN_MODEL_BYTES = 1_000_000
# The landmark model's presence flag turns on the square's size (on a frame of the shared clip the second
# pass missed, a square 1.2x the detector's took a sure detection's flag from 0.36 to 0.95). A detection
# this sure whose square the model turns down is looked at once more in the larger square. Measured on
# the core generated set and the shared clip: 28 of 44 such retries found the rider (recall 0.985 ->
# 0.993, shared clip 121 -> 122 of 122); retrying detections from 0.5 up added 30 retries on the two and
# 37 on the clip 5x and found no rider more.
RETRY_MIN_DETECTION, RETRY_GROW = 0.7, 1.2


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
        self._detector: Optional[PoseDetector] = None
        self._landmarks: Optional[LandmarkModel] = None
        self._person_detector: Optional[person_detection.PersonDetector] = None
        self._size = (0, 0)
        self.second_pass = RiderSearch(self._find_in_region, self.options, follow=self._follow,
                                       detect_unguided=self._find_unguided, detect_faint=self._find_faint)

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
        for rel in BUNDLED_MODELS:
            path = os.path.join(os.path.dirname(self._mp.__file__), rel)
            if not os.path.isfile(path) or os.path.getsize(path) < MIN_MODEL_BYTES:
                raise WeightsMissing(f"{path} missing or truncated: reinstall mediapipe==0.10.21 "
                                     "(the last release that bundles its pose models)")

    def _new_pose(self, static: bool) -> PoseGraph:
        return self._mp.solutions.pose.Pose(
            static_image_mode=static, model_complexity=1, smooth_landmarks=True,
            min_detection_confidence=self._first_pass_confidence(),
            min_tracking_confidence=float(self.options.get("min_tracking_confidence", 0.5)))

    def _build(self) -> None:
        self._image_pose = self._new_pose(static=True)
        bundled = [os.path.join(os.path.dirname(self._mp.__file__), rel) for rel in BUNDLED_MODELS]
        self._detector = PoseDetector(bundled[0], min_score=min_detection_confidence(self.options))
        self._landmarks = LandmarkModel(bundled[1], min_flag=float(self.options.get("min_tracking_confidence", 0.5)),
                                        min_score=MIN_PERSON_SCORE)
        directory = self._person_detector_dir()
        if directory is not None:
            self._person_detector = person_detection.PersonDetector(directory)
            self.second_pass.detect_persons = self._person_boxes

    def _person_detector_dir(self) -> Optional[Path]:
        if not bool(self.options.get("person_detector", True)):
            return None
        where = self.options.get("person_detector_dir")
        return person_detection.installed(Path(where) if where else None)

    def _warm_up(self) -> None:
        # runs the pose detector graph, and the detector and landmark model alone, once, so a broken
        # runtime fails here and not on frame 0 (and the first lost frame does not pay for their first run)
        blank = np.zeros((256, 256, 3), dtype=np.uint8)
        _built(self._image_pose).process(blank)
        self._find_in_region(blank)
        self._follow(blank, [64.0, 64.0, 192.0, 192.0], 1.5)
        if self._person_detector is not None:
            self._person_detector.persons(blank, 1.0)

    def begin_video(self, width: int, height: int, fps: float) -> None:
        if self._video_pose is not None:
            self._video_pose.close()
        self._video_pose = self._new_pose(static=False)
        self.second_pass.forget()

    def push(self, index: int, pts_s: float, rgb: np.ndarray) -> list[FrameOut]:
        persons = _persons(_built(self._video_pose).process(rgb), rgb.shape[1], rgb.shape[0])
        return [FrameOut(index, self.second_pass.fill(persons, rgb))]

    def end_video(self) -> list[FrameOut]:
        if self._video_pose is not None:
            self._video_pose.close()
            self._video_pose = None
        return []

    def infer_image(self, rgb: np.ndarray) -> list[Person]:
        return self.second_pass.fill(self._find_in_image(rgb), rgb, follow=False)

    def _find_in_image(self, rgb: np.ndarray) -> list[Person]:
        return _persons(_built(self._image_pose).process(rgb), rgb.shape[1], rgb.shape[0])

    def _find_in_region(self, rgb: np.ndarray, min_score: Optional[float] = None) -> list[Person]:
        """The graph's two models run as the graph runs them on an image, without the graph (no tracking
        state, so the second pass cannot disturb the video's; and about half the graph's cost); the
        detector at the second pass's confidence unless `min_score` is given. A sure detection whose
        square the landmark model turns down gets one more, RETRY_GROW times larger."""
        detection = self._built_detector().best(rgb, min_score)
        if detection is None:
            return []
        centre, side, turn = detection.square()
        found = self._built_landmarks().person_in(rgb, centre, side, turn)
        if not found and detection.score >= RETRY_MIN_DETECTION:
            found = self._built_landmarks().person_in(rgb, centre, side * RETRY_GROW, turn)
        return found

    def _find_unguided(self, rgb: np.ndarray) -> list[Person]:
        """For a region no track placed: the detector at the first pass's confidence."""
        return self._find_in_region(rgb, self._first_pass_confidence())

    def _find_faint(self, rgb: np.ndarray) -> list[Person]:
        """For a video's tile the stricter detector found nobody in: the detector at the faint confidence."""
        return self._find_in_region(rgb, faint_detection_confidence(self.options))

    def _person_boxes(self, rgb: np.ndarray, min_score: float) -> list[tuple[float, list[float]]]:
        if self._person_detector is None:
            raise RuntimeError("person detector used before it was built")
        return [(found.score, found.box) for found in self._person_detector.persons(rgb, min_score)]

    def describe(self) -> dict[str, Any]:
        if self._person_detector is not None:
            detector = "on"
        elif not bool(self.options.get("person_detector", True)):
            detector = "off (engine.options.person_detector=false)"
        else:
            detector = ("absent: `python -m gpu_worker.engines.person_detection install` puts it in "
                        f"{self.options.get('person_detector_dir') or person_detection.default_dir()}")
        return {**super().describe(), "person_detector": detector}

    def _first_pass_confidence(self) -> float:
        return float(self.options.get("min_detection_confidence", 0.5))

    def _follow(self, rgb: np.ndarray, box: list[float], grow: float) -> list[Person]:
        """The pose model alone on a square around `box` (the second pass following the rider's track)."""
        return self._built_landmarks().person_at(rgb, box, grow)

    def _built_detector(self) -> PoseDetector:
        if self._detector is None:
            raise RuntimeError("MediaPipe pose detector used before it was built")
        return self._detector

    def _built_landmarks(self) -> LandmarkModel:
        if self._landmarks is None:
            raise RuntimeError("MediaPipe pose landmark model used before it was built")
        return self._landmarks

    def close(self) -> None:
        for pose in (self._video_pose, self._image_pose):
            if pose is not None:
                pose.close()


def _persons(result, width: int, height: int) -> list[Person]:
    if result.pose_landmarks is None:
        return []
    image = [(lm.x * width, lm.y * height, lm.visibility) for lm in result.pose_landmarks.landmark]
    world = [(lm.x, lm.y, lm.z) for lm in result.pose_world_landmarks.landmark]
    xs = [p[0] for p in image]
    ys = [p[1] for p in image]
    bbox = [max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys))]
    return [{
        "track_id": 1,
        "score": round(float(np.mean([p[2] for p in image])), 4),
        "bbox_xyxy": [round(v, 2) for v in bbox],
        "keypoints_2d": [[round(x, 2), round(y, 2), round(v, 4)] for x, y, v in image],
        "keypoints_3d": [[round(x, 5), round(y, 5), round(z, 5)] for x, y, z in world],
    }]
