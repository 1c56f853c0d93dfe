"""Overlay video: the source frames of a job's result with the stored poses drawn on, at the source
frame rate (every frame, or the sampled ones for a max_frames job). Run by the supervisor in its own
process after the job's frames are stored (`python -m pose_common.overlay LEDGER JOB VIDEO OUT`);
it reads the ledger frame by frame, never the GPU, and writes to a temporary name first, so the
overlay either exists whole or not at all."""
from __future__ import annotations

import os
import sys
from typing import Iterator, Optional

import av
import numpy as np

from pose_common.drawing import draw_persons
from pose_common.ledger_open import open_ledger_at
from pose_common.video import TruncatedVideo, frames


def render_overlay(ledger_path: str, job_id: str, video: str, out: str) -> int:
    """-> the number of frames written."""
    ledger = open_ledger_at(ledger_path, readonly=True)
    try:
        job = ledger.job(job_id)
        names = (job.engine() if job else {}).get("joint_names") or []
        return _render(video, ledger.iter_frames(job_id), names, out)
    finally:
        ledger.close()


def _render(video: str, stored: Iterator[dict], names: list, out: str) -> int:
    tmp = out + ".tmp.mp4"
    count = 0
    entry: Optional[dict] = next(stored, None)
    with av.open(tmp, "w") as container:
        stream = None
        for meta, index, _pts, rgb in decoded(video):
            while entry is not None and entry["frame_index"] < index:
                entry = next(stored, None)
            if entry is None:
                break
            if entry["frame_index"] != index:
                continue  # not part of the result (a sampled job)
            if stream is None:
                stream = _open_stream(container, meta.fps, rgb.shape[1], rgb.shape[0])
            drawn = draw_persons(np.ascontiguousarray(rgb[:, :, ::-1]), entry["persons"], names)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(drawn[:, :, ::-1]),
                                                                   format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    os.replace(tmp, out)
    return count


def decoded(video: str):
    """The video's frames up to where decoding stops (a truncated file's result ends there too)."""
    try:
        yield from frames(video)
    except TruncatedVideo:
        return


def _open_stream(container, fps: float, width: int, height: int):
    from fractions import Fraction

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = width - width % 2, height - height % 2
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        stream.options = {"preset": "veryfast", "crf": "23"}
    return stream


def overlay_path(result_path: str) -> str:
    return result_path[: -len(".json")] + ".overlay.mp4"


if __name__ == "__main__":
    sys.exit(0 if render_overlay(*sys.argv[1:5]) > 0 else 1)
