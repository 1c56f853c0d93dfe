"""Person detectors PHALP reads: detectron2's ViTDet / RegNetY (device-aware) and MediaPipe Pose's
box for the CPU rung."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from gpu_worker.engines.base import Person
from gpu_worker.engines.hmr2_phalp.half import HalfWeights, cast_backbone, vitdet_backbone
from gpu_worker.engines.hmr2_phalp.patches import instances_in_float32
from gpu_worker.engines.hmr2_phalp.settings import Settings
from gpu_worker.engines.mediapipe_engine import persons_in
from gpu_worker.engines.rider_models import RiderModels, first_pass_confidence
from gpu_worker.engines.roi import box_iou

# detectron2 pastes every detection's mask at the full frame on CUDA, in chunks it sizes by the output
# alone (4 bytes a pixel against 1 GiB: all 100 masks of a 1080p frame in one chunk), while a chunk
# holds about 15 bytes a pixel (the sampling grid, its half copy, the sampled mask, the result): about
# 2.9 GB at 1080p, more than ViT-H's own peak. Chunks of this size keep it near 0.4 GB (the plan's
# traced figure); the same kernels run, in a dozen launches instead of one.
MASK_PASTE_CHUNK_BYTES = 64 * 2 ** 20

SAME_PERSON_IOU = 0.5  # the second pass's box over the first pass's: the same person, his mask kept


def paste_masks_in_small_chunks() -> None:
    """Process-wide (detectron2 reads its module constant at each call); a worker runs one engine."""
    from detectron2.layers import mask_ops

    mask_ops.GPU_MEM_LIMIT = MASK_PASTE_CHUNK_BYTES


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


def build_detector(settings: Settings, weights_path: str, device: Any,
                   backbone_dtype: Optional[Any] = None) -> LazyConfigPredictor:
    """The detector PHALP.setup_detectron2 builds, loaded from the verified local file and placed on
    `device` instead of a hard-coded .cuda(); ViTDet's ViT held in `backbone_dtype` (half.py) if given."""
    cfg = detector_config(settings)
    cfg.train.init_checkpoint = weights_path
    return LazyConfigPredictor(cfg, device, backbone_dtype)


class LazyConfigPredictor:
    """One BGR image in, detectron2's output dict out (PHALP's DefaultPredictor_Lazy, device-aware).
    `autocast` is the engine's precision context (fp32: none); outputs come back in fp32. With
    `backbone_dtype`, ViTDet's ViT is held in that half dtype (half.py), cast on the host before the
    model moves to `device`, so the card never holds its fp32 copy; `half_weights` says what was cast."""

    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    half_weights: Optional[HalfWeights] = None

    def __init__(self, cfg: Any, device: Any, backbone_dtype: Optional[Any] = None):
        import detectron2.data.transforms as T
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import instantiate

        self._T, self._torch = T, torch
        paste_masks_in_small_chunks()
        self.model = instantiate(cfg.model)
        DetectionCheckpointer(self.model).load(cfg.train.init_checkpoint)
        mapper = instantiate(cfg.dataloader.test.mapper)
        self.augmentations = mapper.augmentations
        self.input_format = mapper.image_format
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"unsupported detector input format {self.input_format}")
        backbone = vitdet_backbone(self.model) if backbone_dtype is not None else None
        if backbone is not None:
            self.half_weights = cast_backbone(backbone, backbone_dtype)
        self.model.eval().to(device)

    def __call__(self, bgr: np.ndarray) -> dict:
        image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
        height, width = image.shape[:2]
        resized = self.augmentations(self._T.AugInput(image)).apply_image(image)
        tensor = self._torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
        with self._torch.no_grad(), self.autocast():
            output = self.model([{"image": tensor, "height": height, "width": width}])[0]
        output["instances"] = instances_in_float32(output["instances"])
        return output


class MediaPipePersonDetector:
    """A person detector that is practical on a CPU (the CPU rung): MediaPipe Pose's video graph finds the
    rider, and the second pass searches for him where it found nobody (or someone it doubts) exactly as
    the mediapipe engine's does, with the same models (rider_models.py: the pose model on regions and
    on his track, the person detector where `make install` put it). PHALP gets the person the search kept
    as detectron2 Instances (class 0), as it reads ViTDet's: a box over the landmarks the model sees,
    grown by BOX_MARGIN, and the graph's segmentation where the kept person is the graph's own (else a
    box-shaped mask). One person at most: MediaPipe Pose tracks one."""

    BOX_MARGIN = 0.1  # landmarks hug the body; grow the box by this share of its size on each side

    def __init__(self, options: Optional[Mapping[str, Any]] = None):
        import mediapipe as mp

        self._options = dict(options or {})
        self._pose_class = mp.solutions.pose.Pose
        self._video = self._make(video=True)
        self.rider_models = RiderModels(self._options)
        self.rider_models.build(os.path.dirname(mp.__file__))
        self.second_pass = self.rider_models.search

    def _make(self, video: bool) -> Any:
        return self._pose_class(static_image_mode=not video, model_complexity=1, enable_segmentation=True,
                                min_detection_confidence=first_pass_confidence(self._options))

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

    def person_in(self, pose: Any, bgr: np.ndarray, follow: bool
                  ) -> tuple[Optional[list[float]], float, np.ndarray]:
        """(box, score, mask) of the person the first pass found and the second pass kept, or found."""
        height, width = bgr.shape[:2]
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        result = pose.process(rgb)
        first_pass = persons_in(result, width, height)
        kept = self.second_pass.fill(first_pass, rgb, follow=follow)
        return person_the_search_kept(first_pass, segmentation(result), kept, self.BOX_MARGIN, (height, width))

    def _instances(self, pose: Any, bgr: np.ndarray, follow: bool) -> dict:
        import torch
        from detectron2.structures import Boxes, Instances

        height, width = bgr.shape[:2]
        box, score, mask = self.person_in(pose, bgr, follow)
        instances = Instances((height, width))
        count = 0 if box is None else 1
        instances.pred_boxes = Boxes(torch.tensor([box] if count else np.zeros((0, 4)), dtype=torch.float32))
        instances.scores = torch.tensor([score] if count else [], dtype=torch.float32)
        instances.pred_classes = torch.zeros(count, dtype=torch.int64)
        instances.pred_masks = torch.from_numpy(mask[None] if count else np.zeros((0, height, width), dtype=bool))
        return {"instances": instances}


def segmentation(result: Any) -> Optional[np.ndarray]:
    """MediaPipe Pose's segmentation of its person as a boolean mask, or None where it gave none."""
    mask = getattr(result, "segmentation_mask", None)
    return None if mask is None else np.asarray(mask) > 0.5


def person_the_search_kept(first_pass: list[Person], first_mask: Optional[np.ndarray], found: list[Person],
                           margin: float = 0.0, shape: Optional[tuple[int, int]] = None
                           ) -> tuple[Optional[list[float]], float, np.ndarray]:
    """The second pass's answer as one (box, score, mask): it may keep the first pass's person (his
    segmentation stays, also under the box a closer look refined), replace him with another (a
    box-shaped mask) or drop him (no box). The box lies over the landmarks the model sees, grown by
    `margin` (`seen_box`); a person without landmarks keeps his own box."""
    if shape is None:
        assert first_mask is not None, "the frame's shape comes from `shape` or the first pass's mask"
        shape = first_mask.shape
    height, width = shape
    if not found:
        return None, 0.0, np.zeros((height, width), dtype=bool)
    person = found[0]
    box, score = seen_box(person, width, height, margin), float(person["score"])
    same = bool(first_pass) and box_iou(list(person["bbox_xyxy"]), list(first_pass[0]["bbox_xyxy"])) >= SAME_PERSON_IOU
    if same and first_mask is not None:
        return box, score, first_mask
    return box, score, box_mask(box, height, width)


def seen_box(person: Person, width: int, height: int, margin: float) -> list[float]:
    """The box over the person's landmarks the model sees (visibility over 0.5; all of them where fewer
    than two are), grown by `margin` of its size on each side, within the frame; his own box where he has
    no landmarks."""
    if not person.get("keypoints_2d"):
        return [float(v) for v in person["bbox_xyxy"]]
    points = np.asarray(person["keypoints_2d"], dtype=float)
    seen = points[points[:, 2] > 0.5] if (points[:, 2] > 0.5).sum() >= 2 else points
    x0, y0 = seen[:, :2].min(axis=0)
    x1, y1 = seen[:, :2].max(axis=0)
    grow_x, grow_y = (x1 - x0) * margin, (y1 - y0) * margin
    return [max(0.0, x0 - grow_x), max(0.0, y0 - grow_y), min(width - 1.0, x1 + grow_x), min(height - 1.0, y1 + grow_y)]


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[int(box[1]):int(box[3]) + 1, int(box[0]):int(box[2]) + 1] = True
    return mask
