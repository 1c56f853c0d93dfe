"""Joint angles the coaching app reads (knees, hips, elbows, shoulders, spine), in degrees, from an
engine's own joint names and 3D points: shared by the legacy routes and the job report.

An angle is computed only from joints the engine says it sees: a joint whose visibility (the third
value of its 2D keypoint) is below `min_visibility` is left out, and every angle that needs it is
None. MediaPipe still places joints it cannot see (the legs of a head-and-shoulders portrait), at
low visibility; an angle from those would be a guess presented as a measurement."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from pose_common.drawing import number_or

# Measured with MediaPipe: on the demo's head-and-shoulders portrait it guesses the ankles at visibility
# <= 0.61 (knees up to 0.84); the shared photo's legs are >= 0.95; the shared clip's small rider keeps a
# knee angle in 79 of the 82 frames it has at 0.5.
DEFAULT_MIN_VISIBILITY = 0.65
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


def joint_angles(names: Sequence[str], points_3d: Sequence[Sequence[Optional[float]]],
                 visibility: Optional[Sequence[Any]] = None,
                 min_visibility: float = DEFAULT_MIN_VISIBILITY) -> dict:
    """Degrees, from the engine's own joint names (first occurrence of each name). `visibility[i]` is
    joint i's visibility; without it every finite joint counts (an engine that gives none)."""
    points = seen_points(names, points_3d, visibility, min_visibility)
    p = points.get
    angles = {}
    for side in ("left", "right"):
        angles[f"{side}_knee"] = _angle(p(f"{side}_hip"), p(f"{side}_knee"), p(f"{side}_ankle"))
        # the thigh's direction is only trusted when the whole leg is seen: a knee guessed beside the
        # hips of a body cut off at the waist comes with a guessed ankle
        leg_seen = p(f"{side}_ankle") is not None
        angles[f"{side}_hip"] = _angle(p(f"{side}_shoulder"), p(f"{side}_hip"), p(f"{side}_knee")) if leg_seen \
            else None
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


def seen_points(names: Sequence[str], points_3d: Sequence[Sequence[Optional[float]]],
                visibility: Optional[Sequence[Any]], min_visibility: float) -> dict[str, list[float]]:
    """name -> finite 3D point, for the joints seen well enough."""
    points: dict[str, Optional[list[float]]] = {}
    for i, (name, point) in enumerate(zip(names, points_3d)):
        if name in points or not point or len(point) < 3:
            continue
        finite = [float(v) for v in point[:3] if isinstance(v, (int, float)) and math.isfinite(v)]
        if len(finite) < 3:  # a missing (None) or non-finite coordinate
            continue
        if visibility is not None and not is_seen(visibility[i] if i < len(visibility) else None, min_visibility):
            points[name] = None  # the first occurrence decides, seen or not
            continue
        points[name] = finite
    return {name: point for name, point in points.items() if point is not None}


def is_seen(value: Any, min_visibility: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= min_visibility


def visibilities(person: dict) -> Optional[list]:
    """Each joint's visibility, from the third value of its 2D keypoint (None where absent)."""
    keypoints = person.get("keypoints_2d")
    if not keypoints:
        return None
    return [kp[2] if kp and len(kp) > 2 else None for kp in keypoints]


def person_angles(person: dict, names: Sequence[str], min_visibility: float = DEFAULT_MIN_VISIBILITY) -> dict:
    """The angles of one engine person, from its 3D joints and its 2D keypoints' visibility."""
    return joint_angles(names, person.get("keypoints_3d") or [], visibilities(person), min_visibility)


def main_person(persons: list) -> Optional[dict]:
    """The person a single-person reader (the app reads one) is shown: the most confident."""
    return max(persons, key=lambda p: number_or(p.get("score"))) if persons else None
