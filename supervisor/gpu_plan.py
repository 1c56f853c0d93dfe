"""The worker slot's use of the GPU memory plan (pose_common/memplan.py): at start (and at every
fresh start: reload, revival) it reads the card through NVML and picks the best rung that fits with
a margin; before a step-up probe it checks that the probe fits beside the worker, and otherwise
waits and says why. A ladder with no GPU rung, or a host without NVML, is left as it is."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from pose_common import memplan

FactsReader = Callable[[str], Optional[memplan.GpuFacts]]


class MemoryPlanner:
    def __init__(self, ladder: Sequence[Mapping[str, Any]], read_facts: FactsReader = memplan.read_gpu_facts):
        self.ladder, self.read_facts = ladder, read_facts
        self.start: Optional[dict[str, Any]] = None
        self.step_up_note: Optional[str] = None

    def gpu_device(self) -> Optional[str]:
        return next((str(r.get("device")) for r in self.ladder if memplan.on_gpu(r)), None)

    def start_rung(self) -> int:
        device = self.gpu_device()
        if device is None:
            return 0
        facts = self.read_facts(device)
        choice = memplan.start_rung(self.ladder, facts)
        self.start = {"rung": choice.rung, "precision": choice.precision, "reason": choice.reason,
                      "gpu": vars(facts) if facts else None}
        return choice.rung

    def as_planned(self, index: int, rung: Mapping[str, Any]) -> dict[str, Any]:
        """The rung as the worker gets it: where the plan chose this rung's precision from NVML (its
        option is auto), the worker is told it, rather than reading NVML again after its own CUDA
        context has taken memory (which would count the context twice)."""
        planned = dict(rung)
        choice = self.start
        if (choice is None or choice["rung"] != index or choice["gpu"] is None or not memplan.on_gpu(rung)
                or memplan.rung_precision_option(rung) != "auto"):
            return planned
        planned["options"] = {**(rung.get("options") or {}), "precision": choice["precision"]}
        return planned

    def may_step_up(self, target: Mapping[str, Any]) -> bool:
        facts = self.read_facts(str(target.get("device"))) if memplan.on_gpu(target) else None
        ok, reason = memplan.step_up_gate(target, facts)
        self.step_up_note = None if ok else reason
        return ok

    def describe(self) -> dict[str, Any]:
        return {"start": self.start, "step_up": self.step_up_note}
