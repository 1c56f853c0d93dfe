"""Input checks that turn bad requests into clear 4xx answers before anything is queued."""
from __future__ import annotations

import os
import re
from typing import Sequence


from gateway.errors import json_error

WINDOWS_PATH = re.compile(r"^([A-Za-z]):[\\/](.*)$")


def map_windows_path(path: str, under_wsl: bool) -> str:
    """C:\\Users\\x.mov -> /mnt/c/Users/x.mov when running under WSL (the backend runs on Windows)."""
    match = WINDOWS_PATH.match(path)
    if not match or not under_wsl:
        return path
    drive, rest = match.groups()
    return f"/mnt/{drive.lower()}/" + rest.replace("\\", "/")


def check_video_path(raw: object, allowed_roots: Sequence[str]) -> str:
    """-> the real path of an existing, non-empty regular file inside an allowed root, or raise 4xx."""
    if not isinstance(raw, str) or not raw.strip():
        raise json_error(400, "Missing video_path parameter")
    if "\x00" in raw:
        raise json_error(400, "video_path contains a NUL byte")
    real = os.path.realpath(raw)
    roots = [os.path.realpath(os.path.expanduser(r)) for r in allowed_roots]
    if not roots:
        raise json_error(403, "video paths are disabled: set jobs.allowed_roots (or upload the file)")
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise json_error(403, f"{raw} is outside the allowed roots", allowed_roots=list(allowed_roots))
    if not os.path.exists(real):
        raise json_error(400, f"Video file not found: {raw}")
    if not os.path.isfile(real):
        raise json_error(400, f"{raw} is not a regular file")
    if os.path.getsize(real) == 0:
        raise json_error(400, f"{raw} is empty (0 bytes)")
    if not os.access(real, os.R_OK):
        raise json_error(403, f"{raw} is not readable by the service")
    return real


def probe_video_or_4xx(path: str) -> dict:
    """Open the container and decode one frame before anything is queued: a still image (whatever
    its name) or a file with no video is 415; a file no decoder can read is 422. The reason names
    neither the path nor the decoder's own words (those go to the log)."""
    from pose_common.video import NotAVideo, VideoError, probe  # PyAV only: no torch, no engine

    try:
        return probe(path).as_dict()
    except NotAVideo as exc:
        raise json_error(415, "not a video: a still image, or a file without a video stream",
                         code="not_a_video", kind=str(exc).rsplit(": ", 1)[-1]) from None
    except VideoError:
        raise json_error(422, "the video could not be decoded: damaged, cut before its first frame, or not a "
                              "video format", code="undecodable_video") from None


def safe_suffix(filename: str | None) -> str:
    ext = os.path.splitext(filename or "")[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".bin"


async def save_upload(field, directory: str, max_bytes: int) -> str:
    import uuid

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, uuid.uuid4().hex + safe_suffix(field.filename))
    size = 0
    with open(path, "wb") as out:
        while chunk := await field.read_chunk(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                out.close()
                os.unlink(path)
                raise json_error(413, f"upload larger than {max_bytes // (1 << 20)} MB (gateway.max_upload_mb)",
                                 code="too_large", limit_bytes=max_bytes)
            out.write(chunk)
    if size == 0:
        os.unlink(path)
        raise json_error(400, "uploaded file is empty")
    return path


