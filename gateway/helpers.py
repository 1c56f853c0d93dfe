"""What the native and the legacy routes share: typed app state, asking the supervisor, reading
bodies and uploads, and the job lookups every result route starts with."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
from typing import Any, Callable, Optional

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from configs import Config, uploads_dir
from gateway import validation
from gateway.errors import BodyCut, json_error
from gateway.store import ledger_job, reader
from pose_common import results
from pose_common.client import SupervisorClient
from pose_common.hostinfo import is_wsl
from pose_common.ledger import SqlLedger
from pose_common.views import job_view

CFG_KEY = web.AppKey("cfg", Config)
CLIENT_KEY = web.AppKey("client", SupervisorClient)
IDEMPOTENCY_KEY_MAX = 256
FIELD_LIMIT = 1 << 20  # a form field beside an uploaded video (max_frames, idempotency_key, ...)
HELD_CHUNK = 64 << 10  # a part read into memory is read this much at a time (the overshoot of a limit)

def client(request: web.Request) -> SupervisorClient:
    return request.app[CLIENT_KEY]


def config(request: web.Request) -> Config:
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
    """The whole (JSON) body, at most gateway.max_json_mb (413, up front when Content-Length says
    so), each read within gateway.body_timeout_s (408): a client that stops sending is not waited for."""
    gateway = config(request).gateway
    limit = gateway.max_json_mb << 20
    refuse_declared_length(request, limit, body_too_large(limit))
    held = io.BytesIO()
    while chunk := await within(request.content.readany(), gateway.body_timeout_s):
        if held.tell() + len(chunk) > limit:
            raise body_too_large(limit)
        held.write(chunk)
    return held.getvalue()  # no second copy: BytesIO hands over its buffer


def refuse_declared_length(request: web.Request, limit: int, refusal) -> None:
    """A Content-Length above the limit is refused before a byte of the body is read."""
    if (request.content_length or 0) > limit:
        raise refusal


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
        raise json_error(status, body.get("error", "rejected"), code=body.get("code"))
    job = body["job"]
    if not job.get("created", True) and idempotency_key is not None:  # only an Idempotency-Key replays a job
        await check_replay(job, path, source, max_frames, idempotency_key)
    return job


async def check_replay(job: dict, path: str, source: str, max_frames: Optional[int], key: str) -> None:
    """An Idempotency-Key answers with its first job only for the same request (the same path, or an
    upload of the same bytes, and the same max_frames); a different one is a 409 naming the key. A
    replayed upload's second copy is not kept."""
    same = job.get("source") == source and job.get("max_frames") == max_frames and \
        await asyncio.get_running_loop().run_in_executor(None, same_video, job["video_path"], path, source)
    if not same:
        raise json_error(409, f"the Idempotency-Key {validation.clipped(key, 80)!r} was already used for a "
                              f"different request (job {job['job_id']})", code="idempotency_key_reused",
                         idempotency_key=key, job_id=job["job_id"])
    if source == "upload" and path != job["video_path"]:
        os.unlink(path)


def same_video(first: str, second: str, source: str) -> bool:
    """Paths name the same file; uploads are compared by their bytes (a first upload since removed
    cannot be told apart, and counts as the same)."""
    if source != "upload" or first == second:
        return first == second
    try:
        return os.path.getsize(first) == os.path.getsize(second) and file_digest(first) == file_digest(second)
    except FileNotFoundError:
        return True


def file_digest(path: str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.digest()


class Form:
    """A multipart body being read: its parts are counted (gateway.max_form_parts) and what is held
    in memory of them, every part but an upload streamed to disk, is budgeted together
    (gateway.max_form_memory_mb). A body that breaks either is a 413 naming the limit."""

    def __init__(self, reader, max_parts: int, memory_limit: int):
        self.reader, self.max_parts, self.memory_limit = reader, max_parts, memory_limit
        self.count, self.held = 0, 0

    def counted(self) -> None:
        self.count += 1
        if self.count > self.max_parts:
            raise json_error(413, f"more than {self.max_parts} parts in the multipart body (gateway.max_form_parts)",
                             code="too_many_parts", limit_parts=self.max_parts)

    def hold(self, size: int) -> None:
        self.held += size
        if self.held > self.memory_limit:
            raise json_error(413, f"the multipart body's fields (and image) are larger than {self.memory_limit:,} "
                                  "bytes together (gateway.max_form_memory_mb)", code="too_large",
                             limit_bytes=self.memory_limit)


class FormPart:
    """One part of a Form: what the readers need of aiohttp's BodyPartReader, and its Form's budget."""

    def __init__(self, part: BodyPartReader, form: Form):
        self.part, self.form = part, form

    @property
    def name(self) -> Optional[str]:
        return self.part.name

    @property
    def filename(self) -> Optional[str]:
        return self.part.filename

    def read_chunk(self, size: int):
        return self.part.read_chunk(size)


async def open_multipart(request: web.Request, body_limit: Optional[int] = None) -> Form:
    """The multipart reader of the request, refused up front (413) when its Content-Length is above
    `body_limit` (default gateway.max_json_mb: a form that carries no upload)."""
    gateway = config(request).gateway
    limit = gateway.max_json_mb << 20 if body_limit is None else body_limit
    refuse_declared_length(request, limit, body_too_large(limit) if body_limit is None else upload_too_large(limit))
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, HttpProcessingError):
        raise json_error(400, "malformed multipart body", code="bad_multipart") from None
    return Form(reader, gateway.max_form_parts, gateway.max_form_memory_mb << 20)


async def parts(form: Form, timeout_s: float):
    """The parts of a flat multipart body; one that cannot be parsed, or a nested multipart, is the
    client's error (400); one more than gateway.max_form_parts is a 413."""
    while True:
        try:
            part = await within(form.reader.next(), timeout_s)
        except (AssertionError, ValueError, HttpProcessingError):
            raise json_error(400, "malformed multipart body", code="bad_multipart") from None
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise json_error(400, "nested multipart bodies are not accepted", code="bad_multipart")
        form.counted()
        yield FormPart(part, form)


async def read_field(part: FormPart, limit: int, timeout_s: float) -> str:
    """A form field that is not the file: read within a size limit (a field is no way round the
    upload limits) and the body timeout, without undoing any content encoding (no zip bombs)."""
    data = await read_part(part, limit, timeout_s, f"a form field is larger than {limit:,} bytes", "field_too_large")
    return data.decode("utf-8", "replace")


async def read_part(part: FormPart, limit: int, timeout_s: float, too_large: str, code: str) -> bytes:
    """A multipart part into memory, chunk by chunk within the body timeout; past `limit` bytes a 413
    saying `too_large`, past the form's memory budget a 413 naming gateway.max_form_memory_mb."""
    held = io.BytesIO()
    while chunk := await within(part.read_chunk(HELD_CHUNK), timeout_s):
        if held.tell() + len(chunk) > limit:
            raise json_error(413, too_large, code=code, limit_bytes=limit)
        part.form.hold(len(chunk))
        held.write(chunk)
    return held.getvalue()


async def receive_upload(request: web.Request, field_names: tuple[str, ...] = ("video", "file")) -> tuple[str, dict]:
    """Save the multipart video under the state dir. -> (path, other form fields). A declared length
    over the limits is refused before a byte is read; the free space is checked up front and as the
    file grows (a chunked upload declares nothing)."""
    cfg = config(request)
    gateway = cfg.gateway
    form = await open_multipart(request, (gateway.max_upload_mb + gateway.max_form_memory_mb) << 20)
    check_free_space(cfg, request.content_length)
    path, fields = None, {}
    timeout_s = gateway.body_timeout_s
    try:
        async for part in parts(form, timeout_s):
            if part.name in field_names and part.filename is not None and path is None:
                path = await validation.save_upload(part, uploads_dir(cfg), gateway.max_upload_mb << 20,
                                                    lambda read: within(read, timeout_s), storage_room(cfg))
            elif part.name:
                fields[part.name] = await read_field(part, FIELD_LIMIT, timeout_s)
    except BaseException:
        if path:
            os.unlink(path)
        raise
    if path is None:
        raise json_error(400, f"multipart body has no file field ({' or '.join(field_names)})", code="no_file")
    return path, fields


def upload_too_large(limit: int):
    return json_error(413, f"request body larger than {limit:,} bytes (gateway.max_upload_mb and "
                           "gateway.max_form_memory_mb)", code="too_large", limit_bytes=limit)


async def within(reading, timeout_s: float):
    """One read of the request body: a client that sends nothing for timeout_s has failed (408)."""
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except BodyCut:  # the whole body's deadline or rate (gateway.serving), not this read's gap
        raise
    except asyncio.TimeoutError:
        raise json_error(408, f"the request body stalled for {timeout_s:g} s (gateway.body_timeout_s)",
                         code="body_timeout") from None


def check_free_space(cfg: Config, incoming: Optional[int]) -> None:
    """Refuse an upload before a byte is written when the storage would be left short (507)."""
    directory = uploads_dir(cfg)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    free = shutil.disk_usage(directory).free
    needed = (incoming or 0) + (cfg.jobs.min_free_mb << 20)
    if free < needed:
        raise insufficient_storage(free, needed)


def storage_room(cfg: Config) -> Callable[[], None]:
    """-> a check the upload runs as it grows: 507 once writing on would leave less than jobs.min_free_mb."""
    directory, reserve = uploads_dir(cfg), cfg.jobs.min_free_mb << 20

    def check() -> None:
        free = shutil.disk_usage(directory).free
        if free < reserve:
            raise insufficient_storage(free, reserve)
    return check


def insufficient_storage(free: int, needed: int):
    return json_error(507, "not enough free space to store the upload", code="insufficient_storage",
                      free_bytes=free, needed_bytes=needed)


async def job_status(request: web.Request, job_id: str) -> dict:
    """A job as clients see it, read from the ledger (not asked of the supervisor: status and results
    stay readable while it restarts)."""
    def view(ledger: SqlLedger) -> Optional[dict]:
        job = ledger.job(job_id)
        return job_view(job, ledger) if job is not None else None
    found = await reader(request).run(view)
    if found is None:
        raise json_error(404, "Job not found")
    return found


async def native_result(request: web.Request, job_id: str) -> dict:
    """A finished job's whole native result, built from the ledger."""
    return await reader(request).run(lambda ledger: results.document(ledger_job(ledger, job_id), ledger))


async def finished_job(request: web.Request) -> dict:
    """The job named in the URL, or a 409 (not finished) or 410 (removed) saying why its result is not there."""
    job = live(await job_status(request, request.match_info["job_id"]))
    if job["state"] != "done":
        raise json_error(409, job.get("error") or f"job is {job['state']}", status=job["status"],
                         frames_done=job["frames_done"])
    return job



def live(job: dict) -> dict:
    """A job whose files retention removed answers 410 with the reason (its tombstone stays)."""
    if job.get("removed"):
        raise json_error(410, f"the job's results were removed: {job['removed']['reason']}", code="removed",
                         removed_at=job["removed"]["at"])
    return job
