"""Write a native pose-service result as a PHALP-style pickle, so tools written for 4D-Humans'
track.py output (e.g. a pickle_parser that iterates dict.values() and reads tid, conf, smpl,
camera) keep working.

Layout (PHALP.track's final_visuals_dic): a dict keyed by frame name ("000001.jpg"...) in
processing order; per frame the scalars time/shot/frame_path and per-track lists aligned with
"tid". Only observed persons exist in a native result, so tracked_time is always 0 and no "ghost"
entries are written; the detector's masks are not stored, so "mask" holds an empty list per person.
Every other value has the type (and dtype) PHALP.track() writes: the upstream tier compares the two
files. Written with the plain pickle module (PHALP uses joblib with compression; joblib.load and
pickle.load both read a plain pickle).
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping, Sequence

import numpy as np

ORIGIN_JOINT_COUNT = 45
HMR2_BBOX_ASPECT = (192, 256)
FOCAL_PER_PIXEL_OF_SIDE = 5000.0 / 256.0


def frame_key(frame_index: int) -> str:
    return f"{int(frame_index) + 1:06d}.jpg"


def padded_square(height: int, width: int) -> tuple[int, int, int]:
    side = max(height, width)
    return side, (side - width) // 2, (side - height) // 2


def normalised_joints_2d(keypoints_px: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """(J,2+) image pixels -> (2J,) float32, x,y interleaved in [0,1] of the centred padded square."""
    side, left, top = padded_square(height, width)
    xy = np.asarray([p[:2] for p in keypoints_px], dtype=np.float64)
    return ((xy + np.array([left, top])) / side).reshape(-1).astype(np.float32)


def origin_in_pixels(camera: Mapping[str, float], height: int, width: int) -> list[float]:
    focal = float(camera.get("focal_length") or FOCAL_PER_PIXEL_OF_SIDE * max(height, width))
    tz = float(camera["tz"]) if abs(float(camera["tz"])) > 1e-9 else 1e-9
    return [focal * float(camera["tx"]) / tz + width / 2.0, focal * float(camera["ty"]) / tz + height / 2.0]


def joints_45(person: Mapping[str, Any], height: int, width: int) -> tuple[np.ndarray, list]:
    """PHALP always has 45 joints, the last one the SMPL origin; HMR2-only results have 44."""
    joints_3d = np.asarray(person["keypoints_3d"], dtype=np.float32).reshape(-1, 3)
    joints_2d = [list(p[:2]) for p in person["keypoints_2d"]]
    if joints_3d.shape[0] == ORIGIN_JOINT_COUNT - 1:
        joints_3d = np.concatenate([joints_3d, np.zeros((1, 3), dtype=np.float32)])
    if len(joints_2d) == ORIGIN_JOINT_COUNT - 1:
        joints_2d.append(origin_in_pixels(person["camera"], height, width) if person.get("camera") else [0.0, 0.0])
    return joints_3d, joints_2d


def padded_box(bbox_xyxy: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Centre and (w,h) of the box grown to HMR2's 192:256 aspect, as PHALP crops it."""
    x0, y0, x1, y1 = (float(v) for v in bbox_xyxy[:4])
    w, h = x1 - x0, y1 - y0
    aspect_w, aspect_h = HMR2_BBOX_ASPECT
    if w * aspect_h > h * aspect_w:
        h = w * aspect_h / aspect_w
    else:
        w = h * aspect_w / aspect_h
    return np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0]), np.array([w, h])


def smpl_arrays(smpl: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {
        "global_orient": np.asarray(smpl["global_orient"], dtype=np.float32).reshape(1, 3, 3),
        "body_pose": np.asarray(smpl["body_pose"], dtype=np.float32).reshape(23, 3, 3),
        "betas": np.asarray(smpl["betas"], dtype=np.float32).reshape(-1),
    }


def camera_array(camera: Mapping[str, float] | None) -> np.ndarray:
    if not camera:
        return np.zeros(3, dtype=np.float32)
    return np.array([camera["tx"], camera["ty"], camera["tz"]], dtype=np.float32)


PER_TRACK_KEYS = ("tid", "bbox", "tracked_time", "smpl", "3d_joints", "2d_joints", "camera", "camera_bbox",
                  "conf", "center", "scale", "size", "class_name", "mask", "annotations", "extra_data",
                  "img_path", "img_name")


def frame_record(frame: Mapping[str, Any], time: int, height: int, width: int) -> dict[str, Any]:
    name = frame_key(frame["frame_index"])
    record: dict[str, Any] = {"time": time, "shot": 0, "frame_path": name}
    for key in PER_TRACK_KEYS + ("tracked_ids", "tracked_bbox"):
        record[key] = []
    for slot, person in enumerate(frame.get("persons") or []):
        if not person.get("smpl"):
            raise ValueError(
                f"frame {frame['frame_index']}: person {person.get('track_id')} has no SMPL parameters; "
                "a PHALP pickle needs an SMPL engine's result (hmr2_phalp), not a landmark-only one "
                "such as mediapipe")
        bbox_xywh = np.array(_xyxy_to_xywh(person["bbox_xyxy"]), dtype=np.float32)
        joints_3d, joints_2d = joints_45(person, height, width)
        centre, wh = padded_box(person["bbox_xyxy"])
        values = {
            "tid": int(person["track_id"]),
            "bbox": bbox_xywh,
            "tracked_time": 0,
            "smpl": smpl_arrays(person["smpl"]),
            "3d_joints": joints_3d,
            "2d_joints": normalised_joints_2d(joints_2d, height, width),
            "camera": camera_array(person.get("camera")),
            "camera_bbox": np.asarray(person.get("camera_bbox") or [0.0, 0.0, 0.0], dtype=np.float32),
            "conf": np.float32(person.get("score", 1.0)),
            "center": centre.astype(np.float32),
            "scale": float(wh.max() / max(height, width)),
            "size": [height, width],
            "class_name": np.int64(0),
            "mask": [],  # the detector's RLE masks are not part of a native result
            "annotations": [],
            "extra_data": slot,
            "img_path": name,
            "img_name": name,
        }
        for key in PER_TRACK_KEYS:
            record[key].append(values[key])
        record["tracked_ids"].append(values["tid"])
        record["tracked_bbox"].append(bbox_xywh.copy())
    return record


def _xyxy_to_xywh(bbox: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in bbox[:4])
    return [x0, y0, x1 - x0, y1 - y0]


def to_phalp_dict(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    video = result.get("video") or {}
    height, width = int(video["height"]), int(video["width"])
    out: dict[str, dict[str, Any]] = {}
    for time, frame in enumerate(result.get("frames") or []):
        out[frame_key(frame["frame_index"])] = frame_record(frame, time, height, width)
    return out


def write_phalp_pickle(result: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Converts first, so a result that cannot be expressed leaves no partial file behind."""
    data = to_phalp_dict(result)
    target = os.fspath(path)
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, target)
    return target
