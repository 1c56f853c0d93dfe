"""`pose-service drill FAULT`: arm a fault in a running daemon, feed it a clip if the fault is at a
frame, and print what the supervisor concluded (cause, stage, frame, remedy)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from configs import Config
from pose_service.daemon_client import DaemonClient, TokenUnreadable


def drill(cfg: Config, args) -> int:
    at = args.at or "frame:5"
    try:
        daemon = DaemonClient.for_config(cfg, args.url)
    except TokenUnreadable as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return 2
    call = daemon.call

    _, before = call("GET", "/v1/diagnostics")
    seen = {c["id"] for c in before.get("crashes", [])}
    status, armed = call("POST", "/v1/drill", {"kind": args.fault, "at": at})
    if status != 200:
        print(f"drill refused ({status}): {armed.get('error')}", file=sys.stderr)
        return 2
    print(f"armed {args.fault} at {at}")
    if at.startswith("frame:"):
        from pose_service.democlip import make_demo_clip
        with tempfile.TemporaryDirectory() as tmp:
            clip = make_demo_clip(os.path.join(tmp, "drill.mp4"), frames=max(30, int(at[6:]) + 10))
            status, job = daemon.upload("/v1/jobs", clip)
        print(f"drill job: {job.get('job_id') or job}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        _, diag = call("GET", "/v1/diagnostics")
        new = [c for c in diag.get("crashes", []) if c["id"] not in seen]
        if new:
            report = new[-1]
            print(json.dumps({k: report.get(k) for k in ("process", "stage", "frame_index", "cause", "summary",
                                                        "exit_code", "signal", "remedy")}, indent=2))
            print(f"health now: {diag['health']['status']} ({diag['health']['worker']})")
            return 0
        time.sleep(0.5)
    print("no crash report within the timeout", file=sys.stderr)
    return 1
