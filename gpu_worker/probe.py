"""The detector probe: a throw-away process that loads only what the detector needs, builds it and
runs it once on a blank frame, so a crash there (the user's WSL VM died exactly here) costs a
probe, not the daemon or the long-lived worker. It writes its progress to a JSON file as it goes,
so a silent death still names the stage; the supervisor decodes its exit like a worker's."""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
import traceback

import psutil

from configs import fault_settings, read_config
from gpu_worker.engines import build_engine
from gpu_worker.errors import classify
from gpu_worker.gpu import gpu_memory_used
from gpu_worker.main import die_with_parent


def write(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh)
    os.replace(tmp, path)


def run_stages(engine, stages, report: dict, out: str) -> None:
    proc = psutil.Process()
    for stage in stages:
        entry = {"name": stage.name, "result": "running", "started_at": time.time()}
        report["stages"].append(entry)
        report["stage"] = stage.name
        write(out, report)
        rss, gpu, started = proc.memory_info().rss, gpu_memory_used(), time.monotonic()
        stage.run()
        after_gpu = gpu_memory_used()
        entry.update(result="ok", duration_s=round(time.monotonic() - started, 4),
                     rss_delta=proc.memory_info().rss - rss,
                     gpu_delta=None if after_gpu is None or gpu is None else after_gpu - gpu)
    write(out, report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_worker.probe")
    parser.add_argument("--config", required=True)
    parser.add_argument("--rung", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--all-stages", action="store_true", help="every stage, not just the detector's")
    parser.add_argument("--stop-after", type=int, default=0, help="run only the first N stages")
    args = parser.parse_args(argv)
    die_with_parent()
    faulthandler.enable(file=sys.stderr, all_threads=True)
    cfg = read_config(args.config)
    rung = json.loads(args.rung)
    report = {"rung": rung, "stages": [], "stage": "start", "ok": False}
    write(args.out, report)
    fault = fault_settings(cfg)
    try:
        engine = build_engine(rung["engine"], rung.get("device", "cpu"), rung.get("options") or {},
                              fault=fault, counter_dir=cfg.runtime_dir)
        engine.check("start")
        stages = engine.stages() if args.all_stages else engine.probe_stages()
        if args.stop_after:
            stages = stages[:args.stop_after]
        run_stages(engine, stages, report, args.out)
    except Exception as exc:
        cause, code = classify(exc, during_load=True)
        if report["stages"]:
            report["stages"][-1]["result"] = "failed"
        report.update(cause=cause, exc_type=type(exc).__name__, message=str(exc)[:2000],
                      traceback=traceback.format_exc()[-4000:])
        write(args.out, report)
        return code
    report["ok"] = True
    write(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
