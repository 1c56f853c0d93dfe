"""Skeletons drawn on frames: the /pose/hybrid visualisation, /frame images and overlay videos."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, overload


@overload
def number_or(value: Any, default: float = 0.0) -> float: ...


@overload
def number_or(value: Any, default: None) -> Optional[float]: ...


def number_or(value: Any, default: Optional[float] = 0.0) -> Optional[float]:
    """A finite float, or `default` for anything else (None, NaN, text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


SKELETON = [
    ("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"), ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"), ("left_hip", "right_hip"), ("left_hip", "left_knee"),
    ("left_knee", "left_ankle"), ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
    ("left_ankle", "left_heel"), ("right_ankle", "right_heel"), ("left_heel", "left_foot_index"),
    ("right_heel", "right_foot_index"), ("left_ankle", "left_big_toe"), ("right_ankle", "right_big_toe"),
    ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"), ("right_eye", "right_ear"),
    ("nose", "neck"), ("neck", "mid_hip"),
]
COLOURS = [(0, 255, 0), (255, 128, 0), (0, 128, 255), (255, 0, 255), (0, 255, 255)]


def draw_persons(bgr, persons: list, names: Sequence[str], min_conf: float = 0.3):
    """Skeleton (and box) of every person on a BGR image, in place."""
    import cv2

    height, width = bgr.shape[:2]
    thick = max(2, round(max(height, width) / 400))
    for n, person in enumerate(persons):
        colour = COLOURS[n % len(COLOURS)]
        points = {}
        for i, kp in enumerate(person.get("keypoints_2d") or []):
            if i < len(names) and names[i] not in points and kp and kp[0] is not None and kp[1] is not None \
                    and number_or(kp[2] if len(kp) > 2 else 1.0) >= min_conf:
                points[names[i]] = (int(round(kp[0])), int(round(kp[1])))
        for a, b in SKELETON:
            if a in points and b in points:
                cv2.line(bgr, points[a], points[b], colour, thick, cv2.LINE_AA)
        for xy in points.values():
            cv2.circle(bgr, xy, thick + 1, (0, 0, 255), -1, cv2.LINE_AA)
    return bgr


