"""`pose-service diagnose`: load the engine stage by stage, each in a fresh process, so a crash is
that stage's alone; print the stages' times and memory and, for a failure, its cause and remedy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Optional

from configs import Config


def diagnose(cfg: Config, args) -> int:
    from configs import dump_config, rungs
    from pose_common import hostinfo
    from supervisor.causes import Death, decode_exit

    rung = dict(rungs(cfg)[0])
    if args.engine:
        configured = next((r for r in rungs(cfg) if r["engine"] == args.engine), {})
        default_device = "cuda" if args.engine == "hmr2_phalp" else "cpu"
        rung = {"engine": args.engine, "device": args.device or configured.get("device") or default_device,
                "options": configured.get("options") or {}}
    elif args.device:
        rung["device"] = args.device
    os.makedirs(cfg.runtime_dir, exist_ok=True)
    config_path = os.path.join(cfg.runtime_dir, "diagnose-config.yaml")
    dump_config(cfg, config_path)
    rows, failed = [], None
    for count, name in enumerate(stage_names(rung), start=1):
        report, code, stderr = run_stages_in_child(config_path, rung, cfg, count)
        stage = (report.get("stages") or [{}])[-1]
        row = {"stage": name, "result": stage.get("result", "failed"), "duration_s": stage.get("duration_s"),
               "rss_delta_mb": _mb(stage.get("rss_delta")), "gpu_delta_mb": _mb(stage.get("gpu_delta"))}
        if code != 0 or not report.get("ok"):
            cause = decode_exit(Death(returncode=code, reported=report if report.get("cause") else None,
                                      stage=report.get("stage"), stderr_tail=stderr,
                                      killed_by_us=("hang: stage deadline" if code == -9 and not report.get("cause")
                                                    else None),
                                      system_memory=hostinfo.system_memory()))
            row.update(result="failed", cause=cause.kind, summary=cause.summary, remedy=cause.remedy)
            failed = row
        rows.append(row)
        if failed:
            break
    out = {"engine": rung, "stages": rows, "ok": failed is None, "failed_stage": failed and failed["stage"],
           "host": hostinfo.host_facts(), "gpu": hostinfo.gpu_facts(), "packages": hostinfo.package_versions()}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print_stage_table(out)
    return 0 if failed is None else 1


def stage_names(rung: dict) -> list[str]:
    from gpu_worker.engines import build_engine
    return [s.name for s in build_engine(rung["engine"], rung.get("device", "cpu"), rung.get("options") or {}).stages()]


def run_stages_in_child(config_path: str, rung: dict, cfg, count: int) -> tuple[dict, int, str]:
    """Stages 1..count in a fresh process, so a crash in stage `count` is that stage's alone."""
    out = os.path.join(cfg.runtime_dir, f"diagnose-{count}.json")
    argv = [sys.executable, "-m", "gpu_worker.probe", "--config", config_path, "--rung", json.dumps(rung),
            "--out", out, "--all-stages", "--stop-after", str(count)]
    deadline = cfg.deadlines.stage_default_s * count
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=deadline)
        code, stderr = proc.returncode, proc.stderr.decode("utf-8", "replace")[-4000:]
    except subprocess.TimeoutExpired as exc:
        code, stderr = -9, (exc.stderr or b"").decode("utf-8", "replace")[-4000:]
    from supervisor.process import read_json
    return read_json(out), code, stderr


def print_stage_table(out: dict) -> None:
    rung = out["engine"]
    print(f"engine {rung['engine']} on {rung.get('device')}")
    print(f"{'stage':<12} {'result':<8} {'time s':>8} {'RSS MB':>8} {'GPU MB':>8}")
    for row in out["stages"]:
        print(f"{row['stage']:<12} {row['result']:<8} {_fmt(row['duration_s']):>8} {_fmt(row['rss_delta_mb']):>8} "
              f"{_fmt(row['gpu_delta_mb']):>8}")
        if row.get("cause"):
            print(f"  cause: {row['cause']}: {row['summary']}\n  remedy: {row['remedy']}")
    gpu = out["gpu"]
    print(f"GPU: {gpu.get('devices') or gpu.get('reason')}")
    print("OK" if out["ok"] else f"FAILED at stage {out['failed_stage']}")


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / (1 << 20), 1)


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)
