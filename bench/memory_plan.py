"""Each model's GPU memory need, measured from the real upstream architectures on the CPU, without
real weights and without allocating them: every model is built and run under torch's FakeTensorMode
(tensors with shapes and dtypes, no data), and torch's MemTracker counts parameter and buffer bytes
(exact) and the peak of live activation bytes during one no-grad forward at the real input size, in
fp32 and under fp16 autocast (weights stay fp32, as the engine runs them; casts are not cached).

What is traced: ViTDet-H's and RegNetY's backbone + feature pyramid at the padded input the engine's
own preprocessing gives a 1920x1080 frame (their ROI heads have data-dependent shapes FakeTensorMode
cannot follow; their parameters are counted); HMR2 (ViT-H + transformer head + SMPL) on 4 person
crops; PHALP's HMAR appearance network on 4 crops. PHALP's pose transformer is counted from its
checkpoint's size (docs). Run with the upstream tier's venv:

    .venv-upstream/bin/python -m bench.memory_plan   # prints the table, writes bench/results/memory_plan.json
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "memory_plan.json"
FRAME_HW = (1080, 1920)
PERSONS = 4
MB = 2 ** 20


def peak_bytes(build: Callable[[], Any], forward: Callable[[Any], Any], precision: str) -> dict[str, int]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    with FakeTensorMode(allow_non_fake_inputs=True):
        with building_without_values():  # the ViTs read their drop-path rates with .item() while they build
            model = build().eval()
        tracker = MemTracker()
        tracker.track_external(model)
        autocast = torch.autocast("cpu", dtype=torch.float16, cache_enabled=False, enabled=precision == "fp16")
        with tracker, torch.no_grad(), autocast:
            forward(model)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {"weights": int(peak[_MemRefType.PARAM] + peak[_MemRefType.BUFFER]),
            "activations": int(peak[_MemRefType.ACT] + peak[_MemRefType.TEMP] + peak[_MemRefType.OTH])}


@contextlib.contextmanager
def building_without_values() -> Iterator[None]:
    """Initialisers that read tensor values (data-dependent under FakeTensorMode) made value-free."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original, original_trunc_normal = torch.linspace, torch.nn.init.trunc_normal_
    torch.nn.init.trunc_normal_ = lambda tensor, *args, **kwargs: tensor  # checks values; values do not matter here

    class Rate(float):
        def item(self) -> float:
            return float(self)

    def linspace(*args: Any, **kwargs: Any) -> Any:
        """Plain numbers with .item(): a real tensor's .item() would still pass through the fake mode."""
        with unset_fake_temporarily():
            return [Rate(value) for value in original(*args, **kwargs).tolist()]

    torch.linspace = linspace
    try:
        yield
    finally:
        torch.linspace, torch.nn.init.trunc_normal_ = original, original_trunc_normal


def padded_detector_input(cfg: Any) -> tuple[int, int]:
    """The (H, W) the detector's backbone sees for a FRAME_HW frame: its resize, then its padding."""
    import detectron2.data.transforms as T
    import numpy as np
    from detectron2.config import instantiate

    mapper = instantiate(cfg.dataloader.test.mapper)
    frame = T.AugInput(np.zeros((*FRAME_HW, 3), dtype=np.uint8))
    mapper.augmentations(frame)  # resizes frame.image in place
    height, width = frame.image.shape[:2]
    square = getattr(cfg.model.backbone, "square_pad", 0) or 0
    if square:
        return square, square
    divisor = 32
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def detector_rows(name: str) -> dict[str, dict[str, int]]:
    import torch
    from detectron2.config import instantiate

    from gpu_worker.engines.hmr2_phalp import Settings, detector_config

    cfg = detector_config(Settings.from_options({"detector": name}))
    height, width = padded_detector_input(cfg)

    def forward(model: Any) -> Any:
        return model.backbone(torch.zeros(1, 3, height, width))

    rows = {precision: peak_bytes(lambda: instantiate(cfg.model), forward, precision) for precision in ("fp32", "fp16")}
    rows["input"] = {"height": height, "width": width}
    return rows


def hmr2_rows(config_path: str) -> dict[str, dict[str, int]]:
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
    cfg = get_config(str(full), update_cachedir=True)

    def forward(model: Any) -> Any:
        """HMR2.forward_step's backbone and SMPL head; the SMPL layer after them indexes its kinematic
        tree by tensor values FakeTensorMode cannot follow (its buffers are counted as weights; its
        activations, a few 6890x3 meshes, are not traced)."""
        features = model.backbone(torch.zeros(PERSONS, 3, 256, 256)[:, :, :, 32:-32])
        return model.smpl_head(features)

    return {precision: peak_bytes(lambda: HMR2(cfg, init_renderer=False), forward, precision)
            for precision in ("fp32", "fp16")}


def hmar_rows() -> dict[str, dict[str, int]]:
    import torch
    from omegaconf import OmegaConf
    from phalp.configs.base import FullConfig
    from phalp.models.hmar.hmar import HMAR

    cfg = OmegaConf.structured(FullConfig)
    cfg.device = "cpu"

    def forward(model: Any) -> Any:
        return model(torch.zeros(PERSONS, 4, 256, 256))

    return {precision: peak_bytes(lambda: HMAR(cfg), forward, precision) for precision in ("fp32", "fp16")}


def measure() -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "upstream"))
    results: dict[str, Any] = {"frame": list(FRAME_HW), "persons": PERSONS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        from synthetic import make_cache  # the tier's synthetic SMPL model: HMR2 and HMAR build their SMPL from it
        cache = make_cache(Path(tmp))
        steps = {"hmr2": lambda: hmr2_rows(cache.paths()["hmr2_model_config"]), "hmar": hmar_rows,
                 "vitdet": lambda: detector_rows("vitdet"), "regnety": lambda: detector_rows("regnety")}
        for name, step in steps.items():
            started = time.perf_counter()
            try:
                results["models"][name] = step()
            except Exception as exc:  # say which model could not be traced, keep the others
                import traceback
                traceback.print_exc()
                results["models"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            results["models"][name]["seconds"] = round(time.perf_counter() - started, 1)
            print(name, json.dumps(results["models"][name]), flush=True)
    return results


def main() -> int:
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    results = measure()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    for name, rows in results["models"].items():
        for precision in ("fp32", "fp16"):
            if precision in rows:
                print(f"{name:<8} {precision}  weights {rows[precision]['weights'] / MB:8.1f} MB  "
                      f"activations {rows[precision]['activations'] / MB:8.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
