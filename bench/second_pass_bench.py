"""The second pass (gpu_worker/engines/roi.py) on the shared clip, in one run: persons found with and
without it, and what it costs. Frames the first pass finds must cost the same with it on (goal: ratio
within noise of 1.0); the frames it rescues cost a few extra detections each.

Usage: python -m bench.second_pass_bench [--clip PATH] [--rounds 3]
Prints a table and writes bench/results/second_pass.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import CLIP  # noqa: E402


def decode(clip: str) -> list:
    from pose_common.video import frames
    return [(index, pts, rgb) for _, index, pts, rgb in frames(clip)]


def timed_pass(frames: list, second_pass: bool) -> tuple[list[float], list[bool], int]:
    """Per-frame seconds, whether each frame has a person, and the regions the second pass tried."""
    from gpu_worker.engines.mediapipe_engine import MediaPipeEngine

    engine = MediaPipeEngine("cpu", {"second_pass": second_pass})
    for stage in engine.stages():
        stage.run()
    height, width = frames[0][2].shape[:2]
    engine.begin_video(width, height, 30.0)
    seconds, found = [], []
    for index, pts, rgb in frames:
        started = time.perf_counter()
        out = engine.push(index, pts, rgb)[0]
        seconds.append(time.perf_counter() - started)
        found.append(bool(out.persons))
    engine.close()
    return seconds, found, engine.second_pass.tried


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", default=str(CLIP))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.clip).exists():
        print(f"no clip at {args.clip}: pass --clip")
        return 2
    frames = decode(args.clip)
    off_s, on_s = [], []
    for _ in range(args.rounds):  # interleaved, so drift on a noisy VM hits both alike
        off_seconds, off_found, _ = timed_pass(frames, False)
        on_seconds, on_found, tried = timed_pass(frames, True)
        off_s.append(off_seconds)
        on_s.append(on_seconds)
    first_pass = [i for i, hit in enumerate(off_found) if hit]
    rescued = [i for i, hit in enumerate(on_found) if hit and not off_found[i]]

    def median_over(per_round: list[list[float]], indices: list[int]) -> float:
        return statistics.median(statistics.median(seconds[i] for i in indices) for seconds in per_round)

    out = {
        "clip": Path(args.clip).name, "frames": len(frames), "rounds": args.rounds,
        "found_first_pass": len(first_pass), "found_with_second_pass": sum(on_found),
        "regions_tried": tried,
        "ms_per_frame_first_pass_frames_off": round(1000 * median_over(off_s, first_pass), 2),
        "ms_per_frame_first_pass_frames_on": round(1000 * median_over(on_s, first_pass), 2),
        "ms_per_rescued_frame": round(1000 * median_over(on_s, rescued), 2) if rescued else None,
    }
    out["first_pass_frames_cost_ratio"] = round(out["ms_per_frame_first_pass_frames_on"]
                                                / out["ms_per_frame_first_pass_frames_off"], 3)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "second_pass.json").write_text(json.dumps(out, indent=2))
    for key, value in out.items():
        print(f"{key:40s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
