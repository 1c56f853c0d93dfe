"""What the user waits for: submit -> `done` (every artifact whole, the overlay included) against
the plain engine loop over the same frames, in one run so the ratios compare like with like.

For the shared clip and the same clip N times over, in interleaved rounds (median of each):
  raw          the engine in-process: decode + push every frame (no daemon, no ledger, no overlay)
  native       POST /v1/jobs until the ledger stamps `done`, overlay on (what the app waits for; the
               client polls at a light client's pace, see POLL_S)
  native, off  the same with jobs.render_overlay=false (the daemon's own overhead)
  no standby   with --without-standby: overlay on, but no warm standby (jobs.overlay_standby=false: the
               overlay process starts when the job reaches the worker)
  legacy sync  POST /process_video with the file uploaded, until its 200 (the backend's route)
the overlay's tail (from the last frame stored to `done`, in seconds and in the engine's frame
times), and the second pass's share of the raw engine's time (second_pass on vs off, short clip).

Usage: python -m bench.user_wait [--clip PATH] [--repeat 20] [--rounds 3] [--engine mediapipe]
                                [--without-standby]
Prints a table and writes bench/results/user_wait.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from bench.__main__ import REPO, clip_or_demo, raw_engine_fps, repeat_clip

from support import SHARED_DATA, Served, http, post_form, wait_for

# How often the native client asks. The app asks every 1 s; a client asking every 20 ms took 1.4 CPU-seconds
# of a 16 s job on 2 cores (its own and the gateway's), CPU the worker then lacked. So the client asks at
# a light client's pace and the wait ends at `done` as the ledger stamps it, not when the client saw it.
POLL_S = 0.25


def raw_seconds(clip: str, engine: str, options: dict | None = None) -> float:
    frames = frame_count(clip)
    return frames / raw_engine_fps(clip, engine, options or {})


def frame_count(clip: str) -> int:
    import av

    with av.open(clip) as container:
        return sum(1 for _ in container.decode(video=0))


def native_seconds(served: Served, clip: str, tails: list[float]) -> float:
    """From just before the POST to the `done` the ledger stamped (both wall-clock times, this machine)."""
    submitted_at = time.time()
    status, body = http("POST", served.url + "/v1/jobs", {"video_path": clip})
    assert status == 202, body
    job = wait_for(lambda: (j := served.job(body["job_id"])).get("status") in ("done", "error") and j, 3600,
                   interval=POLL_S, what="job done")
    assert job["status"] == "done", job
    at = event_times(served, body["job_id"])
    tails.append(at["done"] - at["rendering"])
    return at["done"] - submitted_at


def event_times(served: Served, job_id: str) -> dict[str, float]:
    """When the job entered each state, from the ledger's events (the last time for a state entered twice):
    the overlay's tail is from the last frame stored (`rendering`) to `done`."""
    from pose_common.ledger import Ledger

    ledger = Ledger(str(served.state_dir / "ledger.sqlite3"), readonly=True)
    try:
        return {e["type"]: e["at"] for e in ledger.events_since(job_id)}
    finally:
        ledger.close()


def legacy_sync_seconds(served: Served, clip: str) -> float:
    data = Path(clip).read_bytes()
    started = time.perf_counter()
    status, body = post_form(served.url + "/process_video", {"max_frames": "999999"}, "video", Path(clip).name,
                             data, timeout=3600)
    assert status == 200 and body["status"] == "success", body
    return time.perf_counter() - started


def serve(tmp: Path, name: str, engine: str, overlay: bool, standby: bool = True) -> Served:
    served = Served(tmp / name, [f"engine.name={engine}", "probe.enabled=false", f"jobs.render_overlay={overlay}",
                                 f"jobs.overlay_standby={standby}"])
    served.wait_ready(180)
    return served


def one_round(clips: dict[str, str], engine: str, on: Served, off: Served, cold: Optional[Served]) -> dict:
    measured: dict = {}
    for label, clip in clips.items():
        tails: list[float] = []
        measured[label] = {"raw": raw_seconds(clip, engine), "native": native_seconds(on, clip, tails),
                           "native_overlay_off": native_seconds(off, clip, []),
                           "legacy_sync": legacy_sync_seconds(on, clip)}
        measured[label]["overlay_tail"] = tails[0]
        if cold is not None:
            measured[label]["native_no_standby"] = native_seconds(cold, clip, [])
    short = clips["short"]
    measured["second_pass"] = {"on": raw_seconds(short, engine, {"second_pass": True}),
                               "off": raw_seconds(short, engine, {"second_pass": False})}
    return measured


def summarize(rounds: list[dict], frames: dict[str, int]) -> dict:
    def median(path: tuple[str, str]) -> float:
        return statistics.median(r[path[0]][path[1]] for r in rounds)

    out: dict = {}
    for label, count in frames.items():
        raw = median((label, "raw"))
        row = {"frames": count, "raw_s": round(raw, 2), "raw_fps": round(count / raw, 1)}
        for way in ways(rounds):
            seconds = median((label, way))
            row[f"{way}_s"] = round(seconds, 2)
            row[f"{way}_vs_raw"] = round(raw / seconds, 3)  # throughput ratio: >= 0.9 is the goal
        tail = median((label, "overlay_tail"))
        row["overlay_tail_s"] = round(tail, 3)
        row["overlay_tail_frames"] = round(tail / (raw / count), 1)  # in the raw engine's frame times
        out[label] = row
    on, off = median(("second_pass", "on")), median(("second_pass", "off"))
    out["second_pass"] = {"raw_s_on": round(on, 2), "raw_s_off": round(off, 2),
                          "share_of_engine_time": round(max(0.0, on - off) / on, 3)}
    return out


def ways(rounds: list[dict]) -> list[str]:
    """The daemon runs measured: native without the standby only with --without-standby."""
    return [way for way in WAYS if way in rounds[0]["short"]]


WAYS = {"native": "native", "native_overlay_off": "overlay off", "legacy_sync": "legacy sync",
        "native_no_standby": "no standby"}


def print_table(summary: dict, rounds: list[dict]) -> None:
    print(f"submit -> done, median of {len(rounds)} interleaved rounds; ratio = raw engine time / daemon time")
    print(f"{'clip':<7}{'frames':>7}{'raw s':>9}" + "".join(f"{WAYS[w]:>16}" for w in ways(rounds)))
    for label in ("short", "long"):
        row = summary[label]
        cells = [f"{row[f'{w}_s']:.2f}s {row[f'{w}_vs_raw']:.2f}x" for w in ways(rounds)]
        print(f"{label:<7}{row['frames']:>7}{row['raw_s']:>9.2f}" + "".join(f"{c:>16}" for c in cells))
    for label in ("short", "long"):
        row = summary[label]
        print(f"{label}: the overlay ended {row['overlay_tail_s']:.2f}s after the last frame was stored "
              f"({row['overlay_tail_frames']} frames of engine time)")
    sp = summary["second_pass"]
    print(f"second pass: {sp['share_of_engine_time']:.1%} of the raw engine's time on the short clip "
          f"({sp['raw_s_on']:.2f}s with, {sp['raw_s_off']:.2f}s without)")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.user_wait")
    parser.add_argument("--clip", default=str(SHARED_DATA / "snowboard_k0z18lmds.mp4"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", default="mediapipe")
    parser.add_argument("--without-standby", action="store_true",
                        help="also measure the overlay drawn without a warm standby (jobs.overlay_standby=false)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pose-bench-wait-"))
    clip = clip_or_demo(args.clip, tmp)
    short = str(tmp / Path(clip).name)
    Path(short).write_bytes(Path(clip).read_bytes())
    clips = {"short": short, "long": repeat_clip(short, args.repeat, str(tmp / "long.mp4"))}
    on, off = serve(tmp, "overlay-on", args.engine, True), serve(tmp, "overlay-off", args.engine, False)
    cold = serve(tmp, "no-standby", args.engine, True, standby=False) if args.without_standby else None
    try:
        rounds = [one_round(clips, args.engine, on, off, cold) for _ in range(args.rounds)]
    finally:
        for served in (on, off, cold):
            if served is not None:
                served.stop()
    summary = summarize(rounds, {label: frame_count(c) for label, c in clips.items()})
    print_table(summary, rounds)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "user_wait.json").write_text(json.dumps({"engine": args.engine, "repeat": args.repeat,
                                                        "summary": summary, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
