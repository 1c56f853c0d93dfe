"""Engine registry. Each engine is one module behind gpu_worker.engines.base.Engine."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from gpu_worker.engines.fault import FaultEngine

ENGINES = {
    "mediapipe": ("gpu_worker.engines.mediapipe_engine", "MediaPipeEngine"),
    "hmr2_phalp": ("gpu_worker.engines.hmr2_phalp", "HMR2PhalpEngine"),
    "noop": ("gpu_worker.engines.noop", "NoopEngine"),
}


def build_engine(name: str, device: str, options: dict[str, Any], fault: Optional[dict] = None,
                 counter_dir: str = ".") -> FaultEngine:
    """`name` may be "fault", which runs fault["base"]. Every engine is wrapped in a FaultEngine
    (with no plan unless a fault is set), so a drill can arm one later."""
    from gpu_worker.engines.fault import FaultEngine, FaultPlan

    fault = fault or {}
    base = fault.get("base") or "mediapipe" if name == "fault" else name
    if base not in ENGINES:
        raise ValueError(f"unknown engine {base!r}; one of {', '.join(sorted(ENGINES))}")
    module, cls = ENGINES[base]
    inner = getattr(importlib.import_module(module), cls)(device, options)
    plan = None
    if fault.get("kind"):
        plan = FaultPlan(fault["kind"], fault.get("at") or "start", fault.get("times"), counter_dir,
                         float(fault["hang_s"]))
    return FaultEngine(inner, plan)
