"""`pose-service models plan [--gpu-mb N] [--json]`: each rung's GPU memory need (fp32 and fp16, from
the measured table in pose_common.memplan) and the rung a card of N MB (default: this machine's, read
through NVML) would start on."""
from __future__ import annotations

import json
from typing import Any, Optional

from configs import Config, rungs
from pose_common import memplan


def plan(ladder: list[dict], facts: Optional[memplan.GpuFacts]) -> dict[str, Any]:
    choice = memplan.start_rung(ladder, facts)
    rows = [{"engine": rung["engine"], "device": rung.get("device", "cpu"),
             "detector": memplan.detector_of(rung) if rung["engine"] == "hmr2_phalp" else None,
             "need_mb": memplan.rung_need_mb(rung)} for rung in ladder]
    start = ladder[choice.rung]
    return {"gpu": None if facts is None else {"total_mb": round(facts.total_mb), "free_mb": round(facts.free_mb),
                                               "name": facts.name},
            "rungs": rows,
            "start": {"rung": choice.rung, "detector": rows[choice.rung]["detector"], "precision": choice.precision,
                      "engine": start["engine"], "device": start.get("device", "cpu"), "reason": choice.reason}}


def first_gpu_device(ladder: list[dict]) -> str:
    return next((str(r.get("device")) for r in ladder if memplan.on_gpu(r)), "cuda")


def print_plan(result: dict[str, Any]) -> None:
    gpu = result["gpu"]
    print("card: " + ("unknown (no NVML)" if gpu is None else f"{gpu['total_mb']} MB, {gpu['free_mb']} MB free "
                                                              f"{gpu['name']}".rstrip()))
    for index, row in enumerate(result["rungs"]):
        need = row["need_mb"]
        print(f"  rung {index}: {row['engine']}@{row['device']}" + (f"({row['detector']})" if row["detector"] else "")
              + (f"  needs {need['fp32']:.0f} MB fp32, {need['fp16']:.0f} MB fp16" if need["fp32"]
                 else "  no GPU memory"))
    start = result["start"]
    print(f"start: rung {start['rung']} in {start['precision']}: {start['reason']}")


def plan_command(cfg: Config, args: Any) -> int:
    ladder = rungs(cfg)
    facts: Optional[memplan.GpuFacts]
    if args.gpu_mb is not None:
        facts = memplan.card_facts(args.gpu_mb)
    else:
        facts = memplan.read_gpu_facts(first_gpu_device(ladder))
    result = plan(ladder, facts)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_plan(result)
    return 0
