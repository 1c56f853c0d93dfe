"""The engine's options (engine.options.*), validated, and the cache environment they imply."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import gpu_worker.engines.hmr2_phalp.cpu_runtime as cpu_runtime
from gpu_worker.engines import hmr2_assets
from gpu_worker.errors import WeightsMissing
from pose_common import memplan

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
    # fp32 | fp16 | bf16 | auto: the detector, HMR2 and the appearance head under autocast (weights
    # stay fp32); auto = fp32, or fp16 on a CUDA card where the memory plan says fp32 does not fit
    "precision": "auto",
    # what runs HMR2's networks on the CPU (cpu_runtime.py): auto (openvino on the CPU, torch on
    # CUDA, whose path is unchanged), torch, or openvino (falls back to torch when it does not import)
    "hmr2_cpu_runtime": "auto",
    # where openvino's converted HMR2 is kept ("" = $HOME/.cache/pose-service/hmr2-openvino, HOME
    # after cache_home); about the size of the weights (2.4 GB for the release)
    "hmr2_cpu_cache": "",
    # TF32 for fp32 matmuls and convolutions on cards that have it (Ampere and later; the flag does
    # nothing on older ones): auto = on for CUDA rungs. About 3x the fp32 matmul rate; inputs are
    # rounded to 10 mantissa bits, a relative error near 1e-3 per product (accumulation stays fp32)
    "tf32": "auto",
    # person crops per HMR2/HMAR forward (PHALP hands a frame's crops over at once): 0 = the memory
    # plan's chunk for the rung and precision (pose_common/memplan.py crop_chunk), N = at most N
    "crop_chunk": 0,
}
TF32_CHOICES = ("auto", "true", "false", "on", "off")
CACHE_OVERRIDES = {"cache_home": "HOME", "torch_home": "TORCH_HOME", "fvcore_cache": "FVCORE_CACHE"}


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
    precision: str = "auto"
    hmr2_cpu_runtime: str = "auto"
    hmr2_cpu_cache: str = ""
    tf32: str = "auto"
    crop_chunk: int = 0
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
            precision=str(merged["precision"]).lower(),
            hmr2_cpu_runtime=str(merged["hmr2_cpu_runtime"]).lower(),
            hmr2_cpu_cache=str(merged["hmr2_cpu_cache"] or ""),
            tf32=str(merged["tf32"]).lower(),
            crop_chunk=int(merged["crop_chunk"]),
            env_overrides={var: str(options[key]) for key, var in CACHE_OVERRIDES.items() if options.get(key)})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.n_init < 1:
            raise ValueError("n_init must be at least 1")
        # PHALP back-fills from the track's history deque, which holds track_history entries
        if self.n_init > self.track_history:
            raise ValueError(f"n_init ({self.n_init}) must not exceed track_history ({self.track_history})")
        if self.precision not in memplan.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(memplan.PRECISIONS)}")
        if self.hmr2_cpu_runtime not in cpu_runtime.RUNTIMES:
            raise ValueError(f"hmr2_cpu_runtime must be one of {', '.join(cpu_runtime.RUNTIMES)}")
        if self.crop_chunk < 0:
            raise ValueError("crop_chunk must be 0 (the memory plan's) or a number of crops")
        if self.tf32 not in TF32_CHOICES:
            raise ValueError(f"tf32 must be one of {', '.join(TF32_CHOICES)}")
        if self.appearance not in ("texture", "hmar", "auto"):
            raise ValueError("appearance must be 'texture', 'hmar' or 'auto'")

    @property
    def phalp_detector(self) -> str:
        return "vitdet" if self.detector == "vitdet" else "maskrcnn"

    def tf32_on(self, device_type: str) -> bool:
        """TF32 is a CUDA matter: on the CPU the flag changes nothing, so it is reported off."""
        return device_type == "cuda" and self.tf32 in ("auto", "true", "on")

    def appearance_on(self, device_type: str) -> str:
        """The texture sampler's renderer (neural_renderer) is a CUDA extension."""
        if self.appearance == "auto":
            return "texture" if device_type == "cuda" else "hmar"
        if self.appearance == "texture" and device_type != "cuda":
            raise ValueError("appearance=texture needs CUDA (neural_renderer); use appearance=hmar on the CPU")
        return self.appearance

    def environment(self, base: Mapping[str, str] = os.environ) -> dict[str, str]:
        return {**base, **self.env_overrides}


def apply_env_overrides(overrides: Mapping[str, str]) -> None:
    """hmr2 and phalp freeze $HOME/.cache at import time, so overrides must land before importing them."""
    for var, value in overrides.items():
        os.environ[var] = value


def asset_rows(settings: Settings, device_type: str, probe_only: bool = False,
               appearance: str | None = None) -> list[dict]:
    """The files these settings read, checked (hmr2_assets.check: the same for `models verify`).
    `appearance` is the one the rung really runs (it may have fallen back to hmar)."""
    return hmr2_assets.check(settings.detector, settings.environment(),
                             appearance or settings.appearance_on(device_type), probe_only=probe_only)


def check_assets(settings: Settings, device_type: str, probe_only: bool = False,
                 appearance: str | None = None) -> list[dict]:
    rows = asset_rows(settings, device_type, probe_only, appearance)
    if hmr2_assets.problems(rows):
        raise WeightsMissing("hmr2_phalp weights are not ready (nothing was downloaded; pre-seed the "
                             "caches, see docs/hmr2-phalp.md):\n" + hmr2_assets.describe_problems(rows))
    return rows


def resolve_precision(settings: Settings, device: str,
                      read_facts: Callable[[str], Optional[memplan.GpuFacts]] = memplan.read_gpu_facts) -> str:
    """engine.options.precision for this device: auto is fp32 on the CPU and on a CUDA card where the
    plan's fp32 need fits in the free memory (NVML, before anything is loaded), else fp16."""
    if settings.precision != "auto":
        return settings.precision
    if not str(device).startswith("cuda"):
        return "fp32"
    facts = read_facts(device)
    if facts is None:
        return "fp32"
    rung = {"engine": "hmr2_phalp", "device": device, "options": {"detector": settings.detector, "precision": "auto"}}
    return memplan.fitting_precision(rung, facts.free_mb - memplan.START_MARGIN_MB) or "fp16"
