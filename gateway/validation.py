"""Input checks that turn bad requests into clear 4xx answers before anything is queued."""
from __future__ import annotations

import os
import re
from typing import Sequence

from gateway.errors import json_error
from pose_common.limits import NotAnImage, TooLarge, check_image
from pose_common.paths import PathRefused, open_inside, resolve_inside

WINDOWS_PATH = re.compile(r"^([A-Za-z]):[\\/](.*)$")


def map_windows_path(path: str, under_wsl: bool) -> str:
    """C:\\Users\\x.mov -> /mnt/c/Users/x.mov when running under WSL (the backend runs on Windows)."""
    match = WINDOWS_PATH.match(path)
    if not match or not under_wsl:
        return path
    drive, rest = match.groups()
    return f"/mnt/{drive.lower()}/" + rest.replace("\\", "/")


def check_video_path(raw: object, allowed_roots: Sequence[str], shown: str = "") -> str:
    """-> the real path of an existing, non-empty regular file inside an allowed root, or raise 4xx.
    The roots are checked first, so nothing is revealed about files outside them (403 either way).
    `shown` is how an answer names the file (the client's own path; never one of ours)."""
    if not isinstance(raw, str) or not raw.strip():
        raise json_error(400, "Missing video_path parameter", code="missing_video_path")
    try:
        real = resolve_inside(raw, allowed_roots)
    except PathRefused as exc:
        raise json_error(400 if exc.code == "bad_path" else 403, str(exc), code=exc.code) from None
    if not os.path.exists(real):
        raise json_error(400, f"Video file not found: {clipped(shown or raw)}", code="not_found")
    if not os.path.isfile(real):
        raise json_error(400, "the video path is not a regular file", code="not_a_file")
    if os.path.getsize(real) == 0:
        raise json_error(400, "the video file is empty (0 bytes)", code="empty")
    if not os.access(real, os.R_OK):
        raise json_error(403, "the video file is not readable by the service", code="unreadable")
    return real


def clipped(text: str, limit: int = 300) -> str:
    """A client's own string echoed back, bounded."""
    return text if len(text) <= limit else text[:limit] + "..."


def probe_video_or_4xx(path: str, roots: Sequence[str], max_pixels: int) -> dict:
    """Open the container and decode one frame before anything is queued: a still image (whatever
    its name) or a file with no video is 415; a file no decoder can read is 422. The reason names
    neither the path nor the decoder's own words (those go to the log)."""
    from pose_common.video import FramesTooLarge, NotAVideo, VideoError, probe  # PyAV only: no torch

    try:
        with open_inside(path, roots) as readable:
            return probe(readable, max_pixels).as_dict()
    except PathRefused as exc:
        raise json_error(403, str(exc), code=exc.code) from None
    except FramesTooLarge as exc:
        raise json_error(413, str(exc), code="video_too_large", limit_pixels=max_pixels) from None
    except NotAVideo as exc:
        raise json_error(415, "not a video: a still image, or a file without a video stream",
                         code="not_a_video", kind=str(exc).rsplit(": ", 1)[-1]) from None
    except VideoError:
        raise json_error(422, "the video could not be decoded: damaged, cut before its first frame, or not a "
                              "video format", code="undecodable_video") from None


def check_image_or_4xx(data: bytes, max_pixels: int) -> None:
    """From the image's header only: 400 when it is not an image, 413 when it declares too many pixels."""
    try:
        check_image(data, max_pixels)
    except TooLarge as exc:
        raise json_error(413, str(exc), code="image_too_large", limit_pixels=max_pixels) from None
    except NotAnImage as exc:
        raise json_error(400, str(exc), code="not_an_image") from None


def safe_suffix(filename: str | None) -> str:
    ext = os.path.splitext((filename or "").replace("\x00", ""))[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".bin"


async def save_upload(field, directory: str, max_bytes: int, within, room=None) -> str:
    """Stream one multipart file to `directory`; a refused or stalled upload leaves nothing behind.
    `room()`, when given, is asked after each chunk whether the storage can take more (it raises)."""
    import uuid

    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, uuid.uuid4().hex + safe_suffix(field.filename))
    try:
        size = await _copy(field, path, max_bytes, within, room or (lambda: None))
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    if size == 0:
        os.unlink(path)
        raise json_error(400, "uploaded file is empty", code="empty")
    return path


async def _copy(field, path: str, max_bytes: int, within, room) -> int:
    size = 0
    with open(path, "wb") as out:
        while chunk := await within(field.read_chunk(1 << 20)):
            size += len(chunk)
            if size > max_bytes:
                raise json_error(413, f"upload larger than {max_bytes // (1 << 20)} MB (gateway.max_upload_mb)",
                                 code="too_large", limit_bytes=max_bytes)
            out.write(chunk)
            room()
    return size
