"""HMR2 (4D-Humans) body regression tracked by PHALP, one frame at a time.

PHALP.track() is never called: it reads whole videos from disk, renders, swallows exceptions and
writes its pickle only at the end. This engine builds the same pieces stage by stage (HMR2 with
init_renderer=False; a PHALP subclass whose detector, visualizer, downloads and output folders are
switched off; the detector last) and drives detector -> HMR2 -> tracker itself per pushed frame.

PHALP appends a newly confirmed track to the previous n_init-1 frames, so frames are held back
until the tracker can no longer edit them. hmr2, phalp and detectron2 are imported only inside the
load stages: this package imports without them, and its bookkeeping is tested on recorded shapes.

Rooms: settings (options and caches), geometry (pure conversions), tracking (tracker steps and
held-back frames), patches (scoped torch/hmr2 changes), phalp_build (PHALP and its HMAR), detectors
(detectron2 and MediaPipe), engine (stages and the frame loop). The names below are the package's
surface (the engine registry, the tests and the bench import them from here).
"""
from __future__ import annotations

from gpu_worker.engines.base import FrameOut, LoadStage, Person
from gpu_worker.engines.hmr2_phalp.appearance import (
    AppearanceChoice,
    choose_appearance,
    depth_verdict,
    known_triangle_depth,
    neural_renderer_problem,
    neural_renderer_row,
    texture_sampler_problem,
)
from gpu_worker.engines.hmr2_phalp.detectors import (
    LazyConfigPredictor,
    MediaPipePersonDetector,
    box_mask,
    build_detector,
    detector_config,
    person_the_search_kept,
    seen_box,
    segmentation,
)
from gpu_worker.engines.hmr2_phalp.devices import cuda_index, make_current, resolve_cuda_device
from gpu_worker.engines.hmr2_phalp.engine import HMR2PhalpEngine
from gpu_worker.engines.hmr2_phalp.geometry import (
    HMR2_BBOX_SHAPE,
    HMR2_CROP_PX,
    HMR2_FOCAL_PX,
    JOINT_NAMES,
    OPENPOSE_BODY25,
    SMPL_FACES,
    SPIN_EXTRA_19,
    camera_dict,
    crop_camera_to_full,
    frame_measurements,
    full_frame_focal,
    joints_2d_to_pixels,
    make_person,
    padded_square,
    person_from_detection,
    pixels_to_joints_2d,
    project_to_image,
    rgb_to_bgr,
    smpl_to_lists,
    with_origin_joint,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from gpu_worker.engines.hmr2_phalp.patches import VIT_SIZE_KEYS, backbone_sized_by, cuda_calls_on, trusted_torch_load
from gpu_worker.engines.hmr2_phalp.phalp_build import build_phalp_config, build_streaming_phalp, hmr2_hmar_adapter_class
from gpu_worker.engines.hmr2_phalp.settings import (
    CACHE_OVERRIDES,
    DEFAULTS,
    Settings,
    apply_env_overrides,
    asset_rows,
    check_assets,
    resolve_precision,
)
from gpu_worker.engines.hmr2_phalp.tracking import (
    PendingFrames,
    TrackView,
    frame_name_for,
    person_boxes,
    prune_tracker_history,
    record_tracks,
    track_step,
    view_track,
)

__all__ = [
    "AppearanceChoice", "apply_env_overrides", "asset_rows", "backbone_sized_by", "box_mask", "build_detector",
    "build_phalp_config", "build_streaming_phalp", "CACHE_OVERRIDES", "camera_dict", "check_assets",
    "choose_appearance", "crop_camera_to_full", "cuda_calls_on", "cuda_index", "DEFAULTS", "detector_config",
    "frame_measurements", "frame_name_for", "FrameOut", "full_frame_focal", "HMR2_BBOX_SHAPE", "HMR2_CROP_PX",
    "HMR2_FOCAL_PX", "hmr2_hmar_adapter_class", "HMR2PhalpEngine", "JOINT_NAMES", "joints_2d_to_pixels",
    "LazyConfigPredictor", "LoadStage", "make_current", "make_person", "MediaPipePersonDetector",
    "neural_renderer_problem", "neural_renderer_row", "texture_sampler_problem", "known_triangle_depth",
    "depth_verdict", "OPENPOSE_BODY25", "padded_square", "PendingFrames",
    "Person", "person_boxes", "person_from_detection", "person_the_search_kept", "seen_box", "segmentation",
    "pixels_to_joints_2d",
    "project_to_image", "prune_tracker_history", "record_tracks", "resolve_cuda_device", "resolve_precision",
    "rgb_to_bgr", "Settings", "SMPL_FACES", "smpl_to_lists", "SPIN_EXTRA_19", "track_step", "TrackView",
    "trusted_torch_load", "view_track", "VIT_SIZE_KEYS", "with_origin_joint", "xywh_to_xyxy", "xyxy_to_xywh",
]
