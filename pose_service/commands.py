"""The CLI verbs that do work: run, drill, diagnose, models verify."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from configs import ledger_location
from pose_common.client import SupervisorClient, Unavailable


# --- run ------------------------------------------------------------------------------------------
def run_clip(cfg, args, overrides: list[str]) -> int:
    video = args.video
    if args.demo:
        from pose_service.democlip import make_demo_clip
        video = make_demo_clip(os.path.join(cfg.state_dir, "demo.mp4"))
        print(f"demo clip: {video}")
    if not video:
        print("error: give a VIDEO path or --demo", file=sys.stderr)
        return 2
    from pose_common.video import VideoError, probe
    try:
        meta = probe(video)
    except VideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_path = os.path.join(cfg.state_dir, "supervisor.log")
    os.makedirs(cfg.state_dir, exist_ok=True)
    private = [*overrides, private_roots(cfg, video)] + ([] if args.overlay else ["jobs.render_overlay=false"])
    with open(log_path, "ab") as log:
        sup = subprocess.Popen([sys.executable, "-m", "pose_service.cli", "supervisor", *private],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        return asyncio.run(follow_job(cfg, os.path.realpath(video), args, meta.frame_count, sup, log_path))
    finally:
        sup.terminate()
        try:
            sup.wait(15)
        except subprocess.TimeoutExpired:
            sup.kill()


def private_roots(cfg, video: str) -> str:
    """The private supervisor accepts the clip the CLI user named (it checks every path it is given)."""
    roots = [*cfg.jobs.allowed_roots, os.path.dirname(os.path.realpath(video))]
    return "jobs.allowed_roots=[" + ",".join("'" + root.replace("'", "\\'") + "'" for root in roots) + "]"


def sibling(out: str, suffix: str) -> str:
    """result.json -> result.overlay.mp4: artifacts land next to the result the user asked for."""
    stem = out[:-len(".json")] if out.endswith(".json") else out
    return stem + suffix


async def follow_job(cfg, video: str, args, frame_hint: int, sup: subprocess.Popen, log_path: str) -> int:
    from tqdm import tqdm

    client = SupervisorClient(cfg.runtime_dir, timeout_s=5.0)
    await client.start()
    try:
        status, body = await until_answered(client, "submit", sup, video_path=video, source="cli")
        if status >= 400:
            print(f"error: {body.get('error')}", file=sys.stderr)
            return 1
        job_id = body["job"]["job_id"]
        bar = tqdm(total=frame_hint or None, unit="frame", disable=args.quiet, desc="pose")
        events = JobEvents(ledger_location(cfg), job_id)
        while True:
            _, body = await until_answered(client, "status", sup, job_id=job_id)
            job = body["job"]
            bar.total = job.get("frames_total") or bar.total
            bar.update(job["frames_done"] - bar.n)
            bar.set_postfix_str("writing the overlay" if job.get("phase") == "rendering" else "", refresh=False)
            for line in events.restarts():
                bar.write(line)
            if job["state"] in ("done", "error"):
                break
            await asyncio.sleep(0.2)
        bar.close()
        if job["state"] == "error":
            print(f"error: {job['error']} (supervisor log: {log_path})", file=sys.stderr)
            for line in await failing_stage(client, sup):
                print(line, file=sys.stderr)
            return 1
        export_result(ledger_location(cfg), job_id, args.out)
        print_summary(args.out, job)
        if job.get("overlay_path"):
            overlay = shutil.copyfile(job["overlay_path"], sibling(args.out, ".overlay.mp4"))
            print(f"overlay (every frame with the pose drawn): {overlay}")
        if args.report:
            from pose_common.report import write_report
            written = write_report(ledger_location(cfg), job_id, args.report, float(cfg.angles.min_visibility))
            print(f"report (open it in a browser): {written}")
        return 0
    finally:
        await client.close()


async def failing_stage(client: SupervisorClient, sup: subprocess.Popen) -> list[str]:
    """The last crash report's stage, summary and remedy: why loading failed (which files are
    missing and where to get them), which the job's error alone does not say."""
    try:
        _, body = await until_answered(client, "diagnostics", sup, patience_s=10.0)
    except SystemExit:
        return []
    crashes = body.get("crashes") or []
    if not crashes:
        return []
    crash = crashes[-1]
    where = f"{crash.get('process') or 'worker'} stage {crash.get('stage')}" if crash.get("stage") else "worker"
    lines = [f"{where} failed: {crash.get('cause')}"]
    lines += [f"  {line}" for line in str(crash.get("summary") or "").splitlines()]
    if crash.get("remedy"):
        lines.append(f"remedy: {crash['remedy']}")
    return lines


async def until_answered(client: SupervisorClient, kind: str, sup: subprocess.Popen, patience_s: float = 120.0,
                         **body: Any) -> tuple[int, dict]:
    """The private supervisor may still be starting: retry until it answers or exits."""
    give_up = time.monotonic() + patience_s
    while True:
        try:
            return await client.request(kind, **body)
        except Unavailable:
            if sup.poll() is not None or time.monotonic() > give_up:
                raise SystemExit(f"error: supervisor exited ({sup.poll()}); see its log") from None
            await asyncio.sleep(0.2)


class JobEvents:
    """What the CLI prints between progress updates: the worker restarts that touched the job."""

    def __init__(self, ledger: str, job_id: str):
        self.ledger, self.job_id, self.seen = ledger, job_id, 0

    def restarts(self) -> list[str]:
        from pose_common.ledger_open import open_ledger_at
        ledger = open_ledger_at(self.ledger, readonly=True)
        try:
            events = ledger.events_since(self.job_id, self.seen)
        finally:
            ledger.close()
        if events:
            self.seen = events[-1]["id"]
        return [f"worker restarted after {e['data'].get('cause')} at frame {e['data'].get('frame')}; resuming"
                for e in events if e["type"] == "restart"]


def export_result(ledger: str, job_id: str, out: str) -> None:
    """The native result, written from the ledger (the one source of every result)."""
    from pose_common.ledger_open import open_ledger_at
    from pose_common.results import write_result

    opened = open_ledger_at(ledger, readonly=True)
    try:
        job = opened.job(job_id)
        if job is None:
            raise LookupError(f"job {job_id} is not in the ledger")
        write_result(out, job, opened)
    finally:
        opened.close()


def print_summary(path: str, job: dict) -> None:
    with open(path) as fh:
        result = json.load(fh)
    frames = result["frames"]
    with_person = sum(1 for f in frames if f["persons"])
    engine = result["engine"]
    print(f"{len(frames)} frames ({with_person} with a person) by {engine['name']} {engine['version']} on "
          f"{engine['device']}, attempts {job['attempts']} -> {path}")


# --- drill ----------------------------------------------------------------------------------------
def daemon_auth(cfg) -> dict[str, str]:
    """The Authorization header every verb that talks to the daemon sends: the token from
    gateway.auth_token, $POSE_SERVICE_TOKEN or gateway.auth_token_file (none: no header)."""
    from gateway.security import read_token

    token = read_token(cfg)
    return {"Authorization": f"Bearer {token}"} if token else {}


def drill(cfg, args) -> int:
    import urllib.request

    from gateway.security import TokenUnreadable

    base = args.url or f"http://{cfg.gateway.host}:{cfg.gateway.port}"
    at = args.at or "frame:5"
    try:
        auth = daemon_auth(cfg)
    except TokenUnreadable as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return 2

    def call(method: str, path: str, body: Optional[dict] = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **auth})
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    _, before = call("GET", "/v1/diagnostics")
    seen = {c["id"] for c in before.get("crashes", [])}
    status, armed = call("POST", "/v1/drill", {"kind": args.fault, "at": at})
    if status != 200:
        print(f"drill refused ({status}): {armed.get('error')}", file=sys.stderr)
        return 2
    print(f"armed {args.fault} at {at}")
    if at.startswith("frame:"):
        from pose_service.democlip import make_demo_clip
        with tempfile.TemporaryDirectory() as tmp:
            clip = make_demo_clip(os.path.join(tmp, "drill.mp4"), frames=max(30, int(at[6:]) + 10))
            status, job = upload(base + "/v1/jobs", clip, auth)
        print(f"drill job: {job.get('job_id') or job}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        _, diag = call("GET", "/v1/diagnostics")
        new = [c for c in diag.get("crashes", []) if c["id"] not in seen]
        if new:
            report = new[-1]
            print(json.dumps({k: report.get(k) for k in ("process", "stage", "frame_index", "cause", "summary",
                                                        "exit_code", "signal", "remedy")}, indent=2))
            print(f"health now: {diag['health']['status']} ({diag['health']['worker']})")
            return 0
        time.sleep(0.5)
    print("no crash report within the timeout", file=sys.stderr)
    return 1


def upload(url: str, path: str, headers: Optional[dict] = None) -> tuple[int, dict]:
    """multipart/form-data POST of one file as field `video` (stdlib only)."""
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    with open(path, "rb") as fh:
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; "
                   f"filename=\"{os.path.basename(path)}\"\r\nContent-Type: video/mp4\r\n\r\n").encode() \
            + fh.read() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=payload, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# --- diagnose -------------------------------------------------------------------------------------
def diagnose(cfg, args) -> int:
    from configs import dump_config, rungs
    from pose_common import hostinfo
    from supervisor.causes import Death, decode_exit

    rung = dict(rungs(cfg)[0])
    if args.engine:
        configured = next((r for r in rungs(cfg) if r["engine"] == args.engine), {})
        default_device = "cuda" if args.engine == "hmr2_phalp" else "cpu"
        rung = {"engine": args.engine, "device": args.device or configured.get("device") or default_device,
                "options": configured.get("options") or {}}
    elif args.device:
        rung["device"] = args.device
    os.makedirs(cfg.runtime_dir, exist_ok=True)
    config_path = os.path.join(cfg.runtime_dir, "diagnose-config.yaml")
    dump_config(cfg, config_path)
    rows, failed = [], None
    for count, name in enumerate(stage_names(rung), start=1):
        report, code, stderr = run_stages_in_child(config_path, rung, cfg, count)
        stage = (report.get("stages") or [{}])[-1]
        row = {"stage": name, "result": stage.get("result", "failed"), "duration_s": stage.get("duration_s"),
               "rss_delta_mb": _mb(stage.get("rss_delta")), "gpu_delta_mb": _mb(stage.get("gpu_delta"))}
        if code != 0 or not report.get("ok"):
            cause = decode_exit(Death(returncode=code, reported=report if report.get("cause") else None,
                                      stage=report.get("stage"), stderr_tail=stderr,
                                      killed_by_us=("hang: stage deadline" if code == -9 and not report.get("cause")
                                                    else None),
                                      system_memory=hostinfo.system_memory()))
            row.update(result="failed", cause=cause.kind, summary=cause.summary, remedy=cause.remedy)
            failed = row
        rows.append(row)
        if failed:
            break
    out = {"engine": rung, "stages": rows, "ok": failed is None, "failed_stage": failed and failed["stage"],
           "host": hostinfo.host_facts(), "gpu": hostinfo.gpu_facts(), "packages": hostinfo.package_versions()}
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print_stage_table(out)
    return 0 if failed is None else 1


def stage_names(rung: dict) -> list[str]:
    from gpu_worker.engines import build_engine
    return [s.name for s in build_engine(rung["engine"], rung.get("device", "cpu"), rung.get("options") or {}).stages()]


def run_stages_in_child(config_path: str, rung: dict, cfg, count: int) -> tuple[dict, int, str]:
    """Stages 1..count in a fresh process, so a crash in stage `count` is that stage's alone."""
    out = os.path.join(cfg.runtime_dir, f"diagnose-{count}.json")
    argv = [sys.executable, "-m", "gpu_worker.probe", "--config", config_path, "--rung", json.dumps(rung),
            "--out", out, "--all-stages", "--stop-after", str(count)]
    deadline = cfg.deadlines.stage_default_s * count
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=deadline)
        code, stderr = proc.returncode, proc.stderr.decode("utf-8", "replace")[-4000:]
    except subprocess.TimeoutExpired as exc:
        code, stderr = -9, (exc.stderr or b"").decode("utf-8", "replace")[-4000:]
    from supervisor.process import read_json
    return read_json(out), code, stderr


def print_stage_table(out: dict) -> None:
    rung = out["engine"]
    print(f"engine {rung['engine']} on {rung.get('device')}")
    print(f"{'stage':<12} {'result':<8} {'time s':>8} {'RSS MB':>8} {'GPU MB':>8}")
    for row in out["stages"]:
        print(f"{row['stage']:<12} {row['result']:<8} {_fmt(row['duration_s']):>8} {_fmt(row['rss_delta_mb']):>8} "
              f"{_fmt(row['gpu_delta_mb']):>8}")
        if row.get("cause"):
            print(f"  cause: {row['cause']}: {row['summary']}\n  remedy: {row['remedy']}")
    gpu = out["gpu"]
    print(f"GPU: {gpu.get('devices') or gpu.get('reason')}")
    print("OK" if out["ok"] else f"FAILED at stage {out['failed_stage']}")


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / (1 << 20), 1)


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


# --- models verify ----------------------------------------------------------------------------------
def models_verify(cfg, args) -> int:
    engine = args.engine or cfg.engine.name
    if engine == "hmr2_phalp":
        rows = hmr2_phalp_assets(cfg, args.detector)
    elif engine == "mediapipe":
        rows = mediapipe_assets()
    else:
        rows = []
    if args.json:
        print(json.dumps({"engine": engine, "files": rows}, indent=2))
    else:
        print(f"engine {engine}: {len(rows)} files")
        for row in rows:
            size = "-" if row.get("size") is None else f"{row['size'] / (1 << 20):.1f} MB"
            print(f"  [{row['status']:<9}] {row['name']:<28} {size:>10}  {row['path']}")
            if row.get("problem"):
                print(f"               {row['problem']}")
            if row["status"] != "present":
                print(f"               get it: {row['source']}")
    return 0 if all(r["status"] == "present" or r.get("optional") for r in rows) else 1


def hmr2_phalp_assets(cfg, detector: Optional[str]) -> list[dict]:
    """The files the configured hmr2_phalp rungs read (their detectors, appearance and cache options,
    as the engine applies them), checked by the same function as the engine's weights stage."""
    from pose_service.hmr2_verify import hmr2_phalp_rows
    return hmr2_phalp_rows(cfg, detector)


def mediapipe_assets() -> list[dict]:
    from importlib.util import find_spec

    from gpu_worker.engines.mediapipe_engine import BUNDLED_MODELS, MIN_MODEL_BYTES
    spec = find_spec("mediapipe")
    base = os.path.dirname(spec.origin) if spec and spec.origin else ""
    rows = []
    for rel in BUNDLED_MODELS:
        path = os.path.join(base, rel)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        status = "missing" if size is None else ("truncated" if size < MIN_MODEL_BYTES else "present")
        rows.append({"name": os.path.basename(rel), "path": path, "status": status, "size": size,
                     "min_size": MIN_MODEL_BYTES, "source": "pip install --no-deps mediapipe==0.10.21 (bundled)"})
    return rows
