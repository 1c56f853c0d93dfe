"""Issue 22 item 4: a joint angle comes only from joints the engine sees. Landmarks with known
visibility: an angle whose three joints are all seen is computed; one whose joint is seen below
the threshold is None (null in JSON), whatever its 3D position says."""
from __future__ import annotations

import math

import pytest

from gateway.legacy_shapes import hybrid_response, legacy_result
from pose_common.angles import DEFAULT_MIN_VISIBILITY, joint_angles, person_angles

NAMES = ["left_shoulder", "left_hip", "left_knee", "left_ankle", "right_shoulder", "right_hip", "right_knee",
         "right_ankle", "left_elbow", "left_wrist", "right_elbow", "right_wrist"]
# a standing body with a right angle at each knee (metres, y down)
POINTS = {"left_shoulder": (0.2, -0.5, 0), "left_hip": (0.1, 0, 0), "left_knee": (0.1, 0.45, 0),
          "left_ankle": (0.1, 0.45, 0.45), "right_shoulder": (-0.2, -0.5, 0), "right_hip": (-0.1, 0, 0),
          "right_knee": (-0.1, 0.45, 0), "right_ankle": (-0.1, 0.45, 0.45), "left_elbow": (0.3, -0.2, 0),
          "left_wrist": (0.3, 0.1, 0), "right_elbow": (-0.3, -0.2, 0), "right_wrist": (-0.3, 0.1, 0)}


def person(visibility: dict[str, float]) -> dict:
    return {"score": 0.9, "keypoints_3d": [list(POINTS[n]) for n in NAMES],
            "keypoints_2d": [[100.0 + i, 200.0 + i, visibility.get(n, 0.99)] for i, n in enumerate(NAMES)]}


def test_every_joint_seen_gives_every_angle():
    angles = person_angles(person({}), NAMES)
    assert angles["left_knee"] == pytest.approx(90.0) and angles["right_knee"] == pytest.approx(90.0)
    assert all(isinstance(angles[k], float) for k in ("left_hip", "right_hip", "left_elbow", "spine"))


@pytest.mark.parametrize("hidden", ["left_ankle", "left_knee", "left_hip"])
def test_an_angle_needing_an_unseen_joint_is_none_and_the_others_stay(hidden):
    angles = person_angles(person({hidden: 0.2}), NAMES)
    assert angles["left_knee"] is None
    assert angles["right_knee"] == pytest.approx(90.0)
    assert angles["left_hip"] is None  # the hip angle needs the whole leg seen, down to the ankle
    assert angles["right_hip"] is not None
    assert (angles["spine"] is None) == (hidden == "left_hip")


def test_the_threshold_is_the_boundary():
    at = person({"left_ankle": DEFAULT_MIN_VISIBILITY})
    below = person({"left_ankle": math.nextafter(DEFAULT_MIN_VISIBILITY, 0)})
    assert person_angles(at, NAMES)["left_knee"] == pytest.approx(90.0)
    assert person_angles(below, NAMES)["left_knee"] is None
    assert person_angles(below, NAMES, min_visibility=0.1)["left_knee"] == pytest.approx(90.0)


def test_a_missing_or_non_finite_visibility_is_not_seen():
    p = person({})
    p["keypoints_2d"][NAMES.index("left_ankle")] = [1.0, 2.0, None]
    assert person_angles(p, NAMES)["left_knee"] is None
    assert joint_angles(NAMES, p["keypoints_3d"])["left_knee"] == pytest.approx(90.0)  # no visibility given


def test_the_legacy_fields_follow_the_same_rule():
    legs_unseen = person({n: 0.05 for n in ("left_knee", "right_knee", "left_ankle", "right_ankle")})
    body = hybrid_response({"persons": [legs_unseen], "joint_names": NAMES, "width": 640, "height": 360},
                           frame_number=3, processing_ms=1.0)
    angles = body["joint_angles_3d"]
    assert [angles[k] for k in ("left_knee", "right_knee", "left_hip", "right_hip")] == [None] * 4
    assert isinstance(angles["left_elbow"], float) and isinstance(angles["spine"], float)
    native = {"video": {"fps": 30.0, "width": 640, "height": 360}, "joint_names": NAMES,
              "frames": [{"frame_index": 0, "pts_s": 0.0, "persons": [legs_unseen]},
                         {"frame_index": 1, "pts_s": 0.033, "persons": [person({})]}]}
    timeline = legacy_result(native, 1.0)["pose_timeline"]
    assert timeline[0]["jointAngles"]["left_knee"] is None
    assert timeline[1]["jointAngles"]["left_knee"] == pytest.approx(90.0)
