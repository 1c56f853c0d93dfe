"""Pure conversions between PHALP's per-detection records and the service's Person dicts:
joint order, the padded square PHALP normalises 2D joints over, boxes, HMR2's crop camera."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

from gpu_worker.engines.base import Person

# engine-facts §3: OpenPose BODY_25, then the 19 SPIN-order joints of SMPL_to_J19, then PHALP's zero point
OPENPOSE_BODY25 = [
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "mid_hip", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee",
    "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear", "left_big_toe", "left_small_toe",
    "left_heel", "right_big_toe", "right_small_toe", "right_heel",
]
SPIN_EXTRA_19 = [
    "right_ankle_j19", "right_knee_j19", "right_hip_j19", "left_hip_j19", "left_knee_j19",
    "left_ankle_j19", "right_wrist_j19", "right_elbow_j19", "right_shoulder_j19",
    "left_shoulder_j19", "left_elbow_j19", "left_wrist_j19", "neck_lsp", "head_top_lsp",
    "pelvis_mpii", "thorax_mpii", "spine_h36m", "jaw_h36m", "head_h36m",
]
JOINT_NAMES = OPENPOSE_BODY25 + SPIN_EXTRA_19 + ["smpl_origin"]

HMR2_FOCAL_PX = 5000.0  # focal length HMR2 and PHALP assume for a 256-px square crop
HMR2_CROP_PX = 256
HMR2_BBOX_SHAPE = (192, 256)  # track.py's expand_bbox_shape: boxes are padded to this aspect
SMPL_FACES = 13776


def rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    """PHALP and detectron2 read frames the way cv2.imread returns them."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb[:, :, ::-1])


def padded_square(height: int, width: int) -> tuple[int, int, int]:
    """(side, left, top) of the centred square PHALP pads every frame into (PHALP.track's measurments)."""
    side = max(height, width)
    return side, (side - width) // 2, (side - height) // 2


def frame_measurements(height: int, width: int) -> list[int]:
    side, left, top = padded_square(height, width)
    return [height, width, side, left, top]


def full_frame_focal(height: int, width: int) -> float:
    return HMR2_FOCAL_PX / HMR2_CROP_PX * max(height, width)


def joints_2d_to_pixels(joints_2d: np.ndarray, height: int, width: int) -> np.ndarray:
    """PHALP's (90,) interleaved x,y in [0,1] of the padded square -> (45,2) image pixels."""
    side, left, top = padded_square(height, width)
    xy = np.asarray(joints_2d, dtype=np.float64).reshape(-1, 2) * side
    return xy - np.array([left, top], dtype=np.float64)


def pixels_to_joints_2d(joints_px: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of joints_2d_to_pixels: (J,2) pixels -> (2J,) float32 in PHALP's convention."""
    side, left, top = padded_square(height, width)
    xy = (np.asarray(joints_px, dtype=np.float64)[:, :2] + np.array([left, top])) / side
    return xy.reshape(-1).astype(np.float32)


def xywh_to_xyxy(bbox: Sequence[float]) -> list[float]:
    x0, y0, w, h = (float(v) for v in bbox[:4])
    return [x0, y0, x0 + w, y0 + h]


def xyxy_to_xywh(bbox: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in bbox[:4])
    return [x0, y0, x1 - x0, y1 - y0]


def crop_camera_to_full(cam_crop: np.ndarray, box_center: np.ndarray, box_size: np.ndarray,
                        height: int, width: int) -> np.ndarray:
    """HMR2's weak-perspective crop camera [s,tx,ty] -> camera translation [tx,ty,tz] in metres
    for the full image, with focal full_frame_focal and the principal point at the image centre."""
    cam_crop = np.atleast_2d(np.asarray(cam_crop, dtype=np.float64))
    centre = np.atleast_2d(np.asarray(box_center, dtype=np.float64))
    size = np.asarray(box_size, dtype=np.float64).reshape(-1)
    scaled = size * cam_crop[:, 0] + 1e-9
    tz = 2.0 * full_frame_focal(height, width) / scaled
    tx = 2.0 * (centre[:, 0] - width / 2.0) / scaled + cam_crop[:, 1]
    ty = 2.0 * (centre[:, 1] - height / 2.0) / scaled + cam_crop[:, 2]
    return np.stack([tx, ty, tz], axis=-1)


def project_to_image(points: np.ndarray, translation: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pinhole projection of body-frame points (J,3) moved by the camera translation."""
    cam = np.asarray(points, dtype=np.float64) + np.asarray(translation, dtype=np.float64)[None, :]
    focal = full_frame_focal(height, width)
    depth = np.where(np.abs(cam[:, 2:3]) < 1e-9, 1e-9, cam[:, 2:3])
    return focal * cam[:, :2] / depth + np.array([width / 2.0, height / 2.0])


def with_origin_joint(joints_3d: np.ndarray) -> np.ndarray:
    """HMR2 returns 44 joints; PHALP appends the SMPL origin as the 45th."""
    joints = np.asarray(joints_3d, dtype=np.float32).reshape(-1, 3)
    if joints.shape[0] == len(JOINT_NAMES):
        return joints
    return np.concatenate([joints, np.zeros((1, 3), dtype=np.float32)], axis=0)


def smpl_to_lists(smpl: Mapping[str, Any]) -> dict[str, list]:
    return {
        "global_orient": np.asarray(smpl["global_orient"], dtype=np.float32).reshape(1, 3, 3).tolist(),
        "body_pose": np.asarray(smpl["body_pose"], dtype=np.float32).reshape(23, 3, 3).tolist(),
        "betas": np.asarray(smpl["betas"], dtype=np.float32).reshape(-1).tolist(),
    }


def camera_dict(translation: ArrayLike, height: int, width: int) -> dict[str, float]:
    tx, ty, tz = (float(v) for v in np.asarray(translation).reshape(-1)[:3])
    return {"tx": tx, "ty": ty, "tz": tz, "focal_length": full_frame_focal(height, width),
            "cx": width / 2.0, "cy": height / 2.0}


def make_person(track_id: int, score: float, bbox_xyxy: Sequence[float], joints_px: np.ndarray,
                joints_3d: np.ndarray, smpl: Mapping[str, Any], translation: ArrayLike,
                camera_bbox: ArrayLike, height: int, width: int,
                vertices: Optional[np.ndarray] = None) -> Person:
    person: Person = {
        "track_id": int(track_id),
        "score": round(float(score), 4),
        "bbox_xyxy": [round(float(v), 2) for v in bbox_xyxy],
        "keypoints_2d": [[round(float(x), 2), round(float(y), 2), 1.0] for x, y in np.asarray(joints_px)[:, :2]],
        "keypoints_3d": [[round(float(v), 5) for v in joint] for joint in np.asarray(joints_3d, dtype=np.float64)],
        "smpl": smpl_to_lists(smpl),
        "camera": camera_dict(translation, height, width),
        "camera_bbox": [float(v) for v in np.asarray(camera_bbox).reshape(-1)[:3]],
    }
    if vertices is not None:
        person["vertices"] = np.round(np.asarray(vertices, dtype=np.float32).reshape(-1, 3), 5).tolist()
    return person


def person_from_detection(track_id: int, det: Mapping[str, Any]) -> Person:
    """One PHALP detection record (Detection.detection_data, as kept in a track's history)."""
    height, width = (int(v) for v in det["size"])
    return make_person(
        track_id=track_id, score=float(det["conf"]), bbox_xyxy=xywh_to_xyxy(det["bbox"]),
        joints_px=joints_2d_to_pixels(det["2d_joints"], height, width),
        joints_3d=with_origin_joint(det["3d_joints"]), smpl=det["smpl"],
        translation=det["camera"], camera_bbox=det["camera_bbox"], height=height, width=width,
        vertices=det.get("vertices"))
