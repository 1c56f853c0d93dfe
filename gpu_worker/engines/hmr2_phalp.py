"""HMR2 (4D-Humans) body regression tracked by PHALP, one frame at a time.

PHALP.track() is never called: it reads whole videos from disk, renders, swallows exceptions and
writes its pickle only at the end. This engine builds the same pieces stage by stage (HMR2 with
init_renderer=False; a PHALP subclass whose detector, visualizer, downloads and output folders are
switched off; the detector last) and drives detector -> HMR2 -> tracker itself per pushed frame.

PHALP appends a newly confirmed track to the previous n_init-1 frames, so frames are held back
until the tracker can no longer edit them. hmr2, phalp and detectron2 are imported only inside the
load stages: this module imports without them, and its bookkeeping is tested on recorded shapes.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from gpu_worker.engines import hmr2_assets
from gpu_worker.engines.base import Engine, FrameOut, LoadStage, Person
from gpu_worker.engines.roi import RiderSearch, min_detection_confidence
from gpu_worker.errors import WeightsMissing

log = logging.getLogger(__name__)

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

DEFAULTS: dict[str, Any] = {
    "detector": "vitdet",
    # ViTDet/RegNetY's own score threshold (PHALP's setup_detectron2 uses 0.5)
    "detector_score": 0.5,
    # LazyConfig overrides for the detector ("key=value", detectron2's LazyConfig.apply_overrides),
    # e.g. a smaller input or backbone; the weights file must fit the overridden model
    "detector_overrides": [],
    # PHALP tracks detections above low_th_c (0.8) wider than small_w (50 px) and taller than
    # small_h (100 px). Those drop a rider far from the camera in a 640x360 clip, so the defaults
    # here keep every person the detector reports (docs/hmr2-phalp.md, deviations)
    "low_th_c": 0.5,
    "small_w": 10,
    "small_h": 20,
    "n_init": 5,              # hits before a track is confirmed (and back-filled)
    "max_age_track": 50,
    "track_history": 7,
    "image_min_score": 0.5,   # demo.py's threshold for single images
    # "texture" (track.py's NMR texture sampler, CUDA only), "hmar" (PHALP's ResNet texture head,
    # any device) or "auto" (texture on CUDA, hmar on the CPU)
    "appearance": "auto",
    "video_vertices": False,  # 6890x3 per person per frame is large; images always get them
    "warm_up": True,
}
CACHE_OVERRIDES = {"cache_home": "HOME", "torch_home": "TORCH_HOME", "fvcore_cache": "FVCORE_CACHE"}


# ----------------------------------------------------------------------------------------------
# settings and environment


@dataclass
class Settings:
    detector: str
    detector_score: float
    detector_overrides: list[str]
    low_th_c: float
    small_w: int
    small_h: int
    n_init: int
    max_age_track: int
    track_history: int
    image_min_score: float
    appearance: str
    video_vertices: bool
    warm_up: bool
    env_overrides: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Settings":
        merged = {**DEFAULTS, **{k: v for k, v in options.items() if k in DEFAULTS}}
        settings = cls(
            detector=hmr2_assets.normalize_detector(merged["detector"]),
            detector_score=float(merged["detector_score"]),
            detector_overrides=[str(o) for o in merged["detector_overrides"] or []],
            low_th_c=float(merged["low_th_c"]), small_w=int(merged["small_w"]), small_h=int(merged["small_h"]),
            n_init=int(merged["n_init"]),
            max_age_track=int(merged["max_age_track"]), track_history=int(merged["track_history"]),
            image_min_score=float(merged["image_min_score"]), appearance=str(merged["appearance"]),
            video_vertices=bool(merged["video_vertices"]), warm_up=bool(merged["warm_up"]),
            env_overrides={var: str(options[key]) for key, var in CACHE_OVERRIDES.items() if options.get(key)})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.n_init < 1:
            raise ValueError("n_init must be at least 1")
        # PHALP back-fills from the track's history deque, which holds track_history entries
        if self.n_init > self.track_history:
            raise ValueError(f"n_init ({self.n_init}) must not exceed track_history ({self.track_history})")
        if self.appearance not in ("texture", "hmar", "auto"):
            raise ValueError("appearance must be 'texture', 'hmar' or 'auto'")

    @property
    def phalp_detector(self) -> str:
        return "vitdet" if self.detector == "vitdet" else "maskrcnn"

    def appearance_on(self, device_type: str) -> str:
        """The texture sampler's renderer (neural_renderer) is a CUDA extension."""
        if self.appearance == "auto":
            return "texture" if device_type == "cuda" else "hmar"
        if self.appearance == "texture" and device_type != "cuda":
            raise ValueError("appearance=texture needs CUDA (neural_renderer); use appearance=hmar on the CPU")
        return self.appearance

    def asset_options(self) -> dict[str, Any]:
        return {"detector": self.detector, "appearance": self.appearance}

    def environment(self, base: Mapping[str, str] = os.environ) -> dict[str, str]:
        return {**base, **self.env_overrides}


def apply_env_overrides(overrides: Mapping[str, str]) -> None:
    """hmr2 and phalp freeze $HOME/.cache at import time, so overrides must land before importing them."""
    for var, value in overrides.items():
        os.environ[var] = value


def asset_rows(settings: Settings, device_type: str, probe_only: bool = False) -> list[dict]:
    """The files these settings read, checked (hmr2_assets.check: the same for `models verify`)."""
    return hmr2_assets.check(settings.detector, settings.environment(), settings.appearance_on(device_type),
                             probe_only=probe_only)


def check_assets(settings: Settings, device_type: str, probe_only: bool = False) -> list[dict]:
    rows = asset_rows(settings, device_type, probe_only)
    if hmr2_assets.problems(rows):
        raise WeightsMissing("hmr2_phalp weights are not ready (nothing was downloaded; pre-seed the "
                             "caches, see docs/hmr2-phalp.md):\n" + hmr2_assets.describe_problems(rows))
    return rows


# ----------------------------------------------------------------------------------------------
# pure conversions between PHALP's per-detection records and the service's Person dicts


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


def camera_dict(translation: Sequence[float], height: int, width: int) -> dict[str, float]:
    tx, ty, tz = (float(v) for v in np.asarray(translation).reshape(-1)[:3])
    return {"tx": tx, "ty": ty, "tz": tz, "focal_length": full_frame_focal(height, width),
            "cx": width / 2.0, "cy": height / 2.0}


def make_person(track_id: int, score: float, bbox_xyxy: Sequence[float], joints_px: np.ndarray,
                joints_3d: np.ndarray, smpl: Mapping[str, Any], translation: Sequence[float],
                camera_bbox: Sequence[float], height: int, width: int,
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


# ----------------------------------------------------------------------------------------------
# holding frames back until PHALP can no longer edit them


class PendingFrames:
    """Frames the tracker may still add persons to, in push order.

    When a track reaches n_init hits at frame t, PHALP appends it to frames t-1 .. t-(n_init-1).
    So once frame t is tracked, every frame up to t-(n_init-1) is final."""

    def __init__(self, edit_window: int):
        self.edit_window = max(0, int(edit_window))
        self._frames: "OrderedDict[int, tuple[int, dict[int, Person]]]" = OrderedDict()
        self.late_edits = 0

    def __len__(self) -> int:
        return len(self._frames)

    def open(self, seq: int, index: int) -> None:
        self._frames[seq] = (index, {})

    def add(self, seq: int, person: Person) -> None:
        slot = self._frames.get(seq)
        if slot is None:
            # the frame was already emitted (or never pushed): its result can no longer change
            self.late_edits += 1
            log.warning("tracker edited frame %s after it was emitted; edit dropped", seq)
            return
        slot[1][int(person["track_id"])] = person

    def pop_final(self, latest_seq: int) -> list[FrameOut]:
        out = []
        while self._frames:
            seq = next(iter(self._frames))
            if seq > latest_seq - self.edit_window:
                break
            out.append(self._emit(seq))
        return out

    def flush(self) -> list[FrameOut]:
        return [self._emit(seq) for seq in list(self._frames)]

    def _emit(self, seq: int) -> FrameOut:
        index, persons = self._frames.pop(seq)
        return FrameOut(index, [persons[tid] for tid in sorted(persons)])


@dataclass
class TrackView:
    """What the engine needs from one confirmed PHALP track after a frame's update."""
    track_id: int
    hits: int
    time_since_update: int
    history: list  # the last n_init detection records, oldest first


def view_track(track: Any, n_init: int) -> TrackView:
    history = list(track.track_data["history"])[-n_init:]
    return TrackView(int(track.track_id), int(track.hits), int(track.time_since_update), history)


def prune_tracker_history(tracker: Any) -> None:
    """deep_sort's Tracker keeps every frame's cost matrices in tracked_cost (read only when PHALP
    dumps ground-truth distances); everything else it holds is bounded per live track."""
    cost = getattr(tracker, "tracked_cost", None)
    if cost:
        cost.clear()


def track_step(tracker: Any, detections: list, seq: int, frame_name: str, n_init: int,
               shot: int = 0) -> list[TrackView]:
    """One PHALP tracker update, as in PHALP.track's loop, returning the confirmed tracks."""
    tracker.predict()
    tracker.update(detections, seq, frame_name, shot)
    prune_tracker_history(tracker)
    return [view_track(track, n_init) for track in tracker.tracks if track.is_confirmed()]


def record_tracks(pending: PendingFrames, seq: int, views: list[TrackView], n_init: int,
                  to_person: Callable[[int, Mapping[str, Any]], Person] = person_from_detection) -> None:
    """PHALP's bookkeeping for one frame: observed confirmed tracks go to this frame; a track
    confirmed just now (hits == n_init) is also back-filled into the frames it was tentative in.
    Each history entry goes to the frame it was detected in (its own "time"), not to seq minus its
    position: a retried frame or a miss inside the history cannot shift it onto another frame."""
    for view in views:
        if view.time_since_update != 0:
            continue  # a "ghost": predicted, not seen in this frame
        pending.add(seq, to_person(view.track_id, view.history[-1]))
        if view.hits != n_init:
            continue
        for entry in view.history[-n_init:-1]:
            seen_at = int(entry.get("time", -1))
            if 0 <= seen_at < seq:
                pending.add(seen_at, to_person(view.track_id, entry))


def frame_name_for(seq: int) -> str:
    return f"{seq + 1:06d}.jpg"


def person_boxes(instances: Any, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Person (COCO class 0) boxes xyxy and scores from detectron2 Instances."""
    classes = instances.pred_classes.cpu().numpy()
    scores = instances.scores.cpu().numpy()
    boxes = instances.pred_boxes.tensor.cpu().numpy()
    keep = (classes == 0) & (scores > min_score)
    return boxes[keep].astype(np.float32), scores[keep].astype(np.float32)


@contextlib.contextmanager
def trusted_torch_load(device: Any = "cpu") -> Iterator[None]:
    """PHALP calls torch.load(path) with torch's default weights_only, which became True in torch
    2.6 and rejects these (trusted, locally verified) checkpoints, and without map_location, which
    fails on a machine without CUDA when a file holds CUDA tensors. Scoped to the load stages."""
    import torch

    previous = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    original = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("map_location", device)
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
        if previous is None:
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = previous


@contextlib.contextmanager
def cuda_calls_on(device: Any) -> Iterator[None]:
    """PHALP hard-codes tensor.cuda() in get_human_features, get_uv_distance and its pose
    predictor. On a CUDA device the runtime stage made the engine's device the current one, so
    .cuda() already lands there; on the CPU, .cuda() inside these calls stays on the CPU."""
    if device is None or device.type == "cuda":
        yield
        return
    import torch

    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = original


VIT_SIZE_KEYS = ("EMBED_DIM", "DEPTH", "NUM_HEADS")


@contextlib.contextmanager
def backbone_sized_by(model_cfg: Any) -> Iterator[None]:
    """hmr2's vit(cfg) always builds ViT-H (embed 1280, depth 32, 16 heads). A model_config.yaml
    that names MODEL.BACKBONE.EMBED_DIM / DEPTH / NUM_HEADS gets the same ViT class at that size
    (the test tier's small random checkpoints, docs/hmr2-phalp.md); the released config names none
    and gets upstream's vit(cfg) untouched."""
    backbone = model_cfg.MODEL.BACKBONE
    sizes = {key.lower(): int(backbone[key]) for key in VIT_SIZE_KEYS if key in backbone}
    if not sizes:
        yield
        return
    import hmr2.models.hmr2 as hmr2_module
    from hmr2.models.backbones.vit import ViT

    def sized_vit(cfg: Any) -> Any:
        # vit(cfg)'s other arguments, unchanged
        arguments = dict(img_size=(256, 192), patch_size=16, embed_dim=1280, depth=32, num_heads=16, ratio=1,
                         use_checkpoint=False, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.55)
        return ViT(**{**arguments, **sizes})

    original = hmr2_module.create_backbone
    hmr2_module.create_backbone = sized_vit
    try:
        yield
    finally:
        hmr2_module.create_backbone = original


# ----------------------------------------------------------------------------------------------
# the engine


class HMR2PhalpEngine(Engine):
    name = "hmr2_phalp"
    joint_names = JOINT_NAMES

    def __init__(self, device: str, options: dict[str, Any]):
        super().__init__(device, options)
        self.settings = Settings.from_options(self.options)
        self._torch: Any = None
        self._torch_device: Any = None
        self._hmr2: Any = None
        self._hmr2_cfg: Any = None
        self._phalp: Any = None
        self._detector: Optional[Callable[[np.ndarray], dict]] = None
        # the per-frame steps, swappable so the bookkeeping can be tested without the models
        self.describe_frame: Callable[[np.ndarray, int, str], list] = self._describe_frame_with_phalp
        self.track_frame: Callable[[list, int, str], list[TrackView]] = self._track_frame_with_phalp
        self._pending = PendingFrames(self.settings.n_init - 1)
        self._seq = 0
        self._open: Optional[tuple[int, int]] = None  # (index, seq) of the frame being pushed

    @property
    def device_type(self) -> str:
        return "cuda" if str(self.device).startswith("cuda") else "cpu"

    @property
    def appearance(self) -> str:
        return self.settings.appearance_on(self.device_type)

    @property
    def version(self) -> str:
        parts = [f"detector={self.settings.detector}", f"n_init={self.settings.n_init}"]
        if self._torch is not None:
            parts.insert(0, f"torch={self._torch.__version__}")
        return " ".join(parts)

    # -- load stages -----------------------------------------------------------------------------

    def stages(self) -> list[LoadStage]:
        return [LoadStage("runtime", self._load_runtime), LoadStage("weights", self._check_weights),
                LoadStage("main_model", self._load_hmr2), LoadStage("tracker", self._build_tracker),
                LoadStage("detector", self._build_detector)]

    def probe_stages(self) -> list[LoadStage]:
        # the probe process must not pay for the 3 GB HMR2 nor the tracker
        return [LoadStage("runtime", self._load_runtime),
                LoadStage("weights", lambda: self._check_weights(probe_only=True)),
                LoadStage("detector", self._build_detector)]

    def _load_runtime(self) -> None:
        apply_env_overrides(self.settings.env_overrides)
        self.settings.appearance_on(self.device_type)  # texture on the CPU: say so before loading anything
        import torch

        wants_cuda = self.device_type == "cuda"
        # under WSL is_available() can hang; the supervisor's deadline for this stage covers that
        if wants_cuda and not torch.cuda.is_available():
            raise RuntimeError(f"engine.device={self.device} but torch {torch.__version__} sees no CUDA device")
        self._torch = torch
        self._torch_device = torch.device(self.device if wants_cuda else "cpu")
        if wants_cuda:
            # PHALP's .cuda() calls mean "the current device": make that the configured one (cuda:1 ...)
            torch.cuda.set_device(self._torch_device)
            torch.zeros(1, device=self._torch_device)  # creates the CUDA context now, not on frame 0

    def _check_weights(self, probe_only: bool = False) -> None:
        check_assets(self.settings, self.device_type, probe_only=probe_only)

    def _load_hmr2(self) -> None:
        """hmr2.models.load_hmr2, minus its renderer: load_hmr2 cannot pass init_renderer=False."""
        from pathlib import Path

        from hmr2.configs import get_config
        from hmr2.models import DEFAULT_CHECKPOINT, HMR2, check_smpl_exists

        model_cfg = get_config(str(Path(DEFAULT_CHECKPOINT).parent.parent / "model_config.yaml"),
                               update_cachedir=True)
        if model_cfg.MODEL.BACKBONE.TYPE == "vit" and "BBOX_SHAPE" not in model_cfg.MODEL:
            model_cfg.defrost()
            model_cfg.MODEL.BBOX_SHAPE = list(HMR2_BBOX_SHAPE)
            model_cfg.freeze()
        check_smpl_exists()
        kwargs: dict[str, Any] = {"strict": False, "cfg": model_cfg, "init_renderer": False,
                                  "map_location": "cpu"}
        if "weights_only" in inspect.signature(HMR2.load_from_checkpoint).parameters:
            kwargs["weights_only"] = False
        with trusted_torch_load(), backbone_sized_by(model_cfg):
            model = HMR2.load_from_checkpoint(DEFAULT_CHECKPOINT, **kwargs)
        self._hmr2 = model.to(self._torch_device).eval()
        self._hmr2_cfg = model_cfg

    def _build_tracker(self) -> None:
        cfg = build_phalp_config(self.settings, str(self._torch_device))
        with trusted_torch_load(self._torch_device):
            self._phalp = build_streaming_phalp(cfg, self._hmr2, self.settings, self.appearance)
        self._phalp.setup_deepsort()
        if self._detector is not None:
            self._phalp.detector = self._detector

    def _build_detector(self) -> None:
        if self.settings.detector == "mediapipe":
            self._detector = MediaPipePersonDetector(self.options)
        else:
            weights = hmr2_assets.detector_weights_path(self.settings.detector, self.settings.environment())
            self._detector = build_detector(self.settings, weights, self._torch_device)
        if self._phalp is not None:
            self._phalp.detector = self._detector
        if self.settings.warm_up:
            with self._torch.no_grad():
                self._detector(np.zeros((256, 320, 3), dtype=np.uint8))

    # -- video -----------------------------------------------------------------------------------

    def begin_video(self, width: int, height: int, fps: float) -> None:
        if self._phalp is not None:
            self._phalp.setup_deepsort()  # a fresh deep_sort Tracker; the models stay
        if isinstance(self._detector, MediaPipePersonDetector):
            self._detector.begin_video()
        self._pending = PendingFrames(self.settings.n_init - 1)
        self._seq = 0
        self._open = None

    def push(self, index: int, pts_s: float, rgb: np.ndarray) -> list[FrameOut]:
        """Safe to call again for the same frame after it raised (the worker retries a frame once
        after a CUDA out-of-memory): the frame keeps its place in the sequence and is emitted once."""
        if self._open is not None and self._open[0] == index:
            seq = self._open[1]  # a retry: the failed attempt never reached the tracker's bookkeeping
        else:
            seq = self._seq
            self._seq += 1
        self._open = (index, seq)
        self._pending.open(seq, index)
        bgr = rgb_to_bgr(rgb)
        frame_name = frame_name_for(seq)
        with self._no_grad():
            detections = self.describe_frame(bgr, seq, frame_name)
            views = self.track_frame(detections, seq, frame_name)
        record_tracks(self._pending, seq, views, self.settings.n_init)
        self._open = None
        return self._pending.pop_final(seq)

    def end_video(self) -> list[FrameOut]:
        return self._pending.flush()

    def _no_grad(self) -> contextlib.AbstractContextManager:
        return self._torch.no_grad() if self._torch is not None else contextlib.nullcontext()

    def _describe_frame_with_phalp(self, bgr: np.ndarray, seq: int, frame_name: str) -> list:
        """Detector -> HMR2 (+ appearance) for one frame, through PHALP's own methods."""
        phalp = self._phalp
        if phalp is None:
            raise RuntimeError("the tracker stage has not run")
        measurements = frame_measurements(*bgr.shape[:2])
        phalp.cfg.phalp.shot = 0
        (bbox, bbox_pad, masks, scores, classes, gt_tids, gt_annots) = phalp.get_detections(
            bgr, frame_name, seq, {}, measurements)
        extra = phalp.run_additional_models(bgr, bbox, masks, scores, classes, frame_name, seq,
                                            measurements, gt_tids, gt_annots)
        return phalp.get_human_features(bgr, masks, bbox, bbox_pad, scores, frame_name, classes, seq,
                                        measurements, gt_tids, gt_annots, extra)

    def _track_frame_with_phalp(self, detections: list, seq: int, frame_name: str) -> list[TrackView]:
        return track_step(self._phalp.tracker, detections, seq, frame_name, self.settings.n_init)

    # -- single image ----------------------------------------------------------------------------

    def infer_image(self, rgb: np.ndarray) -> list[Person]:
        """demo.py's path: detector -> HMR2 on ViTDet-style crops; no tracker state is touched."""
        bgr = rgb_to_bgr(rgb)
        height, width = bgr.shape[:2]
        with self._no_grad():
            instances = self._detector.single_image(bgr)["instances"] \
                if isinstance(self._detector, MediaPipePersonDetector) else self._detector(bgr)["instances"]
            boxes, scores = person_boxes(instances, self.settings.image_min_score)
            if len(boxes) == 0:
                return []
            outputs = self._run_hmr2_on_boxes(bgr, boxes)
        persons = []
        for i, out in enumerate(outputs):
            translation = crop_camera_to_full(out["pred_cam"], out["box_center"], out["box_size"],
                                              height, width)[0]
            joints_3d = with_origin_joint(out["pred_keypoints_3d"])
            persons.append(make_person(
                track_id=i + 1, score=float(scores[i]), bbox_xyxy=boxes[i],
                joints_px=project_to_image(joints_3d, translation, height, width),
                joints_3d=joints_3d, smpl=out["pred_smpl_params"], translation=translation,
                camera_bbox=out["pred_cam"], height=height, width=width, vertices=out["pred_vertices"]))
        return persons

    def _run_hmr2_on_boxes(self, bgr: np.ndarray, boxes: np.ndarray) -> list[dict[str, np.ndarray]]:
        torch = self._torch
        from hmr2.datasets.vitdet_dataset import ViTDetDataset

        dataset = ViTDetDataset(self._hmr2_cfg, bgr, boxes)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False, num_workers=0)
        results: list[dict[str, np.ndarray]] = []
        with contextlib.redirect_stdout(io.StringIO()):  # ViTDetDataset prints once per crop
            batches = list(loader)
        for batch in batches:
            batch = {k: (v.to(self._torch_device) if hasattr(v, "to") else v) for k, v in batch.items()}
            out = self._hmr2(batch)
            for n in range(batch["img"].shape[0]):
                results.append({
                    "pred_cam": out["pred_cam"][n].cpu().numpy(),
                    "pred_smpl_params": {k: v[n].cpu().numpy() for k, v in out["pred_smpl_params"].items()},
                    "pred_keypoints_3d": out["pred_keypoints_3d"][n].cpu().numpy(),
                    "pred_vertices": out["pred_vertices"][n].cpu().numpy(),
                    "box_center": batch["box_center"][n].float().cpu().numpy(),
                    "box_size": np.asarray(batch["box_size"][n].float().cpu().numpy()),
                })
        return results

    def mesh_faces(self) -> Optional[np.ndarray]:
        """SMPL triangles (13776x3), or None before the main model is loaded."""
        if self._hmr2 is None:
            return None
        return np.asarray(self._hmr2.smpl.faces, dtype=np.int64).reshape(-1, 3)

    def close(self) -> None:
        self._phalp = None
        self._detector = None
        self._hmr2 = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "detector": self.settings.detector, "n_init": self.settings.n_init,
                "appearance": self.appearance}


# ----------------------------------------------------------------------------------------------
# builders that need hmr2 / phalp / detectron2 (see docs/hmr2-phalp.md)


def build_phalp_config(settings: Settings, device: str) -> Any:
    """phalp.configs.base.FullConfig with rendering off and this engine's tracking options."""
    from omegaconf import OmegaConf
    from phalp.configs.base import FullConfig

    cfg = OmegaConf.structured(FullConfig)
    cfg.video.source = "<frames pushed by pose-service>"
    cfg.device = device
    cfg.render.enable = False
    cfg.detect_shots = False
    cfg.use_gt = False
    cfg.phalp.detector = settings.phalp_detector
    cfg.phalp.low_th_c = settings.low_th_c
    cfg.phalp.small_w = settings.small_w
    cfg.phalp.small_h = settings.small_h
    cfg.phalp.n_init = settings.n_init
    cfg.phalp.max_age_track = settings.max_age_track
    cfg.phalp.track_history = settings.track_history
    return cfg


def build_streaming_phalp(cfg: Any, hmr2_model: Any, settings: Settings, appearance: str) -> Any:
    """A PHALP whose HMAR is HMR2 (as track.py's HMR2_4dhuman), built without detector, visualizer,
    downloads or output folders, whose .cuda()-calling methods run on the engine's device."""
    from hmr2.datasets.utils import expand_bbox_to_aspect_ratio
    from phalp.trackers.PHALP import PHALP

    adapter_class = hmr2_hmar_adapter_class()

    class StreamingPHALP(PHALP):
        def cached_download_from_drive(self, additional_urls=None):
            pass  # the weights stage verified every file; never wget into the CWD

        def setup_hmr(self):
            self.HMAR = adapter_class(self.cfg, hmr2_model, appearance)

        def setup_detectron2(self):
            self.detector = None  # built by the engine's "detector" stage; the X101 is never built

        def setup_visualizer(self):
            self.visualizer = None  # no renderer, no OpenGL context

        def default_setup(self):
            pass  # PHALP.track's output folders are not used

        def get_detections(self, image, frame_name, t_, additional_data=None, measurments=None):
            found = super().get_detections(image, frame_name, t_, additional_data or {}, measurments)
            bbox, _, masks, scores, classes, gt_tids, gt_annots = found
            padded = expand_bbox_to_aspect_ratio(bbox, HMR2_BBOX_SHAPE)
            return bbox, padded, masks, scores, classes, gt_tids, gt_annots

        def get_human_features(self, *args, **kwargs):
            with cuda_calls_on(self.device):
                detections = super().get_human_features(*args, **kwargs)
            vertices = getattr(self.HMAR, "last_vertices", None)
            if settings.video_vertices and detections and vertices is not None:
                # detections follow the order of the crops HMAR just ran on
                for detection, verts in zip(detections, vertices):
                    detection.detection_data["vertices"] = verts.float().cpu().numpy()
            return detections

        def get_uv_distance(self, t_uv, d_uv):
            with cuda_calls_on(self.device):
                return super().get_uv_distance(t_uv, d_uv)

        def forward_for_tracking(self, vectors, attibute="A", time=1):
            with cuda_calls_on(self.device):
                return super().forward_for_tracking(vectors, attibute, time)

    return StreamingPHALP(cfg)


def hmr2_hmar_adapter_class() -> type:
    """Stands where PHALP expects its HMAR: HMR2 gives the body, PHALP's HMAR keeps giving the
    appearance encoder and 3D/2D joint computation (as in 4D-Humans' track.py)."""
    import torch
    import torch.nn.functional as F
    from phalp.configs.base import CACHE_DIR
    from phalp.models.hmar.hmr import HMR2018Predictor

    class HMR2AsHMAR(HMR2018Predictor):
        def __init__(self, cfg, hmr2_model, appearance: str):
            super().__init__(cfg)  # PHALP's HMAR: uv sampler, appearance autoencoder, SMPL (45 joints)
            self.model = hmr2_model
            self.appearance = appearance
            self.last_vertices = None
            if appearance == "texture":
                self._setup_texture_sampler(hmr2_model.smpl.faces)

        def _setup_texture_sampler(self, faces: np.ndarray) -> None:
            import neural_renderer

            uv_bary = np.load(os.path.join(CACHE_DIR, "phalp/3D/bmap_256.npy"))
            uv_face = np.load(os.path.join(CACHE_DIR, "phalp/3D/fmap_256.npy"))
            self.register_buffer("uv_bary", torch.tensor(uv_bary, dtype=torch.float))
            self.register_buffer("uv_face", torch.tensor(uv_face, dtype=torch.long))
            self.register_buffer("mesh_faces", torch.tensor(np.asarray(faces, dtype=np.int64)))
            self.depth_renderer = neural_renderer.Renderer(
                dist_coeffs=None, orig_size=HMR2_CROP_PX, image_size=HMR2_CROP_PX,
                light_intensity_ambient=1, light_intensity_directional=0, anti_aliasing=False)

        def forward(self, x):
            rgb, mask = x[:, :3], x[:, 3].clamp(0, 1)
            out = self.model({"img": rgb, "mask": mask})
            self.last_vertices = out["pred_vertices"]
            if self.appearance == "texture":
                uv_image = self._sample_texture(rgb, mask, out)
                uv_vector = self.hmar_old.process_uv_image(uv_image)
            else:
                # HMAR.forward already turned its uv image into the autoencoder's input, in place:
                # processing it again would make every texel count as visible
                appearance = self.hmar_old(x)
                uv_image, uv_vector = appearance["uv_image"], appearance["uv_vector"]
            return {"uv_image": uv_image, "uv_vector": uv_vector,
                    "pose_smpl": out["pred_smpl_params"], "pred_cam": out["pred_cam"]}

        def _sample_texture(self, rgb, mask, out):
            """Colour each texel of the SMPL uv atlas from the crop where that surface point is visible."""
            verts = out["pred_vertices"] + out["pred_cam_t"].unsqueeze(1)
            batch, device = verts.shape[0], verts.device
            texels = self.uv_face >= 0
            corners = verts[:, self.mesh_faces[self.uv_face[texels]]]            # B,N,3 corners,3
            points = (corners * self.uv_bary[texels][None, :, :, None]).sum(2)  # B,N,3
            grid = (HMR2_FOCAL_PX / (HMR2_CROP_PX / 2)) * points[..., :2] / points[..., 2:3]
            intrinsics = torch.tensor([[HMR2_FOCAL_PX, 0, HMR2_CROP_PX / 2], [0, HMR2_FOCAL_PX, HMR2_CROP_PX / 2],
                                       [0, 0, 1]], device=device, dtype=torch.float)[None]
            depth_map = self.depth_renderer(
                verts, self.mesh_faces[None].expand(batch, -1, -1).int(), mode="depth", K=intrinsics,
                R=torch.eye(3, device=device)[None], t=torch.zeros(1, 3, device=device))
            surface = F.grid_sample(depth_map[:, None], grid[:, None], align_corners=False)[:, 0, 0]
            colours = F.grid_sample(torch.cat([rgb, mask[:, None]], 1), grid[:, None], align_corners=False)[:, :, 0]
            visible = points[..., 2] <= surface + 1e-4
            colours[:, 3] = colours[:, 3] * visible
            uv_image = torch.zeros((batch, 4, HMR2_CROP_PX, HMR2_CROP_PX), dtype=torch.float, device=device)
            uv_image[:, :, texels] = colours
            return uv_image

    return HMR2AsHMAR


def detector_config(settings: Settings) -> Any:
    """The LazyConfig PHALP.setup_detectron2 builds (same file, same thresholds), with the engine's
    score threshold and any LazyConfig overrides applied."""
    from detectron2.config import LazyConfig

    if settings.detector == "vitdet":
        from pathlib import Path

        import phalp

        cfg = LazyConfig.load(str(Path(phalp.__file__).parent / "configs" / "cascade_mask_rcnn_vitdet_h_75ep.py"))
        for predictor in cfg.model.roi_heads.box_predictors:
            predictor.test_score_thresh = settings.detector_score
    else:
        from detectron2 import model_zoo

        cfg = model_zoo.get_config("new_baselines/mask_rcnn_regnety_4gf_dds_FPN_400ep_LSJ.py", trained=True)
        cfg.model.roi_heads.box_predictor.test_score_thresh = settings.detector_score
        cfg.model.roi_heads.box_predictor.test_nms_thresh = 0.4
    if settings.detector_overrides:
        cfg = LazyConfig.apply_overrides(cfg, settings.detector_overrides)
    return cfg


def build_detector(settings: Settings, weights_path: str, device: Any) -> Callable[[np.ndarray], dict]:
    """The detector PHALP.setup_detectron2 builds, loaded from the verified local file and placed on
    `device` instead of a hard-coded .cuda()."""
    cfg = detector_config(settings)
    cfg.train.init_checkpoint = weights_path
    return LazyConfigPredictor(cfg, device)


class LazyConfigPredictor:
    """One BGR image in, detectron2's output dict out (PHALP's DefaultPredictor_Lazy, device-aware)."""

    def __init__(self, cfg: Any, device: Any):
        import detectron2.data.transforms as T
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import instantiate

        self._T, self._torch = T, torch
        self.model = instantiate(cfg.model)
        DetectionCheckpointer(self.model).load(cfg.train.init_checkpoint)
        mapper = instantiate(cfg.dataloader.test.mapper)
        self.augmentations = mapper.augmentations
        self.input_format = mapper.image_format
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"unsupported detector input format {self.input_format}")
        self.model.eval().to(device)

    def __call__(self, bgr: np.ndarray) -> dict:
        image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
        height, width = image.shape[:2]
        resized = self.augmentations(self._T.AugInput(image)).apply_image(image)
        tensor = self._torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
        with self._torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]


class MediaPipePersonDetector:
    """A person detector that is practical on a CPU (the CPU rung): MediaPipe Pose's landmarks and
    segmentation give one person's box and mask per frame, as detectron2 Instances (class 0), so
    PHALP reads them as it reads ViTDet's. One person at most: MediaPipe Pose tracks one. When it finds
    nobody, the second pass (engines/roi.py) looks again where the rider was and in enlarged tiles;
    a box found there gets a box-shaped mask."""

    BOX_MARGIN = 0.1  # landmarks hug the body; grow the box by this share of its size on each side

    def __init__(self, options: Optional[Mapping[str, Any]] = None):
        import mediapipe as mp

        options = dict(options or {})
        self._pose_class = mp.solutions.pose.Pose
        self._video = self._make(video=True)
        self._region = self._pose_class(static_image_mode=True, model_complexity=1,
                                        min_detection_confidence=min_detection_confidence(options))
        self.second_pass = RiderSearch(self._find_in_region, options)

    def _make(self, video: bool) -> Any:
        return self._pose_class(static_image_mode=not video, model_complexity=1, enable_segmentation=True)

    def begin_video(self) -> None:
        self._video.close()
        self._video = self._make(video=True)
        self.second_pass.forget()

    def __call__(self, bgr: np.ndarray) -> dict:
        return self._instances(self._video, bgr, follow=True)

    def single_image(self, bgr: np.ndarray) -> dict:
        still = self._make(video=False)
        try:
            return self._instances(still, bgr, follow=False)
        finally:
            still.close()

    def _find_in_region(self, rgb: np.ndarray) -> list[Person]:
        height, width = rgb.shape[:2]
        box, score, _ = person_from_landmarks(self._region.process(rgb), height, width, self.BOX_MARGIN)
        return [] if box is None else [{"bbox_xyxy": box, "score": score}]

    def _instances(self, pose: Any, bgr: np.ndarray, follow: bool) -> dict:
        import torch
        from detectron2.structures import Boxes, Instances

        height, width = bgr.shape[:2]
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        box, score, mask = person_from_landmarks(pose.process(rgb), height, width, self.BOX_MARGIN)
        first_pass = [] if box is None else [{"bbox_xyxy": box, "score": score}]
        found = self.second_pass.fill(first_pass, rgb, follow=follow)
        if box is None and found:
            box, score = found[0]["bbox_xyxy"], found[0]["score"]
            mask = box_mask(box, height, width)
        instances = Instances((height, width))
        count = 0 if box is None else 1
        instances.pred_boxes = Boxes(torch.tensor([box] if count else np.zeros((0, 4)), dtype=torch.float32))
        instances.scores = torch.tensor([score] if count else [], dtype=torch.float32)
        instances.pred_classes = torch.zeros(count, dtype=torch.int64)
        instances.pred_masks = torch.from_numpy(mask[None] if count else np.zeros((0, height, width), dtype=bool))
        return {"instances": instances}


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[int(box[1]):int(box[3]) + 1, int(box[0]):int(box[2]) + 1] = True
    return mask


def person_from_landmarks(found: Any, height: int, width: int, margin: float
                          ) -> tuple[Optional[list[float]], float, np.ndarray]:
    """MediaPipe Pose's result -> (xyxy box over the visible landmarks grown by margin, mean
    visibility as the score, a boolean mask: its segmentation, else the box)."""
    if found is None or found.pose_landmarks is None:
        return None, 0.0, np.zeros((height, width), dtype=bool)
    points = np.array([[lm.x * width, lm.y * height, lm.visibility] for lm in found.pose_landmarks.landmark])
    seen = points[points[:, 2] > 0.5] if (points[:, 2] > 0.5).sum() >= 2 else points
    x0, y0 = seen[:, :2].min(axis=0)
    x1, y1 = seen[:, :2].max(axis=0)
    grow_x, grow_y = (x1 - x0) * margin, (y1 - y0) * margin
    box = [max(0.0, x0 - grow_x), max(0.0, y0 - grow_y), min(width - 1.0, x1 + grow_x), min(height - 1.0, y1 + grow_y)]
    if getattr(found, "segmentation_mask", None) is not None:
        mask = np.asarray(found.segmentation_mask) > 0.5
    else:
        mask = box_mask(box, height, width)
    return box, float(points[:, 2].mean()), mask
