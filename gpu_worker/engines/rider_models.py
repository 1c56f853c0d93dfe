"""The models the second pass (roi.RiderSearch) runs, without MediaPipe's pose graph: the graph's pose
detector and landmark model on a region as the graph runs them on an image (pose_detection.py,
pose_landmarks.py), the landmark model alone on a box (following the rider's track), and, where `make
install` put it, a detector made for persons (person_detection.py). One set serves both engines that
search for the rider with MediaPipe: the mediapipe engine and the hmr2_phalp engine's CPU rung, so a
frame the one finds the rider in, the other does too.

Options read: min_detection_confidence (the first pass's, for regions no track placed, default 0.5),
min_tracking_confidence (the landmark model's presence flag, default 0.5), person_detector (default
true) and person_detector_dir, and the second pass's own (roi.RiderSearch)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gpu_worker.engines import person_detection
from gpu_worker.engines.base import Person
from gpu_worker.engines.pose_detection import PoseDetector
from gpu_worker.engines.pose_landmarks import LandmarkModel
from gpu_worker.engines.roi import MIN_PERSON_SCORE, RiderSearch, faint_detection_confidence, min_detection_confidence

# The pose models inside the mediapipe package, relative to its directory.
BUNDLED_MODELS = ("modules/pose_detection/pose_detection.tflite",
                  "modules/pose_landmark/pose_landmark_full.tflite")
MIN_MODEL_BYTES = 1_000_000  # either file smaller than this is truncated
# The landmark model's presence flag turns on the square's size (on a frame of the shared clip the second
# pass missed, a square 1.2x the detector's took a sure detection's flag from 0.36 to 0.95). A detection
# this sure whose square the model turns down is looked at once more in the larger square. Measured on
# the core generated set and the shared clip: 28 of 44 such retries found the rider (recall 0.985 ->
# 0.993, shared clip 121 -> 122 of 122); retrying detections from 0.5 up added 30 retries on the two and
# 37 on the clip 5x and found no rider more.
RETRY_MIN_DETECTION, RETRY_GROW = 0.7, 1.2


def first_pass_confidence(options: dict[str, Any]) -> float:
    return float(options.get("min_detection_confidence", 0.5))


def tracking_confidence(options: dict[str, Any]) -> float:
    return float(options.get("min_tracking_confidence", 0.5))


def bundled_models(mediapipe_dir: str) -> list[str]:
    return [os.path.join(mediapipe_dir, rel) for rel in BUNDLED_MODELS]


class RiderModels:
    """The second pass's models for one engine, and its search (`search`, a RiderSearch wired to them).
    Built by `build` (the engine's load stage), after which every method runs; before it they raise."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        self.detector: Optional[PoseDetector] = None
        self.landmarks: Optional[LandmarkModel] = None
        self.person_detector: Optional[person_detection.PersonDetector] = None
        self.search = RiderSearch(self.find_in_region, options, follow=self.follow,
                                  detect_unguided=self.find_unguided, detect_faint=self.find_faint)

    def build(self, mediapipe_dir: str) -> None:
        detector_file, landmark_file = bundled_models(mediapipe_dir)
        self.detector = PoseDetector(detector_file, min_score=min_detection_confidence(self.options))
        self.landmarks = LandmarkModel(landmark_file, min_flag=tracking_confidence(self.options),
                                       min_score=MIN_PERSON_SCORE)
        directory = self.person_detector_dir()
        if directory is not None:
            self.person_detector = person_detection.PersonDetector(directory)
            self.search.detect_persons = self.person_boxes

    def person_detector_dir(self) -> Optional[Path]:
        if not bool(self.options.get("person_detector", True)):
            return None
        where = self.options.get("person_detector_dir")
        return person_detection.installed(Path(where) if where else None)

    def warm_up(self) -> None:
        """Each model once, so a broken runtime fails in the load stage and not on frame 0 (and the first
        lost frame does not pay for their first run)."""
        blank = np.zeros((256, 256, 3), dtype=np.uint8)
        self.find_in_region(blank)
        self.follow(blank, [64.0, 64.0, 192.0, 192.0], 1.5)
        if self.person_detector is not None:
            self.person_detector.persons(blank, 1.0)

    def describe_person_detector(self) -> str:
        """`on`, `off (...)` or `absent: ...` with the command that installs it."""
        if self.person_detector is not None:
            return "on"
        if not bool(self.options.get("person_detector", True)):
            return "off (engine.options.person_detector=false)"
        return ("absent: `python -m gpu_worker.engines.person_detection install` puts it in "
                f"{self.options.get('person_detector_dir') or person_detection.default_dir()}")

    def find_in_region(self, rgb: np.ndarray, min_score: Optional[float] = None) -> list[Person]:
        """The graph's two models run as the graph runs them on an image, without the graph (no tracking
        state, so the second pass cannot disturb the video's; and about half the graph's cost); the
        detector at the second pass's confidence unless `min_score` is given. A sure detection whose
        square the landmark model turns down gets one more, RETRY_GROW times larger."""
        detection = self.built_detector().best(rgb, min_score)
        if detection is None:
            return []
        centre, side, turn = detection.square()
        found = self.built_landmarks().person_in(rgb, centre, side, turn)
        if not found and detection.score >= RETRY_MIN_DETECTION:
            found = self.built_landmarks().person_in(rgb, centre, side * RETRY_GROW, turn)
        return found

    def find_unguided(self, rgb: np.ndarray) -> list[Person]:
        """For a region no track placed: the detector at the first pass's confidence."""
        return self.find_in_region(rgb, first_pass_confidence(self.options))

    def find_faint(self, rgb: np.ndarray) -> list[Person]:
        """For a video's tile the stricter detector found nobody in: the detector at the faint confidence."""
        return self.find_in_region(rgb, faint_detection_confidence(self.options))

    def follow(self, rgb: np.ndarray, box: list[float], grow: float) -> list[Person]:
        """The pose model alone on a square around `box` (the second pass following the rider's track)."""
        return self.built_landmarks().person_at(rgb, box, grow)

    def person_boxes(self, rgb: np.ndarray, min_score: float) -> list[tuple[float, list[float]]]:
        if self.person_detector is None:
            raise RuntimeError("person detector used before it was built")
        return [(found.score, found.box) for found in self.person_detector.persons(rgb, min_score)]

    def built_detector(self) -> PoseDetector:
        if self.detector is None:
            raise RuntimeError("MediaPipe pose detector used before it was built")
        return self.detector

    def built_landmarks(self) -> LandmarkModel:
        if self.landmarks is None:
            raise RuntimeError("MediaPipe pose landmark model used before it was built")
        return self.landmarks
