"""The still-image path (MediaPipe's infer_image: first pass, then the second pass's regions) on the
shared clip's frames taken as stills, before and after the closer search for single images (enlarged
centre crops and smaller tiles, gpu_worker/engines/roi.py `closer`): of the frames where the video pass
finds the rider, how many the still path finds, and what each image costs.

Sets: the clip's frames as the app sends them (JPEG, 640x360); the same frames as a wide shot (centred
in a 1920x1080 grey canvas: the rider a third of the size relative to the image); the frames at a
quarter of their size (240x135). Plus the shared photo.

Usage: python -m bench.stills_bench [--clip PATH] [--step N]
Prints a table and writes bench/results/stills.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import CLIP, PHOTO  # noqa: E402


def as_jpeg(rgb: np.ndarray) -> np.ndarray:
    """What the app's frames are: a JPEG of the frame (quality 90), decoded again."""
    import cv2
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1])


def wide_shot(rgb: np.ndarray) -> np.ndarray:
    canvas = np.full((1080, 1920, 3), 128, dtype=np.uint8)
    height, width = rgb.shape[:2]
    y, x = (1080 - height) // 2, (1920 - width) // 2
    canvas[y:y + height, x:x + width] = rgb
    return as_jpeg(canvas)


def quarter(rgb: np.ndarray) -> np.ndarray:
    import cv2
    return as_jpeg(cv2.resize(rgb, (rgb.shape[1] * 3 // 8, rgb.shape[0] * 3 // 8), interpolation=cv2.INTER_AREA))


def engine(options: dict):
    from gpu_worker.engines.mediapipe_engine import MediaPipeEngine

    built = MediaPipeEngine("cpu", options)
    for stage in built.stages():
        stage.run()
    return built


def video_pass(frames: list) -> list[bool]:
    """Whether the video pass (tracking + second pass) finds the rider in each frame."""
    video = engine({})
    height, width = frames[0][2].shape[:2]
    video.begin_video(width, height, 30.0)
    found = [bool(video.push(index, pts, rgb)[0].persons) for index, pts, rgb in frames]
    video.close()
    return found


def stills(images: list[np.ndarray], closer: bool) -> tuple[list[bool], list[float], int]:
    still = engine({"second_pass_image_closer": closer})
    found, seconds = [], []
    for rgb in images:
        started = time.perf_counter()
        found.append(bool(still.infer_image(rgb)))
        seconds.append(time.perf_counter() - started)
    tried = still.second_pass.tried
    still.close()
    return found, seconds, tried


def row(name: str, images: list[np.ndarray], in_video: list[bool]) -> dict:
    out = {"set": name, "images": len(images), "video_pass_finds": sum(in_video)}
    for label, closer in (("before", False), ("after", True)):
        found, seconds, tried = stills(images, closer)
        out[f"{label}_found"] = sum(1 for hit, seen in zip(found, in_video) if hit and seen)
        out[f"{label}_ms_median"] = round(1000 * statistics.median(seconds), 1)
        out[f"{label}_ms_max"] = round(1000 * max(seconds), 1)
        out[f"{label}_ms_total"] = round(1000 * sum(seconds))
        out[f"{label}_regions_tried"] = tried
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", default=str(CLIP))
    parser.add_argument("--step", type=int, default=1, help="every Nth frame of the clip")
    args = parser.parse_args()
    if not Path(args.clip).exists():
        print(f"no clip at {args.clip}: pass --clip")
        return 2
    from pose_common.video import frames as decode

    frames = [(index, pts, rgb) for _, index, pts, rgb in decode(args.clip)]
    in_video = video_pass(frames)[::args.step]
    chosen = [rgb for _, _, rgb in frames[::args.step]]
    rows = [row("clip frames (640x360 JPEG)", [as_jpeg(rgb) for rgb in chosen], in_video),
            row("wide shot (frame centred in 1920x1080)", [wide_shot(rgb) for rgb in chosen], in_video),
            row("small (240x135)", [quarter(rgb) for rgb in chosen], in_video)]
    if PHOTO.exists():
        import cv2
        photo = np.ascontiguousarray(cv2.imread(str(PHOTO))[:, :, ::-1])
        rows.append(row("shared photo (1068x1600)", [photo], [True]))
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "stills.json").write_text(json.dumps(rows, indent=2))
    columns = list(rows[0])
    print(" | ".join(columns))
    for item in rows:
        print(" | ".join(str(item[c]) for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
