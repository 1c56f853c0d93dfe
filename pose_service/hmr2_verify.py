"""What `models verify` checks for hmr2_phalp: the files of every hmr2_phalp rung of the configured
ladder (ViTDet's and RegNetY's detector weights alike), each listed once, plus whether
neural_renderer imports where a CUDA rung would use the texture sampler (optional: without it the
rung falls back to appearance=hmar)."""
from __future__ import annotations

from typing import Any, Optional

from configs import rungs


def hmr2_rungs(cfg: Any, detector: Optional[str]) -> list[dict]:
    found = [r for r in rungs(cfg) if r["engine"] == "hmr2_phalp"] or \
        [{"engine": "hmr2_phalp", "device": "cuda", "options": {}}]
    if detector:
        found = [{**r, "options": {**(r.get("options") or {}), "detector": detector}} for r in found]
    return found


def hmr2_phalp_rows(cfg: Any, detector: Optional[str]) -> list[dict]:
    """The engine's own weights check (asset_rows) for each rung, merged by file."""
    from gpu_worker.engines.hmr2_phalp import Settings, asset_rows, neural_renderer_row

    rows: dict[str, dict] = {}
    wants_texture = False
    for rung in hmr2_rungs(cfg, detector):
        device_type = "cuda" if str(rung.get("device", "cuda")).startswith("cuda") else "cpu"
        settings = Settings.from_options(rung.get("options") or {})
        wants_texture = wants_texture or settings.appearance_on(device_type) == "texture"
        for row in asset_rows(settings, device_type):
            rows.setdefault(row["path"], row)
    listed = list(rows.values())
    return listed + ([neural_renderer_row()] if wants_texture else [])
