"""The native /v1 API. Handlers validate, ask the supervisor over ZeroMQ, and answer JSON. A
supervisor that is down or slow becomes a JSON 503 within gateway.supervisor_timeout_s;
/v1/health always answers."""
from __future__ import annotations

import asyncio
import json
import os
import sys

from aiohttp import web

from configs import ledger_path, results_dir
from gateway.errors import json_error
from gateway.helpers import (accept_video_path, ask, config, finished_job, job_status, load_result,
                             read_json_body, receive_upload)
from pose_common.client import Unavailable
from pose_common.faults import KINDS

routes = web.RouteTableDef()
REPORT_TIMEOUT_S = 120.0


def job_public(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in ("result_path", "state")}


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
    from pose_common.phalp_pickle import write_phalp_pickle

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
    if body.get("kind") not in KINDS:
        raise json_error(400, f"kind must be one of {', '.join(KINDS)}")
    status, reply = await ask(request, "drill", fault=body["kind"], at=body.get("at") or "frame:0")
    return web.json_response(reply, status=status)


@routes.post("/v1/reload")
async def reload(request: web.Request) -> web.Response:
    status, reply = await ask(request, "reload")
    return web.json_response(reply, status=status)


@routes.get("/v1/jobs/{job_id}/report")
async def get_report(request: web.Request) -> web.StreamResponse:
    """One self-contained HTML page about a finished job (pose_common.report), built on first request
    in a short-lived process (plots are CPU work the gateway's loop must not do) and kept with the
    job's other files."""
    job = await job_status(request, request.match_info["job_id"])
    if job["status"] not in ("done", "error"):
        raise json_error(409, f"job is {job['status']}; its report is written when it has finished",
                         status=job["status"])
    cfg = config(request)
    out = os.path.join(results_dir(cfg), f"{job['job_id']}.report.html")
    if not os.path.exists(out):
        await build_report(cfg.ledger.url or ledger_path(cfg), job["job_id"], out)
    return web.FileResponse(out, headers={"Content-Type": "text/html; charset=utf-8"})


async def build_report(ledger: str, job_id: str, out: str) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pose_common.report", ledger, job_id, out,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=REPORT_TIMEOUT_S)
    if proc.returncode != 0:
        last_line = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise json_error(500, "the report could not be built", detail=last_line[0][:300])
