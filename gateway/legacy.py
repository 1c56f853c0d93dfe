"""The routes the SnowboardingExplained backend (and its mobile app) call, on the same app and port
as the native /v1 API. Every one goes through the supervisor; the gateway never loads a model.

Routes (see docs in each handler):
  GET  /health                     always 200 within a second or two; status ready|warming_up|not_ready|error
  GET  /warmup                     waits (<= gateway.warmup_timeout_s) for the worker; 200 ready, 500 error, 503 warming_up
  POST /reload                     restarts the worker (models reload); answers at once
  POST /pose/hybrid                one image (JSON image_base64 or multipart `frame`) -> keypoints
  POST /process_video              multipart upload, synchronous -> {status:'success', data:<legacy result>}
  POST /process_video_async        multipart upload -> 200 {status:'accepted', job_id}
  GET  /job_status/{job_id}        queued|processing|complete|error (+ result when complete)
  GET  /pose/video/status/{job_id} the same (the Dec 31 client polled this one)
  POST /pose/video                 JSON {video_path} (Windows paths mapped under WSL) -> 202 queued|processing
  GET  /frame/{job_id}/{idx}       image/jpeg of frame idx with the stored pose drawn (?overlay=0: raw frame)
  GET  /v1/jobs/{job_id}/legacy    the native job's result in the legacy shape (legacy_result)

Choices a reader of the backend's code should know about:
  * /health and /pose/hybrid report the engine that really runs. With MediaPipe there is no mesh:
    models.hmr2/vitdet are 'not_loaded', `camera_translation` is null (MediaPipe has no camera model),
    and `mesh_vertices_data`/`mesh_faces_data` (legacy `meshVertices`/`meshFaces`) are absent. They
    are emitted only when the engine returns vertices (hmr2_phalp) and never faked. `status` is
    'ready' whenever the worker is ready, whatever the engine, because the backend treats only
    status==='ready' as healthy.
  * Keypoints: x,y are image pixels, z is the engine's 3D z in metres (MediaPipe: hip-centred world
    landmarks; hmr2: body frame), x_3d/y_3d/z_3d the full 3D point; names are the engine's own
    joint names (MediaPipe's 33 landmarks, hmr2's OpenPose-25 + 19 + origin), not mislabelled SMPL-24.
  * joint_angles_3d are computed from those names: knee (hip-knee-ankle), hip (shoulder-hip-knee),
    elbow (shoulder-elbow-wrist), shoulder (elbow-shoulder-hip), spine (lean of the mid-hip ->
    mid-shoulder vector from vertical; 0 = upright), all in degrees.
  * No person -> 200 with keypoints [], has_3d false and error 'No person detected'.
  * Every upload and path is opened and its first frame decoded before anything is queued, on every
    route: a still image (whatever its name) or a file without video -> 415, an undecodable file ->
    422, both JSON with the reason. A video cut or damaged after that point completes with a
    `warning` naming the frames decoded and the frames its container declares (`truncated: true`);
    nothing is silently partial.
  * Without `max_frames` every frame is processed (an N-frame video yields N frames, frames without
    a person have persons []). With `max_frames=K` (the mobile app sends 15), K frames spread evenly
    over the video are processed, as the app's first service did; frameNumber is then the position
    in the result and originalFrameNumber the index in the video.
  * A job is `complete` only when every artifact it names exists and is whole: `output_path` is the
    overlay video (every processed frame with the pose drawn), written before the job completes.
    /frame/{job}/{idx} serves any single frame with the pose drawn.
  * Timeouts are configuration, one number each: gateway.warmup_timeout_s (GET /warmup),
    gateway.sync_timeout_s (POST /process_video), deadlines.image_s (POST /pose/hybrid).
  * Nothing leaves as NaN or Infinity: non-finite numbers become null.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import math
import os
import time
from collections import OrderedDict
from typing import Any, Optional, Sequence

from aiohttp import web

from configs import video_roots
from gateway import validation
from gateway.errors import ApiError, json_error, with_code
from gateway.helpers import (
    within,
    live,
    parse_max_frames,
    parts,
    read_field,
    read_part,
    accept_video_path,
    ask,
    config,
    finished_job,
    job_status,
    load_result,
    open_multipart,
    read_json_body,
    receive_upload,
)
from pose_common.client import Unavailable
from pose_common.angles import joint_angles, main_person
from pose_common.drawing import draw_persons
from pose_common.drawing import number_or as _num
from pose_common.paths import PathRefused, open_inside

SERVICE = "pose-service"
POLL_S = 0.5
RELOAD_SETTLE_S = 3.0
JPEG_QUALITY = 90
RESULT_CACHE_KEY = web.AppKey("legacy_result_cache", OrderedDict)
RESULT_CACHE_SIZE = 4
KNOWN_MODELS = ("hmr2", "vitdet", "phalp", "mediapipe")
STATE_WORDS = {"queued": "queued", "running": "processing", "rendering": "processing", "done": "complete",
               "error": "error"}
IMAGE_FIELDS = ("frame", "image", "file")

routes = web.RouteTableDef()


# --- JSON out ------------------------------------------------------------------------------------
def finite(value: Any) -> Any:
    """NaN/Infinity -> None, recursively (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def respond(body: dict, status: int = 200) -> web.Response:
    return web.json_response(finite(with_code(body, status)), status=status, dumps=functools.partial(json.dumps, allow_nan=False))




# --- engine facts -----------------------------------------------------------------------------------
def engine_name_of(health: dict) -> str:
    return str(health.get("engine_name") or (health.get("engine") or {}).get("name") or "unknown")


def detector_of(health: dict) -> Optional[str]:
    return health.get("detector") or (health.get("engine") or {}).get("detector")


def models_for(engine: str, detector: Optional[str], loaded: bool) -> dict:
    """{hmr2, vitdet, phalp, mediapipe: loaded|not_loaded}: what this engine really has in memory."""
    models = {name: "not_loaded" for name in KNOWN_MODELS}
    if not loaded:
        return models
    if engine == "hmr2_phalp":
        models["hmr2"] = models["phalp"] = "loaded"
        models[detector or "vitdet"] = "loaded"
    else:
        models[engine] = "loaded"
    return models


def legacy_health(health: Optional[dict], error: Optional[str] = None) -> dict:
    now = round(time.time(), 3)
    if health is None:
        return {"status": "not_ready", "service": SERVICE, "ready": False, "hybrid_available": False,
                "models": models_for("", None, False), "error": error or "supervisor unavailable",
                "timestamp": now}
    native = health.get("status")
    ready = native in ("ready", "degraded")
    status = "ready" if ready else "error" if native == "fatal" else "warming_up"
    engine = engine_name_of(health)
    body = {"status": status, "service": SERVICE, "ready": ready, "hybrid_available": ready,
            "models": models_for(engine, detector_of(health), ready),
            "device": health.get("device"), "engine": engine,
            "engine_info": health.get("engine") if ready else None,
            "worker": health.get("worker"), "stage": health.get("stage"), "rung": health.get("rung"),
            "degraded": native == "degraded", "reason": health.get("reason"),
            "queue_depth": health.get("queue_depth"), "running_job": health.get("running_job"),
            "timestamp": now}
    if status == "error":
        body["error"] = health.get("reason") or "service is fatal"
    return body


async def native_health(request: web.Request) -> dict:
    _, body = await ask(request, "health")
    return body["health"]


# --- /health, /warmup, /reload -------------------------------------------------------------------------
@routes.get("/health")
async def health_route(request: web.Request) -> web.Response:
    """Always 200, answered from the supervisor's state (never waits on the worker)."""
    try:
        return respond(legacy_health(await native_health(request)))
    except Unavailable as exc:
        return respond(legacy_health(None, str(exc)))


def warmup_body(health: dict, diagnostics: dict) -> dict:
    engine = engine_name_of(health)
    boots = diagnostics.get("boots") or []
    stages = {s.get("name"): _num(s.get("duration_s")) for s in (boots[-1].get("stages") or [])} if boots else {}
    total = round(sum(stages.values()), 4)
    body = {"status": "ready", "ready": True, "engine": engine, "device": health.get("device"),
            "models": models_for(engine, detector_of(health), True),
            "load_time_seconds": total, "degraded": health.get("status") == "degraded",
            "reason": health.get("reason")}
    body[engine] = {"status": "loaded", "load_time_seconds": total, "stages": stages}
    if engine == "hmr2_phalp":
        detector = detector_of(health) or "vitdet"
        body["hmr2"] = {"status": "loaded", "load_time_seconds": stages.get("main_model")}
        body["phalp"] = {"status": "loaded", "load_time_seconds": stages.get("tracker")}
        body[detector] = {"status": "loaded", "load_time_seconds": stages.get("detector")}
    for name in ("hmr2", "vitdet"):
        body.setdefault(name, {"status": "not_loaded", "load_time_seconds": None,
                               "reason": f"the running engine is {engine}"})
    return body


@routes.get("/warmup")
async def warmup_route(request: web.Request) -> web.Response:
    """Wait until the worker is ready (it loads at startup, never lazily): 200 with load times from
    the last boot's stages; 500 when fatal; 503 when not ready within gateway.warmup_timeout_s (or ?timeout=)."""
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
    """Restart the worker (its models load again in a fresh process). Answers at once; poll /health."""
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


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _frame_number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return 0 if value is None else value


def keypoint_rows(person: dict, names: Sequence[str]) -> list[dict]:
    """Engine person -> [{name, x, y, z, confidence, x_3d, y_3d, z_3d}] (pixels; metres)."""
    kp2 = person.get("keypoints_2d") or []
    kp3 = person.get("keypoints_3d") or []
    rows = []
    for i, point in enumerate(kp2):
        world = kp3[i] if i < len(kp3) and kp3[i] else [None, None, None]
        x3, y3, z3 = (_num(v) for v in (list(world) + [None] * 3)[:3])
        rows.append({"name": names[i] if i < len(names) else f"joint_{i}",
                     "x": _num(point[0]), "y": _num(point[1]), "z": z3,
                     "confidence": _num(point[2] if len(point) > 2 else None),
                     "x_3d": x3, "y_3d": y3, "z_3d": z3})
    return rows


def hybrid_response(reply: dict, frame_number: Any, processing_ms: float) -> dict:
    """The supervisor's IMAGE reply -> app.py's /pose/hybrid shape (contract §2.2)."""
    engine = reply.get("engine") or {}
    names = reply.get("joint_names") or []
    persons = reply.get("persons") or []
    person = main_person(persons)
    body: dict[str, Any] = {
        "frame_number": frame_number, "frame_width": reply.get("width"), "frame_height": reply.get("height"),
        "processing_time_ms": round(processing_ms, 2), "inference_time_ms": reply.get("ms"),
        "model_version": f"{engine.get('name', 'unknown')}-{engine.get('version', 'unknown')}",
        "engine": engine.get("name"), "device": engine.get("device"),
        "persons_detected": len(persons), "mesh_rendered": False,
    }
    if person is None:
        body.update(keypoints=[], keypoint_count=0, has_3d=False, joints_3d_raw=[], joint_angles_3d={},
                    camera_translation=None, tracking_confidence=0.0, error="No person detected")
        return body
    keypoints = keypoint_rows(person, names)
    # a non-finite coordinate (null from the worker) stays null here: no invented 0,0,0 joints in the angles
    raw3d = [[_num(v, None) for v in (list(p or []) + [None] * 3)[:3]] for p in person.get("keypoints_3d") or []]
    camera = person.get("camera")
    body.update(keypoints=keypoints, keypoint_count=len(keypoints), has_3d=bool(raw3d), joints_3d_raw=raw3d,
                joint_angles_3d=joint_angles(names, raw3d),
                camera_translation=[_num(camera.get(k)) for k in ("tx", "ty", "tz")] if camera else None,
                tracking_confidence=_num(person.get("score")), bbox=person.get("bbox_xyxy"), error=None)
    if camera:
        body["scaled_focal_length"] = camera.get("focal_length")
    if person.get("camera_bbox"):
        scale, tx, ty = (list(person["camera_bbox"]) + [0, 0, 0])[:3]
        body["camera_params"] = {"scale": scale, "tx": tx, "ty": ty, "type": "weak_perspective"}
    if person.get("vertices"):
        body["mesh_vertices_data"] = person["vertices"]
        body["mesh_vertices"] = len(person["vertices"])
        faces = person.get("faces") or reply.get("mesh_faces")
        if faces:
            body["mesh_faces_data"] = faces
    return body


def render_visualization(image: bytes, persons: list, names: Sequence[str]) -> Optional[str]:
    import cv2
    import numpy as np

    bgr = cv2.imdecode(np.frombuffer(image, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    ok, png = cv2.imencode(".png", draw_persons(bgr, persons, names))
    return base64.b64encode(png.tobytes()).decode("ascii") if ok else None


@routes.post("/pose/hybrid")
async def pose_hybrid(request: web.Request) -> web.Response:
    """JSON {image_base64 (raw or data: URL), frame_number, visualize} or multipart `frame` + `frameNumber`."""
    started = time.monotonic()
    ctype = request.content_type
    if ctype == "application/json":
        body = await read_json_body(request)
        b64 = body.get("image_base64")
        if b64 is None or b64 == "":
            raise json_error(400, "Missing image_base64", code="missing_image")
        if not isinstance(b64, str):
            raise json_error(400, "image_base64 must be a string")
        image = decode_base64_image(b64)
        frame_number, visualize = _frame_number(body.get("frame_number")), _truthy(body.get("visualize"))
    elif ctype.startswith("multipart/"):
        image, fields = await read_multipart_image(request)
        if image is None and fields.get("image_base64"):
            image = decode_base64_image(fields["image_base64"])
        if image is None:
            raise json_error(400, "Missing image: send a `frame` file field (or image_base64)")
        if not image:
            raise json_error(400, "Failed to decode image: empty image data")
        frame_number = _frame_number(fields.get("frameNumber", fields.get("frame_number")))
        visualize = _truthy(fields.get("visualize"))
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
    out = hybrid_response(reply, frame_number, 0.0)
    if visualize:
        png = await asyncio.get_running_loop().run_in_executor(
            None, render_visualization, image, reply.get("persons") or [], reply.get("joint_names") or [])
        if png:
            out["visualization"] = "data:image/png;base64," + png
            out["visualization_base64"] = png
    out["processing_time_ms"] = round((time.monotonic() - started) * 1000, 2)
    return respond(out)


# --- the legacy result --------------------------------------------------------------------------------------
def legacy_person(person: dict, names: Sequence[str], faces: Optional[list]) -> dict:
    camera = person.get("camera")
    smpl = person.get("smpl")
    out = {
        "personId": person.get("track_id", 0), "confidence": _num(person.get("score")), "tracked": True,
        "bbox": person.get("bbox_xyxy"),
        "keypoints": [{k: row[k] for k in ("name", "x", "y", "z", "confidence")}
                      for row in keypoint_rows(person, names)],
        "camera": {"tx": camera.get("tx"), "ty": camera.get("ty"), "tz": camera.get("tz"),
                   "focalLength": camera.get("focal_length")} if camera else None,
        "smpl": {"globalOrient": smpl.get("global_orient"), "bodyPose": smpl.get("body_pose"),
                 "betas": smpl.get("betas")} if smpl else None,
    }
    if person.get("vertices"):
        out["meshVertices"] = person["vertices"]
        if person.get("faces") or faces:
            out["meshFaces"] = person.get("faces") or faces
    return out


def output_path_of(job: dict) -> str:
    return job.get("overlay_path") or job["result_path"]


def legacy_result(native: dict, processing_time: float, output_path: Optional[str] = None,
                  output_size_mb: Optional[float] = None) -> dict:
    """Native result JSON (pose_common.results) -> what the backend and the app read (contract §2.3-2.4):
    `frames` (the frames document: persons with keypoints, camera, smpl, meshes) and the app's own
    VideoMeshProcessor shape (`pose_timeline`, `frame_acceptance`, `output_size_mb`, ...). frameNumber
    is the frame's position in the result, originalFrameNumber its index in the video (they differ when
    max_frames sampled the video). Every decoded frame is present; timestamps are real pts in seconds."""
    video = native.get("video") or {}
    fps = _num(video.get("fps"), 30.0) or 30.0
    names = native.get("joint_names") or []
    faces = native.get("mesh_faces")
    entries = with_gaps_filled(native.get("frames") or [], fps) if not video.get("max_frames") else \
        list(native.get("frames") or [])
    frames = [legacy_frame(position, frame, fps, names, faces) for position, frame in enumerate(entries)]
    timeline = [timeline_frame(position, frame, fps, names) for position, frame in enumerate(entries)]
    count = len(frames)
    width, height = video.get("width"), video.get("height")
    duration = _num(video.get("duration_s")) or (count / fps if fps else 0.0)
    engine = native.get("engine") or {}
    seconds = round(_num(processing_time), 3)
    result = {
        "job_id": native.get("job_id"), "video_path": native.get("video_path"), "status": "complete",
        "frames": frames, "pose_timeline": timeline,
        "frame_acceptance": [{"frame_index": t["frameNumber"], "has_mesh": t["meshRendered"], "has_pose": t["has3D"],
                              "original_frame_number": t["originalFrameNumber"], "timestamp": t["timestamp"]}
                             for t in timeline],
        "fps": fps, "total_frames": count, "frame_count": count, "processed_frames": count,
        "frames_with_person": sum(1 for f in frames if f["persons"]),
        "video_duration": round(duration, 5), "processing_time": seconds, "processing_time_seconds": seconds,
        "resolution": [width, height], "output_path": output_path, "output_size_mb": output_size_mb,
        "metadata": {"fps": fps, "duration": round(duration, 5), "resolution": [width, height], "frameCount": count,
                     "engine": engine, "jointNames": names},
    }
    if video.get("truncated"):
        result.update(truncated=True, frames_expected=video.get("frames_expected"),
                      frames_decoded=video.get("frame_count"))
    if native.get("warning"):
        result["warning"] = native["warning"]
    return result


def with_gaps_filled(entries: list, fps: float) -> list:
    """Never expected (the supervisor stores every frame): keep frameNumber == position anyway."""
    filled: list[dict] = []
    for frame in entries:
        while len(filled) < int(frame["frame_index"]):
            missing = len(filled)
            filled.append({"frame_index": missing, "pts_s": missing / fps, "persons": [],
                           "error": "frame missing from the result"})
        if int(frame["frame_index"]) == len(filled):
            filled.append(frame)
    return filled


def frame_time(frame: dict, fps: float) -> float:
    pts = frame.get("pts_s")
    return round(_num(pts, frame["frame_index"] / fps) if pts is not None else frame["frame_index"] / fps, 6)


def legacy_frame(position: int, frame: dict, fps: float, names: Sequence[str], faces: Optional[list]) -> dict:
    entry = {"frameNumber": position, "originalFrameNumber": int(frame["frame_index"]),
             "timestamp": frame_time(frame, fps),
             "persons": [legacy_person(p, names, faces) for p in frame.get("persons") or []]}
    if frame.get("error"):
        entry["error"] = frame["error"]
    return entry


def timeline_frame(position: int, frame: dict, fps: float, names: Sequence[str]) -> dict:
    """One pose_timeline item as the mobile app's VideoAnalysisScreen reads it (the main person)."""
    person = main_person(frame.get("persons") or [])
    rows = keypoint_rows(person, names) if person else []
    raw3d = [list(p) for p in (person.get("keypoints_3d") or [])] if person else []
    return {"frameNumber": position, "originalFrameNumber": int(frame["frame_index"]),
            "timestamp": round(frame_time(frame, fps), 3), "confidence": _num(person.get("score")) if person else 0.0,
            "keypoints": rows, "joints3D": raw3d, "jointAngles": joint_angles(names, raw3d) if raw3d else {},
            "has3D": bool(raw3d), "meshRendered": bool(person and person.get("vertices"))}


async def cached_native(request: web.Request, path: str) -> dict:
    cache = request.app[RESULT_CACHE_KEY]
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except FileNotFoundError:
        raise json_error(410, "the job's result file is gone", code="removed") from None
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    native = await load_result(path)
    cache[key] = native
    while len(cache) > RESULT_CACHE_SIZE:
        cache.popitem(last=False)
    return native


def processing_time_of(job: dict) -> float:
    start = job.get("started_at") or job.get("created_at")
    end = job.get("finished_at") or time.time()
    return max(0.0, end - start) if start else 0.0


async def legacy_result_of(request: web.Request, job: dict) -> dict:
    native = await cached_native(request, job["result_path"])
    overlay = job.get("overlay_path")
    size_mb = round(os.path.getsize(overlay) / (1 << 20), 2) if overlay and os.path.isfile(overlay) else None
    return legacy_result(native, processing_time_of(job), output_path_of(job), size_mb)


# --- video jobs ---------------------------------------------------------------------------------------------------
async def submit_upload(request: web.Request, path: str, max_frames: Optional[int]) -> dict:
    """Roots and decodability (415 not a video, 422 undecodable) checked before anything is queued;
    a refused upload is deleted."""
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
    """Poll until done/error. -> the job, or None on timeout. A supervisor restart is waited out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = await job_status(request, job_id)
            if job["state"] in ("done", "error"):
                return job
        except Unavailable:
            pass
        await asyncio.sleep(POLL_S)
    return None


@routes.post("/process_video")
async def process_video(request: web.Request) -> web.Response:
    """Synchronous: multipart `video` (+ max_frames; output_format is accepted and ignored) -> 200
    {status:'success', data:<legacy result>} once every artifact it names exists (output_path is the
    overlay video). Waits at most gateway.sync_timeout_s, then 504 with the job id to poll. A video the
    worker cannot read -> 422; the service fatal -> 503; never 500 for what was uploaded."""
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
    return respond({"status": "success", "job_id": job_id, "data": await legacy_result_of(request, finished)})


def job_error_status(error: str) -> int:
    """A failed synchronous job: the service's state (503), a cancel (409), or the video itself (422)."""
    if error.startswith("service fatal"):
        return 503
    return 409 if error == "cancelled" else 422


@routes.post("/process_video_async")
async def process_video_async(request: web.Request) -> web.Response:
    """multipart `video` (+ max_frames) -> 200 {status:'accepted', job_id, message}."""
    path, fields = await receive_video(request)
    job = await submit_upload(request, path, parse_max_frames(fields.get("max_frames")))
    return respond({"status": "accepted", "job_id": job["job_id"], "queue_position": job.get("queue_position", 0),
                    "message": f"Video queued for processing; poll /job_status/{job['job_id']}"})


async def legacy_status(request: web.Request, job_id: str) -> dict:
    job = live(await job_status(request, job_id))  # 404 {error:'Job not found'}; 410 removed
    status = STATE_WORDS.get(job["state"], job["state"])
    body: dict[str, Any] = {"job_id": job_id, "status": status, "created_at": job.get("created_at")}
    if status == "queued":
        body["queue_position"] = job.get("queue_position")
        body["attempts"] = job.get("attempts")
    elif status == "processing":
        body["elapsed_time"] = round(time.time() - (job.get("started_at") or job.get("created_at")), 3)
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
    """queued | processing (elapsed_time, progress) | complete (result, output_path = the native result
    JSON, processing_time) | error (error). Unknown id -> 404 {error:'Job not found'}."""
    return respond(await legacy_status(request, request.match_info["job_id"]))


@routes.get("/pose/video/status/{job_id}")
async def pose_video_status(request: web.Request) -> web.Response:
    return respond(await legacy_status(request, request.match_info["job_id"]))


@routes.post("/pose/video")
async def pose_video(request: web.Request) -> web.Response:
    """JSON {video_path}: C:\\... becomes /mnt/c/... under WSL. Missing, nonexistent or outside the
    allowed roots -> 400, the same answer whether or not such a file exists (contract §5.21; nothing is
    revealed about the machine's files). The job runs from the supervisor's queue: 202
    {status:'processing', queue_position:0} when it is first in line, {status:'queued', queue_position:N}
    behind N others."""
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


@routes.get("/frame/{job_id}/{idx}")
async def frame_route(request: web.Request) -> web.Response:
    """200 image/jpeg of frame idx with the stored pose drawn (?overlay=0 for the bare frame).
    idx not an integer or out of range -> 400; job not complete -> 400; unknown job -> 404."""
    job_id, raw_index = request.match_info["job_id"], request.match_info["idx"]
    try:
        index = int(raw_index)
    except ValueError:
        raise json_error(400, f"frame index must be an integer, got {raw_index!r}") from None
    job = live(await job_status(request, job_id))
    if job["state"] != "done":
        raise json_error(400, f"Job not complete (status {STATE_WORDS.get(job['state'], job['state'])})")
    native = await cached_native(request, job["result_path"])
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


def frame_jpeg(video_path: str, roots: list, index: int, pts_s: Optional[float], persons: list, names: Sequence[str],
               overlay: bool, max_pixels: int) -> bytes:
    """The frame, from the very file checked to be inside the roots (not a symlink swapped in later)."""
    with open_inside(video_path, roots) as readable:
        return read_frame_jpeg(readable, index, pts_s, persons, names, overlay, max_pixels)


# --- native: the legacy shape of a native job -------------------------------------------------------------------------
@routes.get("/v1/jobs/{job_id}/legacy")
async def native_legacy_result(request: web.Request) -> web.Response:
    return respond(await legacy_result_of(request, await finished_job(request)))


def add_routes(app: web.Application) -> None:
    app[RESULT_CACHE_KEY] = OrderedDict()
    app.add_routes(routes)


__all__ = ["add_routes", "legacy_result", "hybrid_response", "legacy_health"]
