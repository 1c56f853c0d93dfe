"""Each frame of a short result as a JPEG with the pose drawn, inline in the legacy result
(`frames[i].image_base64`): the mobile app's VideoCoachScreen shows them in its carousel. Only for
results of at most gateway.inline_frame_images_max frames; a longer one says where to get them
(GET /frame/{job}/{idx}) instead of growing the answer by a JPEG per frame."""
from __future__ import annotations

import base64
from typing import Optional, Sequence

import numpy as np

from pose_common.drawing import draw_persons
from pose_common.paths import open_inside
from pose_common.video import TruncatedVideo, frames

JPEG_QUALITY = 85


def overlay_jpegs(video_path: str, roots: Sequence[str], stored: list[dict], names: Sequence[str],
                  max_pixels: int) -> dict[int, bytes]:
    """frame index -> JPEG of that decoded frame (rotation applied, as the worker saw it) with its stored
    persons drawn. One pass over the video, stopping after the last frame wanted."""
    wanted = {int(frame["frame_index"]): frame.get("persons") or [] for frame in stored}
    out: dict[int, bytes] = {}
    if not wanted:
        return out
    last = max(wanted)
    with open_inside(video_path, roots) as readable:
        try:
            for _meta, index, _pts, rgb in frames(readable, 0, max_pixels):
                if index in wanted:
                    out[index] = drawn_jpeg(rgb, wanted[index], names)
                if index >= last:
                    break
        except TruncatedVideo:
            pass  # the frames before the cut were drawn; the result says the video was cut
    return out


def drawn_jpeg(rgb: np.ndarray, persons: list, names: Sequence[str]) -> bytes:
    import cv2

    bgr = draw_persons(np.ascontiguousarray(rgb[:, :, ::-1]), persons, names)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return jpeg.tobytes()


def attach_images(result: dict, jpegs: dict[int, bytes]) -> None:
    """frames[i].image_base64 from the frame's original index; a frame that could not be decoded again
    carries image_base64 null."""
    for frame in result["frames"]:
        jpeg: Optional[bytes] = jpegs.get(frame["originalFrameNumber"])
        frame["image_base64"] = base64.b64encode(jpeg).decode("ascii") if jpeg is not None else None


def omitted_note(job_id: str, count: int, limit: int) -> str:
    return (f"frame images left out: {count} frames is more than gateway.inline_frame_images_max ({limit}); "
            f"GET /frame/{job_id}/<frameNumber> serves each one as a JPEG with the pose drawn")
