"""aiohttp application: the native /v1 API (and the legacy routes from gateway.legacy).

Handlers validate, ask the supervisor over ZeroMQ, and answer JSON. A supervisor that is down or
slow becomes a JSON 503 within gateway.supervisor_timeout_s; /v1/health always answers."""
from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from typing import Any, Optional

from aiohttp import web

from gateway import validation
from gateway.errors import LOG_KEY, json_error, json_errors
from pose_service.client import SupervisorClient, Unavailable
from pose_service.logs import setup_logging
from supervisor.diagnostics import is_wsl

CFG_KEY = web.AppKey("cfg", object)
CLIENT_KEY = web.AppKey("client", SupervisorClient)

routes = web.RouteTableDef()


# --- helpers shared with the legacy routes ------------------------------------------------------
def client(request: web.Request) -> SupervisorClient:
    return request.app[CLIENT_KEY]


def config(request: web.Request):
    return request.app[CFG_KEY]


async def ask(request: web.Request, kind: str, timeout_s: Optional[float] = None, blobs: Optional[list] = None,
              **body: Any) -> tuple[int, dict]:
    return await client(request).request(kind, timeout_s=timeout_s, blobs=blobs, **body)


async def read_json_body(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise json_error(415, f"expected application/json, got {request.content_type or 'no content type'}")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise json_error(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise json_error(400, "JSON body must be an object")
    return body


async def accept_video_path(request: web.Request, raw_path: Any, source: str = "path",
                            idempotency_key: Optional[str] = None) -> dict:
    """Validate a path (roots, existence, decodability) and submit it. -> job view."""
    cfg = config(request)
    mapped = validation.map_windows_path(raw_path, is_wsl()) if isinstance(raw_path, str) and \
        cfg.jobs.map_windows_paths else raw_path
    roots = list(cfg.jobs.allowed_roots)
    if source == "upload":
        roots = [os.path.join(cfg.state_dir, "uploads")]
    path = validation.check_video_path(mapped, roots)
    await asyncio.get_running_loop().run_in_executor(None, validation.probe_video_or_400, path)
    return await submit(request, path, source, idempotency_key)


async def submit(request: web.Request, path: str, source: str, idempotency_key: Optional[str]) -> dict:
    status, body = await ask(request, "submit", video_path=path, source=source, idempotency_key=idempotency_key)
    if status >= 400:
        raise json_error(status, body.get("error", "rejected"))
    return body["job"]


async def open_multipart(request: web.Request):
    try:
        return await request.multipart()
    except (AssertionError, ValueError) as exc:
        raise json_error(400, f"malformed multipart body: {exc}") from None


async def receive_upload(request: web.Request, field_names: tuple[str, ...] = ("video", "file")) -> tuple[str, dict]:
    """Save the multipart video under the state dir. -> (path, other form fields)."""
    cfg = config(request)
    reader = await open_multipart(request)
    path, fields = None, {}
    while (part := await reader.next()) is not None:
        if part.name in field_names and part.filename is not None and path is None:
            path = await validation.save_upload(part, os.path.join(cfg.state_dir, "uploads"),
                                                cfg.gateway.max_upload_mb << 20)
        elif part.name:
            fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")
    if path is None:
        raise json_error(400, f"multipart body has no file field ({' or '.join(field_names)})")
    return path, fields


async def job_status(request: web.Request, job_id: str) -> dict:
    status, body = await ask(request, "status", job_id=job_id)
    if status == 404:
        raise json_error(404, "Job not found")
    return body["job"]


async def finished_job(request: web.Request) -> dict:
    """The job named in the URL, or a 409 saying why its result is not there."""
    job = await job_status(request, request.match_info["job_id"])
    if job["state"] != "done":
        raise json_error(409, job.get("error") or f"job is {job['state']}", status=job["status"],
                         frames_done=job["frames_done"])
    return job


def job_public(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in ("result_path", "state")}


# --- native routes ------------------------------------------------------------------------------
@routes.post("/v1/jobs")
async def create_job(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if request.content_type.startswith("multipart/"):
        path, fields = await receive_upload(request)
        key = key or fields.get("idempotency_key")
        try:
            job = await accept_video_path(request, path, "upload", key)
        except Exception:
            os.unlink(path)
            raise
    else:
        body = await read_json_body(request)
        job = await accept_video_path(request, body.get("video_path"), "path", key or body.get("idempotency_key"))
    return web.json_response(job_public(job), status=202 if job.get("created", True) else 200)


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    return web.json_response(job_public(await job_status(request, request.match_info["job_id"])))


@routes.delete("/v1/jobs/{job_id}")
async def cancel_job(request: web.Request) -> web.Response:
    await job_status(request, request.match_info["job_id"])
    _, body = await ask(request, "cancel", job_id=request.match_info["job_id"])
    return web.json_response(job_public(body["job"]))


@routes.get("/v1/jobs/{job_id}/result")
async def get_result(request: web.Request) -> web.StreamResponse:
    job = await finished_job(request)
    fmt = request.query.get("format", "json")
    if fmt == "json":
        return web.FileResponse(job["result_path"], headers={"Content-Type": "application/json"})
    if fmt == "ndjson":
        return await stream_ndjson(request, job["result_path"])
    if fmt == "phalp_pkl":
        return await phalp_pickle(request, job)
    raise json_error(400, f"unknown format {fmt!r}: json, ndjson or phalp_pkl")


async def load_result(path: str) -> dict:
    def read() -> dict:
        with open(path) as fh:
            return json.load(fh)
    return await asyncio.get_running_loop().run_in_executor(None, read)


async def stream_ndjson(request: web.Request, path: str) -> web.StreamResponse:
    result = await load_result(path)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    frames = result.pop("frames")
    await response.write((json.dumps(result) + "\n").encode())
    for frame in frames:
        await response.write((json.dumps(frame) + "\n").encode())
    await response.write_eof()
    return response


async def phalp_pickle(request: web.Request, job: dict) -> web.Response:
    from pose_service.phalp_pickle import write_phalp_pickle

    result = await load_result(job["result_path"])
    out = job["result_path"][:-len(".json")] + ".pkl"
    try:
        await asyncio.get_running_loop().run_in_executor(None, write_phalp_pickle, result, out)
    except ValueError as exc:
        raise json_error(409, str(exc)) from None
    return web.FileResponse(out, headers={"Content-Type": "application/octet-stream"})


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    try:
        _, body = await ask(request, "health")
    except Unavailable as exc:
        return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
    state = body["health"]
    return web.json_response(state, status=200 if state["status"] in ("ready", "degraded") else 503)


@routes.get("/v1/diagnostics")
async def get_diagnostics(request: web.Request) -> web.Response:
    _, body = await ask(request, "diagnostics", timeout_s=10.0)
    return web.json_response({**body, "gateway_pid": os.getpid()})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format, built from the supervisor's counters (nothing kept in the gateway)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    up = Gauge("pose_supervisor_up", "1 when the supervisor answered", registry=registry)
    try:
        _, body = await ask(request, "metrics")
    except Unavailable:
        up.set(0)
        return web.Response(body=generate_latest(registry), content_type="text/plain")
    up.set(1)
    health = body["health"]
    status = Gauge("pose_status", "service status (1 for the current one)", ["status"], registry=registry)
    for word in ("ready", "degraded", "loading", "fatal"):
        status.labels(word).set(1 if health["status"] == word else 0)
    Gauge("pose_worker_generation", "worker generation", registry=registry).set(health["generation"])
    Gauge("pose_rung_index", "fallback ladder rung (0 = top)", registry=registry).set(health["rung_index"])
    Gauge("pose_queue_depth", "jobs queued or running", registry=registry).set(health["queue_depth"])
    Gauge("pose_worker_rss_bytes", "worker RSS", registry=registry).set(body.get("worker_rss") or 0)
    deaths = Gauge("pose_worker_deaths", "recorded worker/probe deaths and incidents", ["cause"], registry=registry)
    for cause, count in body["restarts_by_cause"].items():
        deaths.labels(cause).set(count)
    jobs = Gauge("pose_jobs", "jobs in the ledger", ["state"], registry=registry)
    for state, count in body["jobs_by_state"].items():
        jobs.labels(state).set(count)
    dropped = Gauge("pose_messages_dropped", "undecodable or stale messages", ["kind"], registry=registry)
    for kind, count in body["messages"].items():
        dropped.labels(kind).set(count)
    return web.Response(body=generate_latest(registry), content_type="text/plain")


@routes.post("/v1/drill")
async def drill(request: web.Request) -> web.Response:
    body = await read_json_body(request)
    from gpu_worker.engines.fault import KINDS

    if body.get("kind") not in KINDS:
        raise json_error(400, f"kind must be one of {', '.join(KINDS)}")
    status, reply = await ask(request, "drill", fault=body["kind"], at=body.get("at") or "frame:0")
    return web.json_response(reply, status=status)


@routes.post("/v1/reload")
async def reload(request: web.Request) -> web.Response:
    status, reply = await ask(request, "reload")
    return web.json_response(reply, status=status)


# --- app ------------------------------------------------------------------------------------------
def build_app(cfg) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=cfg.gateway.max_json_mb << 20)
    app[CFG_KEY] = cfg
    app[LOG_KEY] = setup_logging("gateway", cfg.log_level)
    app.cleanup_ctx.append(supervisor_client)
    app.add_routes(routes)
    from gateway import legacy
    legacy.add_routes(app)
    return app


@asynccontextmanager
async def _client_ctx(app: web.Application):
    cfg = app[CFG_KEY]
    sup = SupervisorClient(cfg.runtime_dir, cfg.gateway.supervisor_timeout_s)
    await sup.start()
    app[CLIENT_KEY] = sup
    try:
        yield
    finally:
        await sup.close()


async def supervisor_client(app: web.Application):
    async with _client_ctx(app):
        yield


def main(cfg) -> int:
    app = build_app(cfg)
    app[LOG_KEY].info("gateway_start", host=cfg.gateway.host, port=cfg.gateway.port)
    web.run_app(app, host=cfg.gateway.host, port=cfg.gateway.port, print=None, shutdown_timeout=10)
    return 0
