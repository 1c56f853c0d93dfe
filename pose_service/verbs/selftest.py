"""`pose-service selftest [--json] [--out FILE]`: every rung of the configured ladder, each in its own
process, on a built-in clip with a real person (pose_service.democlip): load seconds per stage, peak
GPU memory (torch's and NVML's), frames per second, frames with a person. The report is what a user
pastes into an issue after the first run on a new machine; a rung that fails says where and why.

    python -m pose_service.verbs.selftest --rung JSON --clip PATH --frames N --out FILE   (one rung, the child)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Optional

from configs import Config
from pose_common import memplan

RUNG_TIMEOUT_S = 1800


def nvml_used_mb(device: str) -> Optional[float]:
    facts = memplan.read_gpu_facts(device) if str(device).startswith("cuda") else None
    return None if facts is None else round(facts.total_mb - facts.free_mb, 1)


def torch_peak_mb() -> Optional[float]:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return round(torch.cuda.max_memory_reserved() / memplan.MB, 1)
    except Exception:
        return None
    return None


def run_rung(rung: dict, clip: str, frames: int) -> dict[str, Any]:
    """Load the rung's engine stage by stage and run it on the clip's first `frames` frames."""
    from gpu_worker.engines import build_engine
    from pose_common.video import frames as decode

    device = rung.get("device", "cpu")
    row: dict[str, Any] = {"engine": rung["engine"], "device": device,
                           "detector": (rung.get("options") or {}).get("detector"), "precision": None,
                           "stages": [], "load_s": None, "fps": None, "frames": 0, "persons_frames": 0,
                           "gpu_peak_mb": {"torch": None, "nvml": None}, "error": None}
    nvml_peak = [nvml_used_mb(device)]
    try:
        engine = build_engine(rung["engine"], device, dict(rung.get("options") or {}))
        started = time.monotonic()
        for stage in engine.stages():
            row["stage"] = stage.name
            stage_started = time.monotonic()
            stage.run()
            row["stages"].append({"name": stage.name, "seconds": round(time.monotonic() - stage_started, 3)})
            nvml_peak.append(nvml_used_mb(device))
        row.pop("stage")
        row["load_s"] = round(time.monotonic() - started, 3)
        row["precision"] = getattr(getattr(engine, "inner", engine), "precision", None)
        described = engine.describe()
        row.update({k: described[k] for k in ("appearance", "appearance_note", "tf32") if k in described})
        spent = 0.0
        for meta, index, pts, rgb in decode(clip):
            if index >= frames:
                break
            if index == 0:
                engine.begin_video(meta.width, meta.height, meta.fps)
            frame_started = time.monotonic()
            outs = engine.push(index, pts, rgb)
            spent += time.monotonic() - frame_started
            row["persons_frames"] += sum(1 for out in outs if out.persons)
            row["frames"] += 1
            nvml_peak.append(nvml_used_mb(device))
        row["persons_frames"] += sum(1 for out in engine.end_video() if out.persons)
        row["fps"] = round(row["frames"] / spent, 3) if spent > 0 else None
    except Exception as exc:
        where = row.pop("stage", "frames")
        row["error"] = f"{where}: {type(exc).__name__}: {str(exc)[:500]}"
        row["traceback"] = traceback.format_exc()[-2000:]
    seen = [mb for mb in nvml_peak if mb is not None]
    row["gpu_peak_mb"] = {"torch": torch_peak_mb(), "nvml": max(seen) if seen else None}
    return row


def child_main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pose_service.verbs.selftest")
    parser.add_argument("--rung", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    row = run_rung(json.loads(args.rung), args.clip, args.frames)
    with open(args.out, "w") as fh:
        json.dump(row, fh)
    return 0


def rung_in_child(rung: dict, clip: str, frames: int, workdir: str) -> dict[str, Any]:
    """One rung in a fresh process: a crash (segfault, OOM kill) costs that rung's row only."""
    out = os.path.join(workdir, f"rung-{abs(hash(json.dumps(rung, sort_keys=True)))}.json")
    proc = subprocess.run([sys.executable, "-m", "pose_service.verbs.selftest", "--rung", json.dumps(rung),
                           "--clip", clip, "--frames", str(frames), "--out", out], capture_output=True, text=True,
                          timeout=RUNG_TIMEOUT_S)
    if os.path.exists(out):
        with open(out) as fh:
            return json.load(fh)
    return {"engine": rung["engine"], "device": rung.get("device", "cpu"),
            "detector": (rung.get("options") or {}).get("detector"), "precision": None, "load_s": None,
            "fps": None, "persons_frames": 0, "gpu_peak_mb": {"torch": None, "nvml": None},
            "error": f"the rung's process ended with {proc.returncode}: {proc.stderr[-1500:]}"}


def host_facts() -> dict[str, Any]:
    facts = memplan.read_gpu_facts("cuda")
    return {"python": platform.python_version(), "platform": platform.platform(),
            "gpu": None if facts is None else {"name": facts.name, "total_mb": round(facts.total_mb)}}


def selftest(ladder: list[dict], frames: int) -> dict[str, Any]:
    from pose_service.democlip import make_demo_clip

    with tempfile.TemporaryDirectory(prefix="pose-selftest-") as workdir:
        clip = make_demo_clip(os.path.join(workdir, "selftest.mp4"), frames=max(frames, 1))
        rows = [rung_in_child(rung, clip, frames, workdir) for rung in ladder]
    return {"host": host_facts(), "frames": frames, "rungs": rows}


def print_report(report: dict[str, Any]) -> None:
    gpu = report["host"]["gpu"]
    print(f"pose-service selftest: python {report['host']['python']}, "
          + ("no GPU seen through NVML" if gpu is None else f"{gpu['name']} {gpu['total_mb']} MB"))
    for row in report["rungs"]:
        name = f"{row['engine']}@{row['device']}" + (f"({row['detector']})" if row.get("detector") else "")
        if row.get("error"):
            print(f"  {name:<32} FAILED {row['error']}")
            continue
        peak = row["gpu_peak_mb"]
        print(f"  {name:<32} load {row['load_s']:.1f} s, {row['fps'] or 0:.2f} fps, person in "
              f"{row['persons_frames']}/{row.get('frames', report['frames'])} frames, precision {row['precision']}, "
              f"GPU peak torch {peak['torch']} MB / NVML {peak['nvml']} MB")
        if row.get("appearance_note"):
            print(f"  {'':<32} appearance {row['appearance']}: {row['appearance_note']}")


def selftest_command(cfg: Config, args: Any) -> int:
    from configs import rungs

    report = selftest(rungs(cfg), args.frames)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    if args.json:
        print(text)
    else:
        print_report(report)
    return 0 if any(not row.get("error") for row in report["rungs"]) else 1


if __name__ == "__main__":
    sys.exit(child_main())
