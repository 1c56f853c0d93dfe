"""Person detectors PHALP reads: detectron2's ViTDet / RegNetY (device-aware) and MediaPipe Pose's
box for the CPU rung."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from gpu_worker.engines.base import Person
from gpu_worker.engines.hmr2_phalp.half import HalfWeights, cast_backbone, vitdet_backbone
from gpu_worker.engines.hmr2_phalp.patches import instances_in_float32
from gpu_worker.engines.hmr2_phalp.settings import Settings
from gpu_worker.engines.roi import RiderSearch, box_iou, min_detection_confidence

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
    """A person detector that is practical on a CPU (the CPU rung): MediaPipe Pose's landmarks and
    segmentation give one person's box and mask per frame, as detectron2 Instances (class 0), so
    PHALP reads them as it reads ViTDet's. One person at most: MediaPipe Pose tracks one. The second pass
    (engines/roi.py) may keep, drop or replace its person, and when it finds nobody looks again where
    the rider was and in enlarged tiles; PHALP gets the person it kept (a box it found instead gets a
    box-shaped mask)."""

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

    def person_in(self, pose: Any, bgr: np.ndarray, follow: bool
                  ) -> tuple[Optional[list[float]], float, np.ndarray]:
        """(box, score, mask) of the person the first pass found and the second pass kept, or found."""
        height, width = bgr.shape[:2]
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        box, score, mask = person_from_landmarks(pose.process(rgb), height, width, self.BOX_MARGIN)
        first_pass = [] if box is None else [{"bbox_xyxy": box, "score": score}]
        return person_the_search_kept(first_pass, mask, self.second_pass.fill(first_pass, rgb, follow=follow))

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


def person_the_search_kept(first_pass: list[Person], first_mask: np.ndarray, found: list[Person]
                           ) -> tuple[Optional[list[float]], float, np.ndarray]:
    """The second pass's answer as one (box, score, mask): it may keep the first pass's person (his
    segmentation stays, also under the box a closer look refined), replace him with another (a
    box-shaped mask) or drop him (no box)."""
    height, width = first_mask.shape
    if not found:
        return None, 0.0, np.zeros((height, width), dtype=bool)
    box, score = list(found[0]["bbox_xyxy"]), float(found[0]["score"])
    if first_pass and box_iou(box, list(first_pass[0]["bbox_xyxy"])) >= SAME_PERSON_IOU:
        return box, score, first_mask
    return box, score, box_mask(box, height, width)


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
