"""What the native and the legacy routes share: typed app state, asking the supervisor, reading
bodies and uploads, and the job lookups every result route starts with."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any, Optional

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from configs import uploads_dir
from gateway import validation
from gateway.errors import json_error
from pose_common.client import SupervisorClient
from pose_common.hostinfo import is_wsl

CFG_KEY = web.AppKey("cfg", object)
CLIENT_KEY = web.AppKey("client", SupervisorClient)
IDEMPOTENCY_KEY_MAX = 256
FIELD_LIMIT = 1 << 20  # a form field beside an uploaded video (max_frames, idempotency_key, ...)

def client(request: web.Request) -> SupervisorClient:
    return request.app[CLIENT_KEY]


def config(request: web.Request):
    return request.app[CFG_KEY]


async def ask(request: web.Request, kind: str, timeout_s: Optional[float] = None, blobs: Optional[list] = None,
              **body: Any) -> tuple[int, dict]:
    return await client(request).request(kind, timeout_s=timeout_s, blobs=blobs, **body)


async def read_json_body(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise json_error(415, f"expected application/json, got {request.content_type or 'no content type'}",
                         code="unsupported_media_type")
    raw = await read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise json_error(400, f"malformed JSON: {type(exc).__name__} at {getattr(exc, 'pos', '?')}",
                         code="malformed_json") from None
    except RecursionError:
        raise json_error(400, "malformed JSON: nested too deeply", code="malformed_json") from None
    if not isinstance(body, dict):
        raise json_error(400, "JSON body must be an object")
    return body


async def read_body(request: web.Request) -> bytes:
    """The whole (JSON) body, at most gateway.max_json_mb (413), each read within
    gateway.body_timeout_s (408): a client that stops sending is not waited for."""
    gateway = config(request).gateway
    limit = gateway.max_json_mb << 20
    if (request.content_length or 0) > limit:
        raise body_too_large(limit)
    chunks, size = [], 0
    while chunk := await within(request.content.readany(), gateway.body_timeout_s):
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def body_too_large(limit: int):
    return json_error(413, f"request body larger than {limit:,} bytes (gateway.max_json_mb)", code="too_large",
                      limit_bytes=limit)


async def accept_video_path(request: web.Request, raw_path: Any, source: str = "path",
                            idempotency_key: Optional[str] = None, max_frames: Optional[int] = None) -> dict:
    """Validate a path (roots, existence, decodability) and submit it. -> job view."""
    cfg = config(request)
    check_idempotency_key(idempotency_key)
    mapped = validation.map_windows_path(raw_path, is_wsl()) if isinstance(raw_path, str) and \
        cfg.jobs.map_windows_paths else raw_path
    roots = list(cfg.jobs.allowed_roots)
    if source == "upload":
        roots = [uploads_dir(cfg)]
    path = validation.check_video_path(mapped, roots, raw_path if source == "path" else "the uploaded file")
    await asyncio.get_running_loop().run_in_executor(None, validation.probe_video_or_4xx, path, roots,
                                                     cfg.jobs.max_video_pixels)
    return await submit(request, path, source, idempotency_key, max_frames)


def check_idempotency_key(key: Any) -> None:
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isprintable()):
        raise json_error(400, f"an idempotency key is a printable string of 1 to {IDEMPOTENCY_KEY_MAX} characters",
                         code="bad_idempotency_key")


def parse_max_frames(raw: Any) -> Optional[int]:
    """The app's `max_frames`: that many frames spread evenly over the video (absent: every frame)."""
    if raw is None or raw == "":
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = 0
    if not 1 <= value <= 1_000_000:
        raise json_error(400, "max_frames must be a whole number from 1 to 1000000", code="bad_max_frames")
    return value


async def submit(request: web.Request, path: str, source: str, idempotency_key: Optional[str],
                 max_frames: Optional[int] = None) -> dict:
    status, body = await ask(request, "submit", video_path=path, source=source, idempotency_key=idempotency_key,
                             max_frames=max_frames)
    if status == 429:
        wait = int(body.get("retry_after_s") or 1)
        raise json_error(429, body.get("error", "queue full"), headers={"Retry-After": str(wait)},
                         code="queue_full", retry_after_s=wait)
    if status >= 400:
        raise json_error(status, body.get("error", "rejected"))
    return body["job"]


async def open_multipart(request: web.Request):
    try:
        return await request.multipart()
    except (AssertionError, ValueError, HttpProcessingError):
        raise json_error(400, "malformed multipart body", code="bad_multipart") from None


async def parts(reader, timeout_s: float):
    """The parts of a flat multipart body; one that cannot be parsed, or a nested multipart, is the
    client's error (400)."""
    while True:
        try:
            part = await within(reader.next(), timeout_s)
        except (AssertionError, ValueError, HttpProcessingError):
            raise json_error(400, "malformed multipart body", code="bad_multipart") from None
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise json_error(400, "nested multipart bodies are not accepted", code="bad_multipart")
        yield part


async def read_field(part: BodyPartReader, limit: int, timeout_s: float) -> str:
    """A form field that is not the file: read within a size limit (a field is no way round the
    upload limits) and the body timeout, without undoing any content encoding (no zip bombs)."""
    data = await read_part(part, limit, timeout_s, f"a form field is larger than {limit:,} bytes", "field_too_large")
    return data.decode("utf-8", "replace")


async def read_part(part: BodyPartReader, limit: int, timeout_s: float, too_large: str, code: str) -> bytes:
    """A multipart part, chunk by chunk within the body timeout; past `limit` bytes a 413 saying `too_large`."""
    chunks, size = [], 0
    while chunk := await within(part.read_chunk(1 << 20), timeout_s):
        size += len(chunk)
        if size > limit:
            raise json_error(413, too_large, code=code, limit_bytes=limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_upload(request: web.Request, field_names: tuple[str, ...] = ("video", "file")) -> tuple[str, dict]:
    """Save the multipart video under the state dir. -> (path, other form fields)."""
    cfg = config(request)
    check_free_space(cfg, request.content_length)
    reader = await open_multipart(request)
    path, fields = None, {}
    timeout_s = cfg.gateway.body_timeout_s
    try:
        async for part in parts(reader, timeout_s):
            if part.name in field_names and part.filename is not None and path is None:
                path = await validation.save_upload(part, uploads_dir(cfg), cfg.gateway.max_upload_mb << 20,
                                                    lambda read: within(read, timeout_s))
            elif part.name:
                fields[part.name] = await read_field(part, FIELD_LIMIT, timeout_s)
    except BaseException:
        if path:
            os.unlink(path)
        raise
    if path is None:
        raise json_error(400, f"multipart body has no file field ({' or '.join(field_names)})", code="no_file")
    return path, fields


async def within(reading, timeout_s: float):
    """One read of the request body: a client that sends nothing for timeout_s has failed (408)."""
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except asyncio.TimeoutError:
        raise json_error(408, f"the request body stalled for {timeout_s:g} s (gateway.body_timeout_s)",
                         code="body_timeout") from None


def check_free_space(cfg, incoming: Optional[int]) -> None:
    """Refuse an upload before a byte is written when the storage would be left short (507)."""
    directory = uploads_dir(cfg)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    free = shutil.disk_usage(directory).free
    needed = (incoming or 0) + (cfg.jobs.min_free_mb << 20)
    if free < needed:
        raise json_error(507, "not enough free space to store the upload", code="insufficient_storage",
                         free_bytes=free, needed_bytes=needed)


async def job_status(request: web.Request, job_id: str) -> dict:
    status, body = await ask(request, "status", job_id=job_id)
    if status in (400, 404):  # an id the supervisor cannot even look up is not a job either
        raise json_error(404, "Job not found")
    if status != 200:
        raise json_error(status, body.get("error") or "the job could not be read")
    return body["job"]


async def finished_job(request: web.Request) -> dict:
    """The job named in the URL, or a 409 (not finished) or 410 (removed) saying why its result is not there."""
    job = live(await job_status(request, request.match_info["job_id"]))
    if job["state"] != "done":
        raise json_error(409, job.get("error") or f"job is {job['state']}", status=job["status"],
                         frames_done=job["frames_done"])
    return job


async def load_result(path: str) -> dict:
    def read() -> dict:
        with open(path) as fh:
            return json.load(fh)
    return await asyncio.get_running_loop().run_in_executor(None, read)


def live(job: dict) -> dict:
    """A job whose files retention removed answers 410 with the reason (its tombstone stays)."""
    if job.get("removed"):
        raise json_error(410, f"the job's results were removed: {job['removed']['reason']}", code="removed",
                         removed_at=job["removed"]["at"])
    return job
