"""A single video frame as a JPEG for the legacy routes (/frame, /pose/hybrid's visualization):
seek by index or time, draw the stored pose, encode."""
from __future__ import annotations

import base64
from typing import Optional, Sequence

from pose_common.drawing import draw_persons
from pose_common.paths import open_inside

JPEG_QUALITY = 90


def render_visualization(image: bytes, persons: list, names: Sequence[str]) -> Optional[str]:
    import cv2
    import numpy as np

    bgr = cv2.imdecode(np.frombuffer(image, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    ok, png = cv2.imencode(".png", draw_persons(bgr, persons, names))
    return base64.b64encode(png.tobytes()).decode("ascii") if ok else None


def read_frame_jpeg(video_path: str, index: int, pts_s: Optional[float], persons: list, names: Sequence[str],
                    overlay: bool, max_pixels: int) -> bytes:
    """Decode frame `index` (seek to the keyframe before its pts, decode forward), draw, JPEG."""
    import av

    try:
        return _read_frame_jpeg(video_path, index, pts_s, persons, names, overlay, max_pixels)
    except (av.FFmpegError, IndexError) as exc:  # the file changed since the job read it
        raise ValueError(f"frame {index} could not be decoded") from exc


def _read_frame_jpeg(video_path: str, index: int, pts_s: Optional[float], persons: list, names: Sequence[str],
                     overlay: bool, max_pixels: int) -> bytes:
    import av
    import cv2

    from pose_common.video import check_declared_size, to_rgb

    with av.open(video_path) as container:
        stream = container.streams.video[0]
        check_declared_size(stream, max_pixels)
        frame = None
        if pts_s is not None and stream.time_base:
            start = stream.start_time or 0
            target = start + int(round(pts_s / stream.time_base))
            rate = float(stream.guessed_rate or stream.average_rate or 30)
            tolerance = max(1, int(0.5 / (rate * stream.time_base)))
            container.seek(target, stream=stream, backward=True, any_frame=False)
            for candidate in container.decode(stream):
                if candidate.pts is None:
                    break
                if abs(candidate.pts - target) <= tolerance:
                    frame = candidate
                    break
                if candidate.pts > target + tolerance:
                    break
        if frame is None:  # no usable pts: count frames from the start, as the worker did
            container.seek(0, stream=stream, backward=True, any_frame=False)
            for i, candidate in enumerate(container.decode(stream)):
                if i == index:
                    frame = candidate
                    break
        if frame is None:
            raise ValueError(f"frame {index} could not be decoded")
        bgr = cv2.cvtColor(to_rgb(frame), cv2.COLOR_RGB2BGR)
    if overlay:
        draw_persons(bgr, persons, names)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return jpeg.tobytes()


def frame_jpeg(video_path: str, roots: list, index: int, pts_s: Optional[float], persons: list, names: Sequence[str],
               overlay: bool, max_pixels: int) -> bytes:
    """The frame, from the very file checked to be inside the roots (not a symlink swapped in later)."""
    with open_inside(video_path, roots) as readable:
        return read_frame_jpeg(readable, index, pts_s, persons, names, overlay, max_pixels)
