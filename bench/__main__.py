"""Benchmarks, in one run so the ratios compare like with like on a noisy VM:

1. throughput: daemon end-to-end (supervisor + spawned worker, resident engine) vs the raw engine
   loop in-process on the same clip (goal >= 0.95);
2. memory: worker peak RSS on the clip vs the same clip repeated 20x (goal <= 1.10x);
3. recovery: SIGKILL the worker mid-job; time from the kill to the next stored frame, frames lost
   (goal 0) and recomputed (goal <= 1);
4. warm daemon vs the old design (a fresh process that loads the engine for every request).

Usage: python -m bench [--clip PATH] [--repeat 20] [--engine mediapipe]
Prints a table and writes bench/results/latest.json."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import SHARED_DATA, Stack, wait_for  # noqa: E402


def raw_engine_fps(clip: str, engine_name: str, options: Optional[dict] = None) -> float:
    from gpu_worker.engines import build_engine
    from pose_common.video import frames

    engine = build_engine(engine_name, "cpu", options or {})
    for stage in engine.stages():
        stage.run()
    started, count = time.perf_counter(), 0
    for meta, index, pts, rgb in frames(clip):
        if count == 0:
            engine.begin_video(meta.width, meta.height, meta.fps)
        engine.push(index, pts, rgb)
        count += 1
    engine.end_video()
    return count / (time.perf_counter() - started)


def daemon_job(stack: Stack, clip: str) -> tuple[float, dict]:
    """Seconds from submit to done on a warm daemon, and the job."""
    started = time.perf_counter()
    job = stack.wait_job(stack.submit(Path(clip)), timeout=3600)
    return time.perf_counter() - started, job


def repeat_clip(clip: str, times: int, out: str) -> str:
    import av

    with av.open(clip) as src, av.open(out, "w") as dst:
        in_stream = src.streams.video[0]
        stream = dst.add_stream("libx264", rate=in_stream.guessed_rate or 30)
        stream.width, stream.height, stream.pix_fmt = in_stream.width, in_stream.height, "yuv420p"
        decoded = [f.to_ndarray(format="rgb24") for f in src.decode(in_stream)]
        for _ in range(times):
            for rgb in decoded:
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


def recovery(stack: Stack, clip: str) -> dict:
    """SIGKILL the worker mid-job; time until the replacement worker stores its first frame."""
    job_id = stack.submit(Path(clip))
    wait_for(lambda: stack.conn.job(job_id).get("frames_done", 0) >= 40, 120, interval=0.02, what="40 frames")
    old = stack.conn.diagnostics()["worker"]
    killed_at = time.perf_counter()
    os.kill(old["pid"], signal.SIGKILL)
    busy_again = wait_for(lambda: (w := stack.conn.diagnostics()["worker"])["generation"] > old["generation"]
                          and w["state"] == "busy" and stack.conn.job(job_id), 120, interval=0.01, what="redispatch")
    wait_for(lambda: stack.conn.job(job_id)["frames_done"] > busy_again["frames_done"], 120, interval=0.005,
             what="first frame of the new worker")
    recovered = time.perf_counter() - killed_at
    job = stack.wait_job(job_id, timeout=600)
    result = stack.result(job)
    indices = [f["frame_index"] for f in result["frames"]]
    crash = next(c for c in stack.crashes() if c["generation"] == old["generation"])
    resumed_at = busy_again["frames_done"]
    return {"mttr_s": round(recovered, 3), "frames_lost": len(set(range(len(indices))) ^ set(indices)),
            "duplicates": len(indices) - len(set(indices)),
            "frame_in_progress_at_kill": crash["frame_index"], "resumed_at_frame": resumed_at,
            # frames the dead worker had finished but the ledger had not stored, computed again
            "frames_recomputed": max(0, (crash["frame_index"] or 0) - resumed_at)}


def cold_process_latency(image_request: str, engine_name: str) -> float:
    """The old design: a fresh Python process loads the engine and answers one request."""
    code = ("import sys,time;t=time.perf_counter();from gpu_worker.engines import build_engine;"
            "import cv2;e=build_engine(sys.argv[1],'cpu',{});[s.run() for s in e.stages()];"
            "img=cv2.cvtColor(cv2.imread(sys.argv[2]),cv2.COLOR_BGR2RGB);e.infer_image(img);"
            "print(time.perf_counter()-t)")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, engine_name, image_request], check=True, cwd=REPO,
                   capture_output=True)
    return time.perf_counter() - started


def warm_image_latency(stack: Stack, image: str, n: int = 10) -> float:
    data = Path(image).read_bytes()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        status, body = stack.conn.request("image", timeout=60, blobs=[data])
        assert status == 200, body
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def clip_or_demo(clip: str, tmp: Path) -> str:
    """The clip asked for, or (without ../shared) a generated one with a real person in it."""
    if Path(clip).exists():
        return clip
    from pose_service.democlip import make_demo_clip
    return make_demo_clip(str(tmp / "demo.mp4"), frames=120)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--clip", default=str(SHARED_DATA / "snowboard_k0z18lmds.mp4"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--engine", default="mediapipe")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pose-bench-"))
    clip = clip_or_demo(args.clip, tmp)
    image = str(SHARED_DATA / "person_standing.jpg")
    if not Path(image).exists():
        import cv2
        from skimage.data import astronaut
        image = str(tmp / "astronaut.jpg")
        cv2.imwrite(image, cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    long_clip = repeat_clip(clip, args.repeat, str(tmp / "long.mp4"))

    out: dict = {"engine": args.engine, "clip": Path(clip).name, "repeat": args.repeat, "cpus": os.cpu_count()}
    raw = raw_engine_fps(long_clip, args.engine)
    # the overlay is a separate artifact written after the frames: like with like, it is left out here
    stack = Stack(tmp, [f"engine.name={args.engine}", "probe.enabled=false", "jobs.render_overlay=false"])
    try:
        stack.wait_ready(120)
        _, job = daemon_job(stack, clip)
        short_rss = stack.result(job)["summary"]["worker_peak_rss"]
        stack.conn.request("reload")  # a fresh worker, so the long clip's peak is its own
        wait_for(lambda: stack.conn.diagnostics()["worker"]["generation"] > 1 and stack.conn.health()
                 .get("status") == "ready", 120, what="reloaded worker")
        seconds, long_job = daemon_job(stack, long_clip)
        long_rss = stack.result(long_job)["summary"]["worker_peak_rss"]
        frames = long_job["frames_done"]
        out["throughput"] = {"frames": frames, "raw_fps": round(raw, 2),
                             "daemon_fps_submit_to_done": round(frames / seconds, 2),
                             "ratio": round(frames / seconds / raw, 3), "goal": ">= 0.95"}
        out["memory"] = {"short_peak_rss_mb": round(short_rss / 2**20, 1),
                         "long_peak_rss_mb": round(long_rss / 2**20, 1), "long_frames": long_job["frames_done"],
                         "ratio": round(long_rss / short_rss, 3), "goal": "<= 1.10"}
        out["recovery"] = recovery(stack, clip)
        warm = warm_image_latency(stack, image)
    finally:
        stack.stop()
    cold = cold_process_latency(image, args.engine)
    out["warm_vs_cold"] = {"warm_daemon_image_s": round(warm, 4), "fresh_process_image_s": round(cold, 3),
                           "speedup": round(cold / warm, 1)}
    print_table(out)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "latest.json").write_text(json.dumps(out, indent=2))
    return 0


def print_table(out: dict) -> None:
    print(f"engine {out['engine']} on {out['clip']} ({out['cpus']} CPUs)")
    for section in ("throughput", "memory", "recovery", "warm_vs_cold"):
        print(f"  {section}:")
        for key, value in out[section].items():
            print(f"    {key:<24} {value}")


if __name__ == "__main__":
    sys.exit(main())
