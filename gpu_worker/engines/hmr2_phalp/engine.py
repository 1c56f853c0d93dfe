"""HMR2PhalpEngine: the load stages and the per-frame detector -> HMR2 -> tracker loop."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
from pathlib import Path
from typing import Any, Callable, Optional, TypedDict

import numpy as np

import gpu_worker.engines.hmr2_phalp.cpu_runtime as cpu_runtime
from gpu_worker.engines import hmr2_assets
from gpu_worker.engines.base import Engine, FrameOut, LoadStage, Person
from gpu_worker.engines.hmr2_phalp.appearance import AppearanceChoice, choose_appearance, texture_sampler_problem
from gpu_worker.engines.hmr2_phalp.detectors import MediaPipePersonDetector, build_detector
from gpu_worker.engines.hmr2_phalp.devices import make_current, resolve_cuda_device
from gpu_worker.engines.hmr2_phalp.geometry import (
    HMR2_BBOX_SHAPE,
    JOINT_NAMES,
    crop_camera_to_full,
    frame_measurements,
    make_person,
    project_to_image,
    rgb_to_bgr,
    with_origin_joint,
)
from gpu_worker.engines.hmr2_phalp.half import HalfWeights, cast_backbone, half_weights_dtype
from gpu_worker.engines.hmr2_phalp.patches import backbone_sized_by, in_float32, trusted_torch_load
from gpu_worker.engines.hmr2_phalp.phalp_build import build_phalp_config, build_streaming_phalp
from gpu_worker.engines.hmr2_phalp.settings import Settings, apply_env_overrides, check_assets, resolve_precision
from gpu_worker.engines.hmr2_phalp.tracking import (
    PendingFrames,
    TrackView,
    frame_name_for,
    person_boxes,
    record_tracks,
    track_step,
)
from gpu_worker.errors import TrackerStateLost

log = logging.getLogger(__name__)


class Hmr2Output(TypedDict):
    """HMR2's output for one crop, on the CPU."""
    pred_cam: np.ndarray
    pred_smpl_params: dict[str, np.ndarray]
    pred_keypoints_3d: np.ndarray
    pred_vertices: np.ndarray
    box_center: np.ndarray
    box_size: np.ndarray


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
        self._appearance: Optional[AppearanceChoice] = None
        self._tracker_lost = ""  # why the tracker can no longer be trusted in this video ("" = it can)
        self.precision = "fp32"  # the runtime stage resolves engine.options.precision
        self.tf32 = False         # and engine.options.tf32
        # what runs HMR2's networks; the main_model stage resolves engine.options.hmr2_cpu_runtime
        self.hmr2_runtime = cpu_runtime.RuntimeChoice("torch")
        # the ViT-H backbones held in half precision on CUDA (half.py), by name
        self.half_weights: dict[str, HalfWeights] = {}
        # neural_renderer imports and, once the runtime stage has picked the device, renders right
        self.neural_renderer_problem: Callable[[], str] = lambda: texture_sampler_problem(self._torch_device)

    @property
    def device_type(self) -> str:
        return "cuda" if str(self.device).startswith("cuda") else "cpu"

    @property
    def appearance(self) -> str:
        """What the rung runs: the options' choice, or hmar when neural_renderer does not import."""
        return self.appearance_choice().appearance

    def appearance_choice(self) -> AppearanceChoice:
        """Settled once the device is (the render test runs on it); asked earlier, an import check."""
        if self._appearance is not None:
            return self._appearance
        choice = choose_appearance(self.settings.appearance_on(self.device_type), self.neural_renderer_problem)
        if self._torch_device is not None:
            self._appearance = choice
        return choice

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
        # NVML's free memory before this process has a CUDA context (set_device creates it): the
        # plan's need counts the context itself. The supervisor usually decided already (rung options).
        self.precision = resolve_precision(self.settings, self.device)
        if wants_cuda:
            self._torch_device = resolve_cuda_device(torch, self.device)
            make_current(torch, self._torch_device)
        else:
            self._torch_device = torch.device("cpu")
        self.tf32 = self.settings.tf32_on(self.device_type)
        if wants_cuda:  # process-wide flags: this process runs one engine
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    def _check_weights(self, probe_only: bool = False) -> None:
        appearance = None if probe_only else self.appearance
        check_assets(self.settings, self.device_type, probe_only=probe_only, appearance=appearance)

    def _load_hmr2(self) -> None:
        """hmr2.models.load_hmr2, minus its renderer: load_hmr2 cannot pass init_renderer=False."""
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
        self._hold_in_half("hmr2_backbone", model.backbone)  # on the host: the card never holds its fp32 copy
        self._hmr2 = self._fast_hmr2(model.to(self._torch_device).eval())
        self._hmr2_cfg = model_cfg

    def _fast_hmr2(self, model: Any) -> Any:
        """On the CPU, HMR2 with its backbone and head on OpenVINO (cpu_runtime.py: faster, the same
        outputs; bench/hmr2_cpu.py), unless engine.options.hmr2_cpu_runtime=torch; on CUDA, `model`.
        The torch backbone and head are freed with `model` once the fast copy replaces it."""
        self.hmr2_runtime = cpu_runtime.resolve_runtime(self.settings.hmr2_cpu_runtime, self.device_type)
        if self.hmr2_runtime.note:
            log.warning("hmr2_runtime_fallback: %s", self.hmr2_runtime.note)
        if self.hmr2_runtime.runtime == "torch":
            return model
        folder = self.settings.hmr2_cpu_cache or cpu_runtime.default_cache_dir(self.settings.environment())
        return cpu_runtime.accelerate_hmr2(model, Path(folder), precision=self.precision)

    def _half_weights_dtype(self) -> Any:
        """fp16/bf16 on CUDA in those precisions, else None (fp32 weights): half.py says why."""
        return half_weights_dtype(self._torch, self.precision, self.device_type)

    def _hold_in_half(self, name: str, backbone: Any) -> None:
        """The backbone's Linear/Conv weights in the half dtype (half.py), cast where they are now."""
        dtype = self._half_weights_dtype()
        if dtype is not None:
            self._note_half_weights(name, cast_backbone(backbone, dtype))

    def _note_half_weights(self, name: str, cast: Optional[HalfWeights]) -> None:
        if cast is not None:
            self.half_weights[name] = cast
            log.info("half_weights: %s %s", name, cast.describe())

    def _build_tracker(self) -> None:
        choice = self.appearance_choice()  # neural_renderer checked here, before PHALP is built
        if choice.note:
            log.warning("appearance_fallback: %s", choice.note)
        cfg = build_phalp_config(self.settings, str(self._torch_device))
        with trusted_torch_load(self._torch_device):
            self._phalp = build_streaming_phalp(cfg, self._hmr2, self.settings, self.appearance,
                                                precision=self.precision)
        self._phalp.setup_deepsort()
        self._phalp.HMAR.autocast = self._autocast
        if self._detector is not None:
            self._phalp.detector = self._detector

    def _build_detector(self) -> None:
        if self.settings.detector == "mediapipe":
            self._detector = MediaPipePersonDetector(self.options)
        else:
            weights = hmr2_assets.detector_weights_path(self.settings.detector, self.settings.environment())
            self._detector = build_detector(self.settings, weights, self._torch_device,
                                            backbone_dtype=self._half_weights_dtype())
            self._note_half_weights("vitdet_backbone", self._detector.half_weights)
            self._detector.autocast = self._autocast
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
        self._tracker_lost = ""

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
        if self._tracker_lost:
            raise TrackerStateLost(self._tracker_lost)
        with self._no_grad():
            detections = self.describe_frame(bgr, seq, frame_name)  # changes no tracker state: retryable
            views = self._track_once(detections, seq, frame_name)
        record_tracks(self._pending, seq, views, self.settings.n_init)
        self._open = None
        return self._pending.pop_final(seq)

    def _track_once(self, detections: list, seq: int, frame_name: str) -> list[TrackView]:
        """PHALP's update edits its tracks before it can fail (time_since_update, history, hits), so a
        failed step is never run again on the same tracker: the next push says the tracker is lost,
        the worker dies, and its replacement rebuilds the tracks from the stored frames (resume)."""
        try:
            return self.track_frame(detections, seq, frame_name)
        except Exception as exc:
            self._tracker_lost = (f"the tracker step of frame {seq} failed after it may have changed the "
                                  f"tracks ({type(exc).__name__}: {str(exc)[:200]}); not retried on this tracker")
            raise

    def end_video(self) -> list[FrameOut]:
        return self._pending.flush()

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The detector, HMR2 and the appearance head run under this (their outputs come back in fp32;
        weights fp32 but for the two ViT-H backbones on CUDA, half.py): autocast in
        engine.options.precision, nothing for fp32. Half weights need it: every call runs under it."""
        if self._torch is None or self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = self._torch.bfloat16 if self.precision == "bf16" else self._torch.float16
        return self._torch.autocast(self.device_type, dtype=dtype, cache_enabled=False)

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
        detector = self._detector
        if detector is None:
            raise RuntimeError("the detector stage has not run")
        bgr = rgb_to_bgr(rgb)
        height, width = bgr.shape[:2]
        with self._no_grad():
            instances = detector.single_image(bgr)["instances"] \
                if isinstance(detector, MediaPipePersonDetector) else detector(bgr)["instances"]
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

    def _run_hmr2_on_boxes(self, bgr: np.ndarray, boxes: np.ndarray) -> list[Hmr2Output]:
        torch = self._torch
        from hmr2.datasets.vitdet_dataset import ViTDetDataset

        dataset = ViTDetDataset(self._hmr2_cfg, bgr, boxes)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False, num_workers=0)
        results: list[Hmr2Output] = []
        with contextlib.redirect_stdout(io.StringIO()):  # ViTDetDataset prints once per crop
            batches = list(loader)
        for batch in batches:
            batch = {k: (v.to(self._torch_device) if hasattr(v, "to") else v) for k, v in batch.items()}
            with self._autocast():
                out = in_float32(self._hmr2(batch))
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
                "appearance": self.appearance, "precision": self.precision, "tf32": self.tf32,
                "hmr2_runtime": self.hmr2_runtime.runtime, **self.appearance_note(), **self.runtime_note(),
                **self.half_weights_note(), **self.person_detector_note()}

    def person_detector_note(self) -> dict[str, str]:
        """The CPU rung's second pass: whether it searches with the person detector (as the mediapipe engine
        says it)."""
        if not isinstance(self._detector, MediaPipePersonDetector):
            return {}
        return {"person_detector": self._detector.rider_models.describe_person_detector()}

    def appearance_note(self) -> dict[str, str]:
        note = self.appearance_choice().note
        return {"appearance_note": note} if note else {}

    def runtime_note(self) -> dict[str, str]:
        note = self.hmr2_runtime.note
        return {"hmr2_runtime_note": note} if note else {}

    def half_weights_note(self) -> dict[str, dict[str, str]]:
        if not self.half_weights:
            return {}
        return {"half_weights": {name: cast.describe() for name, cast in self.half_weights.items()}}
