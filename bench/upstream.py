"""Seconds per frame of each stage of the real upstream code on this CPU, with full-size randomly
initialised models: ViTDet-H (PHALP's detector config, one 640x360 frame), HMR2's ViT-H (per
person crop), and PHALP's tracker step (predict + update, with its full-size HMAR appearance
autoencoder). Weights are random: a weight's value does not change the work done.

Run with the upstream tier's venv: `make bench-upstream` (writes bench/results/upstream.json).
Uses the tier's synthetic SMPL model (tests/upstream/synthetic.py) for the body model HMR2 builds.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO.parent / "shared" / "data" / "snowboard_k0z18lmds.mp4"
OUT = REPO / "bench" / "results" / "upstream.json"


def timed(run, repeat: int) -> float:
    run()  # the first call pays for lazy set-up
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    return (time.perf_counter() - started) / repeat


def first_frame() -> np.ndarray:
    import av
    with av.open(str(CLIP)) as container:
        return next(container.decode(video=0)).to_ndarray(format="bgr24")


def bench_detector(frame: np.ndarray) -> float:
    import detectron2.data.transforms as T
    import torch
    from detectron2.config import instantiate

    from gpu_worker.engines.hmr2_phalp import Settings, detector_config

    cfg = detector_config(Settings.from_options({"detector": "vitdet"}))
    model = instantiate(cfg.model).eval()
    height, width = frame.shape[:2]
    mapper = instantiate(cfg.dataloader.test.mapper)  # the engine's own preprocessing (LazyConfigPredictor)
    pixels = frame[:, :, ::-1] if mapper.image_format == "RGB" else frame
    resized = mapper.augmentations(T.AugInput(pixels)).apply_image(pixels)
    image = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1).copy())
    with torch.no_grad():
        return timed(lambda: model([{"image": image, "height": height, "width": width}]), repeat=1)


def bench_hmr2(config_path: str) -> float:
    import torch
    import yaml
    from hmr2.configs import get_config
    from hmr2.models import HMR2

    released = yaml.safe_load(open(config_path))
    released["MODEL"]["BACKBONE"] = {"TYPE": "vit"}  # vit(cfg): ViT-H, as released
    released["MODEL"]["SMPL_HEAD"]["TRANSFORMER_DECODER"] = {
        "depth": 6, "heads": 8, "mlp_dim": 1024, "dim_head": 64, "dropout": 0.0, "emb_dropout": 0.0,
        "norm": "layer", "context_dim": 1280}
    full = Path(config_path).with_name("model_config_full.yaml")
    full.write_text(yaml.safe_dump(released))
    model = HMR2(get_config(str(full), update_cachedir=True), init_renderer=False).eval()
    batch = {"img": torch.rand(1, 3, 256, 256), "mask": torch.ones(1, 256, 256)}
    with torch.no_grad():
        return timed(lambda: model(batch), repeat=2)


def bench_tracker(cache) -> float:
    """The engine's tracker step (PHALP predict + update) over the first 24 frames, per frame."""
    from gpu_worker.engines.hmr2_phalp import HMR2PhalpEngine
    from pose_common.video import frames

    engine = HMR2PhalpEngine("cpu", cache.options())
    for stage in engine.stages():
        stage.run()
    spent, count = [0.0], [0]
    track = engine.track_frame

    def timed_track(detections, seq, name):
        started = time.perf_counter()
        try:
            return track(detections, seq, name)
        finally:
            spent[0] += time.perf_counter() - started
            count[0] += 1

    engine.track_frame = timed_track
    for meta, index, pts, rgb in frames(str(CLIP), 0):
        if index == 0:
            engine.begin_video(meta.width, meta.height, meta.fps)
        if index >= 24:
            break
        engine.push(index, pts, rgb)
    return spent[0] / max(1, count[0])


def main() -> int:
    sys.path.insert(0, str(REPO / "tests" / "upstream"))
    with tempfile.TemporaryDirectory() as tmp:
        from synthetic import make_cache  # the test fixture's synthetic SMPL model and small checkpoints
        cache = make_cache(Path(tmp))
        results = {"tracker_step_s_per_frame": bench_tracker(cache),
                   "hmr2_vit_h_s_per_person": bench_hmr2(cache.paths()["hmr2_model_config"]),
                   "vitdet_h_s_per_frame": bench_detector(first_frame())}
    results["cpu_count"] = os.cpu_count()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    for name, value in results.items():
        print(f"{name:<28} {value:.2f}" if isinstance(value, float) else f"{name:<28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
