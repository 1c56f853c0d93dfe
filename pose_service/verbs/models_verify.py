"""`pose-service models verify`: every file the engine needs, present, missing or truncated, and
where to get it."""
from __future__ import annotations

import json
import os
from typing import Optional

from configs import Config


def models_verify(cfg: Config, args) -> int:
    engine = args.engine or cfg.engine.name
    if engine == "hmr2_phalp":
        rows = hmr2_phalp_assets(cfg, args.detector)
    elif engine == "mediapipe":
        rows = mediapipe_assets()
    else:
        rows = []
    if args.json:
        print(json.dumps({"engine": engine, "files": rows}, indent=2))
    else:
        print(f"engine {engine}: {len(rows)} files")
        for row in rows:
            size = "-" if row.get("size") is None else f"{row['size'] / (1 << 20):.1f} MB"
            print(f"  [{row['status']:<9}] {row['name']:<28} {size:>10}  {row['path']}")
            if row.get("problem"):
                print(f"               {row['problem']}")
            if row["status"] != "present":
                print(f"               get it: {row['source']}")
    return 0 if all(r["status"] == "present" or r.get("optional") for r in rows) else 1


def hmr2_phalp_assets(cfg: Config, detector: Optional[str]) -> list[dict]:
    """The files the configured hmr2_phalp rungs read (their detectors, appearance and cache options,
    as the engine applies them), checked by the same function as the engine's weights stage."""
    from pose_service.hmr2_verify import hmr2_phalp_rows
    return hmr2_phalp_rows(cfg, detector)


def mediapipe_assets() -> list[dict]:
    from importlib.util import find_spec

    from gpu_worker.engines.rider_models import MIN_MODEL_BYTES, bundled_models
    spec = find_spec("mediapipe")
    base = os.path.dirname(spec.origin) if spec and spec.origin else ""
    rows = []
    for path in bundled_models(base):
        size = os.path.getsize(path) if os.path.isfile(path) else None
        status = "missing" if size is None else ("truncated" if size < MIN_MODEL_BYTES else "present")
        rows.append({"name": os.path.basename(path), "path": path, "status": status, "size": size,
                     "min_size": MIN_MODEL_BYTES, "source": "pip install --no-deps mediapipe==0.10.21 (bundled)"})
    return rows
