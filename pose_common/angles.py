"""Joint angles the coaching app reads (knees, hips, elbows, shoulders, spine), in degrees, from an
engine's own joint names and 3D points: shared by the legacy routes and the job report."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from pose_common.drawing import number_or

ANGLE_NAMES = ("left_knee", "right_knee", "left_hip", "right_hip", "left_elbow", "right_elbow", "left_shoulder",
               "right_shoulder", "spine")


def _angle(a, b, c) -> Optional[float]:
    """Angle ABC in degrees."""
    if a is None or b is None or c is None:
        return None
    v1 = [a[i] - b[i] for i in range(3)]
    v2 = [c[i] - b[i] for i in range(3)]
    n1, n2 = math.sqrt(sum(v * v for v in v1)), math.sqrt(sum(v * v for v in v2))
    if n1 < 1e-9 or n2 < 1e-9:
        return None
    cos = max(-1.0, min(1.0, sum(v1[i] * v2[i] for i in range(3)) / (n1 * n2)))
    return round(math.degrees(math.acos(cos)), 2)


def _mid(a, b):
    return None if a is None or b is None else [(a[i] + b[i]) / 2.0 for i in range(3)]


def joint_angles(names: Sequence[str], points_3d: Sequence[Sequence[float]]) -> dict:
    """Degrees, from the engine's own joint names (first occurrence of each name)."""
    points: dict[str, list[float]] = {}
    for name, point in zip(names, points_3d):
        if name not in points and point and len(point) >= 3 and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in point[:3]):
            points[name] = [float(v) for v in point[:3]]
    p = points.get
    angles = {}
    for side in ("left", "right"):
        angles[f"{side}_knee"] = _angle(p(f"{side}_hip"), p(f"{side}_knee"), p(f"{side}_ankle"))
        angles[f"{side}_hip"] = _angle(p(f"{side}_shoulder"), p(f"{side}_hip"), p(f"{side}_knee"))
        angles[f"{side}_elbow"] = _angle(p(f"{side}_shoulder"), p(f"{side}_elbow"), p(f"{side}_wrist"))
        angles[f"{side}_shoulder"] = _angle(p(f"{side}_elbow"), p(f"{side}_shoulder"), p(f"{side}_hip"))
    hip = _mid(p("left_hip"), p("right_hip"))
    shoulder = _mid(p("left_shoulder"), p("right_shoulder"))
    if hip is not None and shoulder is not None:
        up_point = [hip[0], hip[1] - 1.0, hip[2]]  # y points down in both engines' 3D frames
        angles["spine"] = _angle(shoulder, hip, up_point)
    else:
        angles["spine"] = None
    return angles


def main_person(persons: list) -> Optional[dict]:
    """The person a single-person reader (the app reads one) is shown: the most confident."""
    return max(persons, key=lambda p: number_or(p.get("score"))) if persons else None
