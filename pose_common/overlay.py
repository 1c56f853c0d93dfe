"""Overlay video: the source frames with the stored poses drawn on, one output frame per input
frame, at the source frame rate. Run by the supervisor in its own process after a job completes
(`python -m pose_common.overlay VIDEO RESULT OUT`); it reads the finished result, never the GPU."""
from __future__ import annotations

import json
import os
import sys

import av
import numpy as np

from pose_common.video import frames
from pose_common.drawing import draw_persons


def render_overlay(video: str, result_path: str, out: str) -> int:
    with open(result_path) as fh:
        result = json.load(fh)
    persons = {f["frame_index"]: f["persons"] for f in result["frames"]}
    names = result.get("joint_names") or []
    tmp = out + ".tmp.mp4"
    count = 0
    with av.open(tmp, "w") as container:
        stream = None
        for meta, index, _pts, rgb in frames(video):
            if stream is None:
                stream = _open_stream(container, meta.fps, rgb.shape[1], rgb.shape[0])
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            drawn = draw_persons(bgr, persons.get(index, []), names)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(drawn[:, :, ::-1]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    os.replace(tmp, out)
    return count


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
    sys.exit(0 if render_overlay(*sys.argv[1:4]) >= 0 else 1)
