"""PHALP's own track() — 4D-Humans' track.py, imported from the installed source — run on a folder
of frames with the synthetic cache, to hold the engine's streaming output against.

What the harness changes, and why (nothing else of the reference is touched):
- tensor/module .cuda() returns the same object: this machine has no GPU;
- HMR2's ViT is built at the size the synthetic model config names (hmr2_phalp.backbone_sized_by)
  and the detector gets the same LazyConfig overrides as the engine: the small test models;
- track.py's HMR2Predictor (PHALP's HMAR appearance) stands in for its HMR2023TextureSampler,
  whose renderer is a CUDA extension: the engine runs with appearance=hmar to match;
- the Mask R-CNN X101 (used only with ground-truth boxes) is not built: its weights are not in
  the synthetic cache, and nothing here reads it;
- HMR2's and PHALP's renderers are not built (render.enable is off; no GL on a headless CPU);
- the files PHALP would download but never reads with rendering off (head_faces.npy, AVA
  labels, the hmr2_data archive itself) are written as empty placeholders.
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any, Iterator

from gpu_worker.engines.hmr2_phalp import Settings, backbone_sized_by, trusted_torch_load


def track_module() -> Any:
    import hmr2

    path = Path(hmr2.__file__).resolve().parents[1] / "track.py"
    spec = importlib.util.spec_from_file_location("track_4dhumans_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_placeholders(home: Path) -> None:
    cache = home / ".cache"
    for rel in ("phalp/3D/head_faces.npy", "phalp/ava/ava_labels.pkl", "phalp/ava/ava_class_mapping.pkl",
                "4DHumans/hmr2_data.tar.gz"):
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).touch()


@contextlib.contextmanager
def cpu_reference(settings: Settings) -> Iterator[None]:
    import hmr2.models.hmr2 as hmr2_module
    import torch
    from detectron2.config import LazyConfig

    patched = []

    def patch(owner: Any, name: str, value: Any) -> None:
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    load_config = LazyConfig.load
    original_hmr2_init = hmr2_module.HMR2.__init__

    def small_detector(*args, **kwargs):
        return LazyConfig.apply_overrides(load_config(*args, **kwargs), settings.detector_overrides)

    def hmr2_init(self, cfg, init_renderer=True):
        with backbone_sized_by(cfg):
            original_hmr2_init(self, cfg, init_renderer=False)

    patch(torch.Tensor, "cuda", lambda tensor, *a, **k: tensor)
    patch(torch.nn.Module, "cuda", lambda module, *a, **k: module)
    patch(LazyConfig, "load", staticmethod(small_detector))
    patch(hmr2_module.HMR2, "__init__", hmr2_init)
    try:
        # the checkpoint, shaped like the release, pickles a yacs CfgNode: 4D-Humans' load_hmr2 on
        # torch 2.6+ refuses it unless weights-only loading is turned off, for any user as here
        with trusted_torch_load():
            yield
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)


def run_track(frames_dir: Path, out_dir: Path, settings: Settings, home: Path) -> Path:
    """PHALP.track() over frames_dir/*.jpg; returns the pickle it wrote."""
    from omegaconf import OmegaConf

    write_placeholders(home)
    module = track_module()

    class Reference(module.HMR2_4dhuman):
        def setup_hmr(self):
            self.HMAR = module.HMR2Predictor(self.cfg)

        def setup_detectron2_with_RPN(self):
            self.detector_x = None

        def setup_visualizer(self):
            self.visualizer = None

    cfg = OmegaConf.structured(module.Human4DConfig)
    cfg.video.source = str(frames_dir)
    cfg.video.output_dir = str(out_dir)
    cfg.device = "cpu"
    cfg.render.enable = False
    cfg.detect_shots = False
    for key in ("low_th_c", "small_w", "small_h", "n_init", "max_age_track", "track_history"):
        cfg.phalp[key] = getattr(settings, key)
    cfg.phalp.detector = settings.phalp_detector
    with cpu_reference(settings):
        tracker = Reference(cfg)
        result = tracker.track()
    if not result:
        raise AssertionError("PHALP.track() wrote no pickle (it prints and swallows its errors)")
    return Path(result[1])
