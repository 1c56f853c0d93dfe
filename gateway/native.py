"""The native /v1 API. Handlers validate and answer JSON: commands go to the supervisor over
ZeroMQ, reads (job status, results, events) come from the ledger, so they answer while the
supervisor restarts. A command to a supervisor that is down or slow becomes a JSON 503 within
gateway.supervisor_timeout_s; /v1/health always answers."""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from typing import Optional, Union

from aiohttp import web
from multidict import CIMultiDict

from configs import ledger_location, results_dir
from gateway.errors import LOG_KEY, json_error, with_code
from gateway.helpers import (
    accept_video_path,
    ask,
    config,
    finished_job,
    job_status,
    live,
    native_result,
    parse_max_frames,
    read_json_body,
    receive_upload,
)
from gateway.store import ledger_job, reader
from pose_common import faults, results
from pose_common.client import Unavailable
from pose_common.job_states import FILTER_WORDS, is_terminal
from pose_common.views import job_view

routes = web.RouteTableDef()
REPORT_TIMEOUT_S = 120.0
FOLLOW_POLL_S = 0.25          # how often a following stream looks for new frames or events
SSE_KEEPALIVE_S = 15.0        # a comment line keeps idle proxies from closing the event stream
STREAM_LIMIT_S = 6 * 3600.0   # no stream is held open longer than this
JOB_STATES = FILTER_WORDS  # what `GET /v1/jobs?state=` takes: a status as answers show it, or `rendering`
DRILL_DEFAULT_AT = "frame:0"  # only when `at` is absent; a present one must be one of the documented forms


def job_public(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in ("result_path", "state")}


@routes.post("/v1/jobs")
async def create_job(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if request.content_type.startswith("multipart/"):
        path, fields = await receive_upload(request)
        key = key or fields.get("idempotency_key")
        try:
            job = await accept_video_path(request, path, "upload", key, parse_max_frames(fields.get("max_frames")))
        except Exception:
            os.unlink(path)
            raise
    else:
        body = await read_json_body(request)
        job = await accept_video_path(request, body.get("video_path"), "path", key or body.get("idempotency_key"),
                                      parse_max_frames(body.get("max_frames")))
    return web.json_response(job_public(job), status=202 if job.get("created", True) else 200)


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    return web.json_response(job_public(live(await job_status(request, request.match_info["job_id"]))))


@routes.delete("/v1/jobs/{job_id}")
async def cancel_job(request: web.Request) -> web.Response:
    """Stop the job if it has not finished, then remove its results: it answers 410 afterwards."""
    live(await job_status(request, request.match_info["job_id"]))
    _, body = await ask(request, "cancel", job_id=request.match_info["job_id"])
    return web.json_response(job_public(body["job"]))


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    """Newest first, `limit` (1..200) per page; the next page starts `before` the last one's creation."""
    state = request.query.get("state")
    if state not in (None, *JOB_STATES):
        raise json_error(400, f"state must be one of {', '.join(JOB_STATES)}", code="bad_state")
    limit = query_int(request, "limit", 50, 1, 200)
    before = query_float(request, "before")
    jobs = await reader(request).run(lambda ledger: [job_view(job, ledger)
                                                     for job in ledger.list_jobs(state, limit, before)])
    body = {"jobs": [job_public(job) for job in jobs], "next_before": jobs[-1]["created_at"] if len(jobs) == limit
            else None}
    return web.json_response(body)


@routes.get("/v1/jobs/{job_id}/result")
async def get_result(request: web.Request) -> web.StreamResponse:
    """json (when done) streams from the ledger; ndjson streams frames as they are stored, also while
    the job runs; phalp_pkl for SMPL engines. `vertices=1` adds the meshes an engine stored."""
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "ndjson", "phalp_pkl"):
        raise json_error(400, f"unknown format {fmt!r}: json, ndjson or phalp_pkl", code="bad_format")
    with_vertices = query_flag(request, "vertices")
    if fmt == "ndjson":
        job = live(await job_status(request, request.match_info["job_id"]))
        return await stream_ndjson(request, job["job_id"], with_vertices)
    job = await finished_job(request)
    if fmt == "phalp_pkl":
        return await phalp_pickle(request, job)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    async for chunk in reader(request).chunks(
            lambda ledger: results.json_chunks(ledger_job(ledger, job["job_id"]), ledger, with_vertices)):
        await response.write(chunk.encode())
    await response.write_eof()
    return response


async def stream_ndjson(request: web.Request, job_id: str, with_vertices: bool) -> web.StreamResponse:
    """Line 1: the result's header; then one frame per line as the frames are stored; last line: the
    summary (or {"error": ...} if the job fails). Never loads the result whole."""
    store = reader(request)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    job = await store.run(lambda ledger: ledger_job(ledger, job_id))
    await response.write((json.dumps(await store.run(lambda ledger: results.header(job, ledger, with_vertices)))
                          + "\n").encode())
    last, count, with_person = -1, 0, 0
    deadline = time.monotonic() + STREAM_LIMIT_S
    while time.monotonic() < deadline:
        job = await store.run(lambda ledger: ledger_job(ledger, job_id))
        async for frame in store.chunks(lambda ledger: results.frames(job, ledger, with_vertices, after=last)):
            await response.write((json.dumps(frame) + "\n").encode())
            last, count, with_person = frame["frame_index"], count + 1, with_person + bool(frame["persons"])
        if is_terminal(job.state):
            break
        await asyncio.sleep(FOLLOW_POLL_S)
    tail = {"error": job.error} if job.state == "error" else {"summary": results.summary(job, count, with_person)}
    await response.write((json.dumps(tail) + "\n").encode())
    await response.write_eof()
    return response


@routes.get("/v1/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: state changes and progress (frames done/total, fps, ETA), worker restarts
    that touched the job, ending with the terminal state. `Last-Event-ID` resumes after the last one
    received, without repeats."""
    job_id = request.match_info["job_id"]
    await job_status(request, job_id)  # 404 for an unknown job
    last = last_event_id(request)
    store = reader(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    deadline, quiet_since = time.monotonic() + STREAM_LIMIT_S, time.monotonic()
    while time.monotonic() < deadline:
        events = await store.run(lambda ledger: ledger.events_since(job_id, last))
        for event in events:
            await response.write(sse(event).encode())
            last = event["id"]
        if any(is_terminal(e["type"]) for e in events) or (not events and await finished(store, job_id, last)):
            break
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
            await response.write(b": still here\n\n")
            quiet_since = time.monotonic()
        await asyncio.sleep(FOLLOW_POLL_S)
    await response.write_eof()
    return response


def sse(event: dict) -> str:
    return f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps({**event['data'], 'at': event['at']})}\n\n"


async def finished(store, job_id: str, last: int) -> bool:
    """True once the client has the job's terminal event: `last`, the id it has read up to, is at or
    past it (so a reconnect after the end gets nothing), however many events came before it."""
    terminal = await store.run(lambda ledger: ledger.terminal_event_id(job_id))
    return terminal is not None and terminal <= last


def last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id", "0"))
    if not raw.isdigit() or len(raw) > 18:
        raise json_error(400, "Last-Event-ID must be the integer id of an event", code="bad_event_id")
    return int(raw)


@routes.get("/v1/jobs/{job_id}/overlay.mp4")
async def get_overlay(request: web.Request) -> web.StreamResponse:
    """The overlay video, with HTTP range requests (a browser's <video> seeks in it)."""
    job = await finished_job(request)
    if not job.get("overlay_path") or not os.path.isfile(job["overlay_path"]):
        raise json_error(404, "this job has no overlay video (jobs.render_overlay was off, or rendering failed)",
                         code="no_overlay")
    return file_response(request, job["overlay_path"], "video/mp4")


def file_response(request: web.Request, path: str, content_type: str) -> web.FileResponse:
    """A file with range requests per RFC 9110: one satisfiable range is a 206, an unsatisfiable one a
    JSON 416 (aiohttp's own is empty), and a Range this does not understand (another unit, a
    malformed or an inverted range, several ranges) is ignored: 200 with the whole file."""
    stat = os.stat(path)
    wanted = understood_range(request.headers.get("Range"))
    if wanted is not None and range_applies(request, stat.st_mtime) and not range_satisfiable(wanted, stat.st_size):
        raise json_error(416, f"the Range header does not fit this file of {stat.st_size} bytes",
                         headers={"Content-Range": f"bytes */{stat.st_size}"}, code="range_not_satisfiable")
    ignore_range = "Range" in request.headers and wanted is None
    return RangeFileResponse(path, ignore_range, headers={"Content-Type": content_type})


ByteRange = Union[tuple[int, Optional[int]], tuple[None, int]]  # (first, last or None) or (None, suffix length)
BYTE_RANGE = re.compile(r"bytes=(?:(\d+)-(\d*)|-(\d+))", re.ASCII | re.IGNORECASE)


def understood_range(header: Optional[str]) -> Optional[ByteRange]:
    """One byte range -> (first, last) for `first-[last]`, (None, length) for a suffix `-length`;
    None for no header or one to ignore (another unit, malformed, last before first, a list)."""
    match = BYTE_RANGE.fullmatch(header or "")
    if not match:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        return None, int(suffix)
    if last and int(last) < int(first):
        return None
    return int(first), int(last) if last else None


def range_satisfiable(wanted: ByteRange, size: int) -> bool:
    if wanted[0] is None:  # a suffix: satisfiable when it asks for at least one byte of a non-empty file
        length = wanted[1]
        return length > 0 and size > 0
    first = wanted[0]
    return first < size


def range_applies(request: web.Request, mtime: float) -> bool:
    """If-Range as aiohttp applies it: no If-Range, or the file unchanged since that date."""
    if_range = request.if_range
    return if_range is None or mtime <= if_range.timestamp()


class RangeFileResponse(web.FileResponse):
    """aiohttp's file response, told to serve the whole file when the Range header is one to ignore."""

    def __init__(self, path: str, ignore_range: bool, **kwargs):
        super().__init__(path, **kwargs)
        self.ignore_range = ignore_range

    async def prepare(self, request: web.BaseRequest):
        if self.ignore_range:
            # a header that cannot be encoded again (bytes aiohttp kept as surrogates) is junk no file
            # response reads; carrying it would make clone() raise and drop the connection
            request = request.clone(headers=CIMultiDict((k, v) for k, v in request.headers.items()
                                                        if k.lower() != "range" and utf8_encodable(v)))
        return await super().prepare(request)


def utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def query_flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise json_error(400, f"{name} must be 0, 1, true or false", code="bad_query")
    return raw in ("1", "true")


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise json_error(400, f"{name} must be an integer from {low} to {high}", code="bad_query")
    return value


def query_float(request: web.Request, name: str) -> Optional[float]:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise json_error(400, f"{name} must be a number (a job's created_at)", code="bad_query")
    return value


async def phalp_pickle(request: web.Request, job: dict) -> web.StreamResponse:
    from pose_common.phalp_pickle import write_phalp_pickle

    result = await native_result(request, job["job_id"])
    out = job["result_path"][:-len(".json")] + ".pkl"
    try:
        await asyncio.get_running_loop().run_in_executor(None, write_phalp_pickle, result, out)
    except ValueError as exc:
        raise json_error(409, str(exc)) from None
    return file_response(request, out, "application/octet-stream")


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    try:
        _, body = await ask(request, "health")
    except Unavailable as exc:
        return web.json_response({"status": "unavailable", "error": str(exc), "code": "unavailable"}, status=503)
    state = body["health"]
    return web.json_response(state, status=200 if state["status"] in ("ready", "degraded") else 503)


@routes.get("/v1/diagnostics")
async def get_diagnostics(request: web.Request) -> web.Response:
    _, body = await ask(request, "diagnostics", timeout_s=10.0)
    return web.json_response({**body, "gateway_pid": os.getpid()})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: the supervisor's own exposition (it keeps the counters), plus whether it
    answered. Nothing is counted in the gateway, which may restart at any time."""
    try:
        _, body = await ask(request, "metrics")
        up, text = 1, body.get("text", "")
    except Unavailable:
        up, text = 0, ""
    text += ("# HELP pose_supervisor_up 1 when the supervisor answered the gateway\n"
             f"# TYPE pose_supervisor_up gauge\npose_supervisor_up {float(up)}\n")
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


@routes.post("/v1/drill")
async def drill(request: web.Request) -> web.Response:
    body = await read_json_body(request)
    try:
        kind, at = faults.check(body.get("kind"), drill_at(body))
    except faults.BadFault as exc:
        raise json_error(400, str(exc), code="bad_drill") from None
    status, reply = await ask(request, "drill", fault=kind, at=at)
    return web.json_response(with_code(reply, status), status=status)


def drill_at(body: dict):
    """`at` as sent (absent: the default). A trailing newline is no documented form either, though
    the grammar's `$` would let it by."""
    at = body.get("at", DRILL_DEFAULT_AT)
    return None if isinstance(at, str) and at != at.strip() else at


@routes.post("/v1/reload")
async def reload(request: web.Request) -> web.Response:
    status, reply = await ask(request, "reload")
    return web.json_response(with_code(reply, status), status=status)


@routes.get("/v1/jobs/{job_id}/report")
async def get_report(request: web.Request) -> web.StreamResponse:
    """One self-contained HTML page about a finished job (pose_common.report), built on first request
    in a short-lived process (plots are CPU work the gateway's loop must not do) and kept with the
    job's other files."""
    job = live(await job_status(request, request.match_info["job_id"]))
    if not is_terminal(job["status"]):
        raise json_error(409, f"job is {job['status']}; its report is written when it has finished",
                         status=job["status"])
    cfg = config(request)
    out = os.path.join(results_dir(cfg), f"{job['job_id']}.report.html")
    if not os.path.exists(out):
        await build_report(request.app[LOG_KEY], ledger_location(cfg), job["job_id"], out,
                           float(cfg.angles.min_visibility))
    return file_response(request, out, "text/html; charset=utf-8")


async def build_report(log, ledger: str, job_id: str, out: str, min_visibility: float) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pose_common.report", ledger, job_id, out,
                                                str(min_visibility),
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=REPORT_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise json_error(504, f"the report took longer than {REPORT_TIMEOUT_S:g} s", code="report_timeout") from None
    if proc.returncode != 0:
        last_line = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        log.error("report_failed", job_id=job_id, detail=last_line[0][:300])
        raise json_error(500, "the report could not be built (the reason is in the gateway's log)",
                         code="report_failed")
