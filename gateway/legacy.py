"""The routes the SnowboardingExplained backend (and its mobile app) call, on the same app and port
as the native /v1 API; every one goes through the supervisor or the ledger, and the gateway never
loads a model. Which route answers what, and the choices a backend reader should know, are in
examples/MIGRATION.md; the shapes themselves are built in gateway/legacy_shapes.py."""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import os
import time
from collections import OrderedDict
from typing import Any, Optional

from aiohttp import web

from configs import video_roots
from gateway import validation
from gateway.errors import LOG_KEY, ApiError, json_error, with_code
from gateway.frame_images import attach_images, omitted_note, overlay_jpegs
from gateway.helpers import (
    CFG_KEY,
    accept_video_path,
    ask,
    config,
    finished_job,
    job_status,
    live,
    native_result,
    open_multipart,
    parse_max_frames,
    parts,
    read_field,
    read_json_body,
    read_part,
    receive_upload,
)
from gateway.legacy_frames import frame_jpeg, render_visualization
from gateway.legacy_shapes import (
    STATE_WORDS,
    detector_of,
    engine_name_of,
    frame_number_of,
    hybrid_response,
    job_error_status,
    legacy_health,
    legacy_result,
    models_for,
    output_path_of,
    processing_time_of,
    refused_status,
    truthy,
    warmup_body,
)
from gateway.refused import add_store, is_video_refusal, refused_jobs
from pose_common.client import Unavailable
from pose_common.job_states import is_terminal
from pose_common.numbers import finite
from pose_common.paths import PathRefused

POLL_S = 0.1  # a synchronous client waits on this; a poll is one read of the ledger
RELOAD_SETTLE_S = 3.0
RESULT_CACHE_KEY = web.AppKey("legacy_result_cache", OrderedDict)
RESULT_CACHE_SIZE = 4
IMAGE_FIELDS = ("frame", "image", "file")

routes = web.RouteTableDef()


# --- JSON out ------------------------------------------------------------------------------------
def respond(body: dict, status: int = 200) -> web.Response:
    return web.json_response(finite(with_code(body, status)), status=status,
                             dumps=functools.partial(json.dumps, allow_nan=False))


# --- /health, /warmup, /reload -------------------------------------------------------------------------
async def native_health(request: web.Request) -> dict:
    _, body = await ask(request, "health")
    return body["health"]


@routes.get("/health")
async def health_route(request: web.Request) -> web.Response:
    """Always 200, answered from the supervisor's state (never waits on the worker); a supervisor that
    does not answer within gateway.supervisor_timeout_s is status 'not_ready' with the reason."""
    try:
        return respond(legacy_health(await native_health(request)))
    except Unavailable as exc:
        return respond(legacy_health(None, str(exc)))


@routes.get("/warmup")
async def warmup_route(request: web.Request) -> web.Response:
    """Wait until the worker is ready (it loads at startup, never lazily): 200 with load times from
    the last boot's stages; 500 when fatal; 503 when not ready within gateway.warmup_timeout_s (a
    ?timeout= in seconds may shorten that wait, never lengthen it; 400 when it is not a number)."""
    try:
        limit = float(config(request).gateway.warmup_timeout_s)
        wait = min(limit, max(0.0, float(request.query.get("timeout", limit))))
    except ValueError:
        raise json_error(400, "timeout must be a number of seconds") from None
    deadline = time.monotonic() + wait
    health, error = None, None
    while True:
        try:
            health, error = await native_health(request), None
        except Unavailable as exc:
            health, error = None, str(exc)
        if health and health.get("status") in ("ready", "degraded"):
            break
        if health and health.get("status") == "fatal":
            return respond({"status": "error", "error": health.get("reason") or "service is fatal",
                            "worker": health.get("worker")}, 500)
        if time.monotonic() >= deadline:
            body = legacy_health(health, error)
            body["status"] = "warming_up" if health else "not_ready"
            body.setdefault("error", f"not ready after {wait:g}s (worker {body.get('worker')})")
            return respond(body, 503)
        await asyncio.sleep(POLL_S)
    _, diagnostics = await ask(request, "diagnostics", timeout_s=10.0)
    return respond(warmup_body(health, diagnostics))


@routes.post("/reload")
async def reload_route(request: web.Request) -> web.Response:
    """Restart the worker (its models load again in a fresh process). Answers once the supervisor no
    longer reports the old worker ready (waiting RELOAD_SETTLE_S at most), before the new one has
    loaded: poll /health or /warmup."""
    status, reply = await ask(request, "reload")
    if status >= 400:
        return respond({"status": "error", "error": reply.get("error", "reload refused")}, status)
    health = reply.get("health") or {}
    # the supervisor has signalled the old worker; wait (briefly) until it is reaped, so a /health or
    # /warmup right after this answer never reports the old worker as ready
    deadline = time.monotonic() + RELOAD_SETTLE_S
    while time.monotonic() < deadline:
        try:
            now = await native_health(request)
        except Unavailable:
            break
        if now.get("status") not in ("ready", "degraded") or now.get("generation") != health.get("generation"):
            break
        await asyncio.sleep(0.05)
    engine = engine_name_of(health)
    return respond({"status": "reloaded", "engine": engine, "models": models_for(engine, detector_of(health), False),
                    "message": "worker restarting; models report 'loaded' on /health when it is ready",
                    "timestamp": round(time.time(), 3)})


# --- /pose/hybrid ------------------------------------------------------------------------------------------
def decode_base64_image(text: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    text = "".join(text.split())
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise json_error(400, "Failed to decode image: invalid base64", code="bad_base64") from None
    if not data:
        raise json_error(400, "Failed to decode image: empty image data")
    return data


async def read_multipart_image(request: web.Request) -> tuple[Optional[bytes], dict]:
    gateway = config(request).gateway
    limit, timeout_s = gateway.max_json_mb << 20, gateway.body_timeout_s
    reader = await open_multipart(request)
    image, fields = None, {}
    async for part in parts(reader, timeout_s):
        if part.name in IMAGE_FIELDS and part.filename is not None and image is None:
            image = await read_part(part, limit, timeout_s, f"image larger than {limit >> 20} MB (gateway.max_json_mb)",
                                    "too_large")
        elif part.name:
            fields[part.name] = await read_field(part, limit, timeout_s)  # image_base64 may come as a field
    return image, fields


@routes.post("/pose/hybrid")
async def pose_hybrid(request: web.Request) -> web.Response:
    """JSON {image_base64 (raw or data: URL), frame_number, visualize}, or multipart with the image as a
    `frame`, `image` or `file` file part (or an image_base64 field) and `frameNumber` (or frame_number)
    and `visualize` fields; any other content type -> 415."""
    started = time.monotonic()
    ctype = request.content_type
    image: Optional[bytes]
    if ctype == "application/json":
        body = await read_json_body(request)
        b64 = body.get("image_base64")
        if b64 is None or b64 == "":
            raise json_error(400, "Missing image_base64", code="missing_image")
        if not isinstance(b64, str):
            raise json_error(400, "image_base64 must be a string")
        image = decode_base64_image(b64)
        frame_number, visualize = frame_number_of(body.get("frame_number")), truthy(body.get("visualize"))
    elif ctype.startswith("multipart/"):
        image, fields = await read_multipart_image(request)
        if image is None and fields.get("image_base64"):
            image = decode_base64_image(fields["image_base64"])
        if image is None:
            raise json_error(400, "Missing image: send a `frame` file field (or image_base64)")
        if not image:
            raise json_error(400, "Failed to decode image: empty image data")
        frame_number = frame_number_of(fields.get("frameNumber", fields.get("frame_number")))
        visualize = truthy(fields.get("visualize"))
    else:
        raise json_error(415, "Expected application/json {image_base64, frame_number} or multipart/form-data "
                              f"with a `frame` file, got {ctype or 'no content type'}")
    cfg = config(request)
    validation.check_image_or_4xx(image, cfg.gateway.max_image_pixels)
    # the supervisor answers 504 at deadlines.image_s; the margin only covers the answer's way back
    status, reply = await ask(request, "image", timeout_s=float(cfg.deadlines.image_s) + 2.0, blobs=[image])
    if status != 200:
        error = reply.get("error") or f"image request failed ({status})"
        if status == 400 and not error.startswith("Failed to decode image"):
            error = f"Failed to decode image: {error}"
        return respond({"error": error, "frame_number": frame_number}, status)
    out = hybrid_response(reply, frame_number, 0.0, float(cfg.angles.min_visibility))
    if visualize:
        png = await asyncio.get_running_loop().run_in_executor(
            None, render_visualization, image, reply.get("persons") or [], reply.get("joint_names") or [])
        if png:
            out["visualization"] = "data:image/png;base64," + png
            out["visualization_base64"] = png
    out["processing_time_ms"] = round((time.monotonic() - started) * 1000, 2)
    return respond(out)


# --- the legacy result --------------------------------------------------------------------------------------
async def cached_native(request: web.Request, job: dict) -> dict:
    cache = request.app[RESULT_CACHE_KEY]
    key = (job["job_id"], job.get("finished_at"))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    native = await native_result(request, job["job_id"])
    cache[key] = native
    while len(cache) > RESULT_CACHE_SIZE:
        cache.popitem(last=False)
    return native


async def legacy_result_of(request: web.Request, job: dict) -> dict:
    native = await cached_native(request, job)
    overlay = job.get("overlay_path")
    size_mb = round(os.path.getsize(overlay) / (1 << 20), 2) if overlay and os.path.isfile(overlay) else None
    return legacy_result(native, processing_time_of(job), output_path_of(job), size_mb,
                         float(config(request).angles.min_visibility))


# --- video jobs ---------------------------------------------------------------------------------------------------
async def submit_upload(request: web.Request, path: str, max_frames: Optional[int]) -> dict:
    """Roots and decodability (415 not a video, 422 undecodable) checked before anything is queued;
    an upload that is not queued (refused, queue full, supervisor unavailable) is deleted."""
    try:
        return await accept_video_path(request, path, "upload", None, max_frames)
    except Exception:
        os.unlink(path)
        raise


async def receive_video(request: web.Request) -> tuple[str, dict]:
    if not request.content_type.startswith("multipart/"):
        raise json_error(415, f"expected multipart/form-data with a `video` file, got "
                              f"{request.content_type or 'no content type'}")
    return await receive_upload(request, ("video", "file"))


async def wait_for_job(request: web.Request, job_id: str, timeout_s: float) -> Optional[dict]:
    """Poll the ledger until the job is done or error. -> the job, or None at the deadline. The
    supervisor is not asked, so its restart does not interrupt the wait; a ledger that cannot be read
    for a while is waited out too (the client keeps its job id, in the 504 at worst)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = await job_status(request, job_id)
            if is_terminal(job["state"]):
                return job
        except ApiError as exc:
            if exc.body.get("code") != "ledger_unavailable":
                raise
        await asyncio.sleep(POLL_S)
    return None


@routes.post("/process_video")
async def process_video(request: web.Request) -> web.Response:
    """Synchronous: multipart `video` or `file` (+ max_frames; output_format is accepted and ignored)
    -> 200 {status:'success', job_id, data:<legacy result>} once every artifact it names exists
    (output_path is the overlay video, or the native result JSON where no overlay was rendered:
    jobs.render_overlay off, or its rendering failed). Waits at most gateway.sync_timeout_s, then 504
    with the job id to poll. A video refused up front -> 415/422/413 as on the native route; a job that
    fails -> 422 (the video), 409 (cancelled) or 503 (the service fatal); never 500 for what was uploaded."""
    path, fields = await receive_video(request)
    job = await submit_upload(request, path, parse_max_frames(fields.get("max_frames")))
    job_id = job["job_id"]
    wait = float(config(request).gateway.sync_timeout_s)
    finished = await wait_for_job(request, job_id, wait)
    if finished is None:
        return respond({"status": "error", "job_id": job_id, "code": "still_processing",
                        "error": f"still processing after {wait:g}s (gateway.sync_timeout_s); poll "
                                 f"/job_status/{job_id}"}, 504)
    if finished["state"] == "error":
        error = finished.get("error") or "processing failed"
        return respond({"status": "error", "job_id": job_id, "error": error}, job_error_status(error))
    data = await legacy_result_of(request, finished)
    await add_frame_images(request, finished, data)
    return respond({"status": "success", "job_id": job_id, "data": data})


async def add_frame_images(request: web.Request, job: dict, data: dict) -> None:
    """A short result carries each frame's overlay as frames[i].image_base64 (the app's carousel); a
    longer one says it left them out and where they are (gateway.inline_frame_images_max), and one
    whose video can no longer be read says that."""
    cfg = config(request)
    limit = int(cfg.gateway.inline_frame_images_max)
    if len(data["frames"]) > limit:
        data["frame_images"] = {"included": False, "reason": omitted_note(job["job_id"], len(data["frames"]), limit)}
        return
    native = await cached_native(request, job)
    try:
        jpegs = await asyncio.get_running_loop().run_in_executor(
            None, overlay_jpegs, job["video_path"], video_roots(cfg), native.get("frames") or [],
            native.get("joint_names") or [], cfg.jobs.max_video_pixels)
    except Exception as exc:  # the video changed or went since the job read it: the result still stands
        request.app[LOG_KEY].warning("frame_images_failed", job_id=job["job_id"], error=type(exc).__name__)
        data["frame_images"] = {"included": False, "reason": "the job's video can no longer be read"}
        return
    attach_images(data, jpegs)
    data["frame_images"] = {"included": True, "format": "image/jpeg", "count": len(jpegs)}


@routes.post("/process_video_async")
async def process_video_async(request: web.Request) -> web.Response:
    """multipart `video` or `file` (+ max_frames) -> 200 {status:'accepted', job_id, queue_position,
    message}. A video the native route refuses up front (415/422/413) is accepted too, and its first
    poll is status 'error' with the reason (gateway.refused: the backend's proxy hides a non-2xx's
    reason from the app)."""
    path, fields = await receive_video(request)
    try:
        job = await submit_upload(request, path, parse_max_frames(fields.get("max_frames")))
    except ApiError as exc:
        if not is_video_refusal(exc):
            raise
        job = await asyncio.get_running_loop().run_in_executor(None, refused_jobs(request.app).record, exc)
    return respond({"status": "accepted", "job_id": job["job_id"], "queue_position": job.get("queue_position", 0),
                    "message": f"Video queued for processing; poll /job_status/{job['job_id']}"})


async def legacy_status(request: web.Request, job_id: str) -> dict:
    refused = refused_jobs(request.app).get(job_id)
    if refused is not None:
        return refused_status(refused)
    job = live(await job_status(request, job_id))  # 404 {error:'Job not found'}; 410 removed
    status = STATE_WORDS.get(job["state"], job["state"])
    body: dict[str, Any] = {"job_id": job_id, "status": status, "created_at": job.get("created_at")}
    if status == "queued":
        body["queue_position"] = job.get("queue_position")
        body["attempts"] = job.get("attempts")
    elif status == "processing":
        body["elapsed_time"] = round(time.time() - (job.get("started_at") or job["created_at"]), 3)
        body["progress"] = {"frames_done": job.get("frames_done"), "frames_total": job.get("frames_total")}
    elif status == "complete":
        body["result"] = await legacy_result_of(request, job)
        body["output_path"] = output_path_of(job)
        body["processing_time"] = round(processing_time_of(job), 3)
        if job.get("warning"):
            body["warning"] = job["warning"]
    else:
        body["error"] = job.get("error") or "processing failed"
    return body


@routes.get("/job_status/{job_id}")
async def job_status_route(request: web.Request) -> web.Response:
    """queued (queue_position, attempts) | processing (elapsed_time, progress) | complete (result,
    output_path: the overlay video, or the native result JSON where no overlay was rendered;
    processing_time; warning, if any) | error (error). Unknown id -> 404 {error:'Job not found'}; a
    job whose results were removed -> 410 with the reason."""
    return respond(await legacy_status(request, request.match_info["job_id"]))


@routes.get("/pose/video/status/{job_id}")
async def pose_video_status(request: web.Request) -> web.Response:
    return respond(await legacy_status(request, request.match_info["job_id"]))


@routes.post("/pose/video")
async def pose_video(request: web.Request) -> web.Response:
    """JSON {video_path}: C:\\... becomes /mnt/c/... under WSL (jobs.map_windows_paths). Missing,
    nonexistent or outside the allowed roots -> 400; outside them, the same answer whether or not such
    a file exists (contract §5.21; nothing is revealed about the machine's files). The job runs from
    the supervisor's queue: 202 {status:'processing', queue_position:0} when it is first in line,
    {status:'queued', queue_position:N} behind N others."""
    body = await read_json_body(request)
    raw = body.get("video_path")
    if not isinstance(raw, str) or not raw.strip():
        raise json_error(400, "Missing video_path parameter")
    try:
        job = await accept_video_path(request, raw, "path", body.get("idempotency_key"),
                                      parse_max_frames(body.get("max_frames")))
    except ApiError as exc:
        if exc.body.get("code") not in ("outside_roots", "no_roots"):
            raise
        raise json_error(400, f"Video file not found: {validation.clipped(raw)} (or outside jobs.allowed_roots)",
                         code=exc.body["code"]) from None
    position = job.get("queue_position") or 0
    return respond({"status": "processing" if position == 0 else "queued", "job_id": job["job_id"],
                    "queue_position": position, "video_path": job.get("video_path"),
                    "message": f"poll /pose/video/status/{job['job_id']}"}, 202)


# --- /frame/{job}/{idx} -----------------------------------------------------------------------------------------------
@routes.get("/frame/{job_id}/{idx}")
async def frame_route(request: web.Request) -> web.Response:
    """200 image/jpeg of frame idx with the stored pose drawn (?overlay=0 for the bare frame).
    idx not an integer or out of range -> 400; job not complete -> 400; unknown job -> 404; results
    removed, or the video gone or no longer decodable -> 410; the video now refused by the roots -> 403."""
    job_id, raw_index = request.match_info["job_id"], request.match_info["idx"]
    try:
        index = int(raw_index)
    except ValueError:
        raise json_error(400, f"frame index must be an integer, got {raw_index!r}") from None
    if refused_jobs(request.app).get(job_id) is not None:
        raise json_error(400, "Job not complete (status error)")
    job = live(await job_status(request, job_id))
    if job["state"] != "done":
        raise json_error(400, f"Job not complete (status {STATE_WORDS.get(job['state'], job['state'])})")
    native = await cached_native(request, job)
    frames = native.get("frames") or []
    if not 0 <= index < len(frames):
        raise json_error(400, f"frame index {index} out of range (0..{len(frames) - 1})")
    frame = frames[index]
    overlay = request.query.get("overlay", "1").lower() not in ("0", "false", "no")
    cfg = config(request)
    try:
        jpeg = await asyncio.get_running_loop().run_in_executor(
            None, frame_jpeg, job["video_path"], video_roots(cfg), frame.get("frame_index", index),
            frame.get("pts_s"), frame.get("persons") or [], native.get("joint_names") or [], overlay,
            cfg.jobs.max_video_pixels)
    except PathRefused as exc:
        raise json_error(410 if exc.code == "missing" else 403, f"the job's video cannot be read: {exc}",
                         code=exc.code) from None
    except ValueError:
        raise json_error(410, f"frame {index} can no longer be decoded from the job's video", code="undecodable") \
            from None
    return web.Response(body=jpeg, content_type="image/jpeg")


# --- native: the legacy shape of a native job -------------------------------------------------------------------------
@routes.get("/v1/jobs/{job_id}/legacy")
async def native_legacy_result(request: web.Request) -> web.Response:
    return respond(await legacy_result_of(request, await finished_job(request)))


def add_routes(app: web.Application) -> None:
    app[RESULT_CACHE_KEY] = OrderedDict()
    add_store(app, app[CFG_KEY].storage_dir)
    app.add_routes(routes)
