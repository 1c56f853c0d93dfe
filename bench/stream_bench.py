"""Reading a long result does not grow the gateway or the supervisor: peak RSS of both while a
result 20x longer is read as JSON and as NDJSON, against the same for the clip itself, in one run.

Usage: python -m bench.stream_bench [--clip PATH] [--repeat 20]"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bench.__main__ import repeat_clip  # noqa: E402

from support import SHARED_DATA, Stack, http, wait_for  # noqa: E402


def peak_rss_while(pids: dict[str, int], read) -> dict[str, int]:
    """Peak RSS of each process while `read()` runs (sampled every 20 ms)."""
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    peaks = {name: proc.memory_info().rss for name, proc in procs.items()}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            for name, proc in procs.items():
                peaks[name] = max(peaks[name], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        read()
    finally:
        done.set()
        sampler.join()
    return peaks


def read_all(url: str) -> int:
    total = 0
    with urllib.request.urlopen(url, timeout=600) as response:
        while chunk := response.read(1 << 16):
            total += len(chunk)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.stream_bench")
    parser.add_argument("--clip", default=str(SHARED_DATA / "snowboard_k0z18lmds.mp4"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pose-bench-"))
    long_clip = repeat_clip(args.clip, args.repeat, str(tmp / "long.mp4"))
    stack = Stack(tmp, ["engine.name=mediapipe", "probe.enabled=false", "jobs.render_overlay=false",
                        f"jobs.allowed_roots=[{tmp},{Path(args.clip).parent}]"], gateway=True)
    try:
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 120, what="the daemon")
        jobs = {"1x": stack.wait_job(stack.submit(Path(args.clip)), 600),
                f"{args.repeat}x": stack.wait_job(stack.submit(Path(long_clip)), 3600)}
        pids = {"gateway": http("GET", stack.url + "/v1/diagnostics")[1]["gateway_pid"],
                "supervisor": stack.procs["supervisor"].pid}
        out: dict = {"frames": {k: j["frames_done"] for k, j in jobs.items()}}
        read_all(f"{stack.url}/v1/jobs/{jobs['1x']['job_id']}/result")  # warm-up: first-use allocations aside
        for fmt in ("json", "ndjson"):
            for label, job in jobs.items():
                url = f"{stack.url}/v1/jobs/{job['job_id']}/result?format={fmt}"
                size = {}
                peaks = peak_rss_while(pids, lambda: size.setdefault("bytes", read_all(url)))
                out[f"{fmt}_{label}"] = {"bytes": size["bytes"], **{f"{k}_peak_mb": round(v / 2**20, 1)
                                                                    for k, v in peaks.items()}}
        long = f"{args.repeat}x"
        for fmt in ("json", "ndjson"):
            for proc in ("gateway", "supervisor"):
                out[f"ratio_{fmt}_{proc}"] = round(out[f"{fmt}_{long}"][f"{proc}_peak_mb"]
                                                   / out[f"{fmt}_1x"][f"{proc}_peak_mb"], 3)
    finally:
        stack.stop()
    print(json.dumps(out, indent=2))
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "stream.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
