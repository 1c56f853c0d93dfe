"""`pose-service run VIDEO`: one clip through a private supervisor and worker (no gateway), the
progress on a bar, then the result, overlay and report written next to --out."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from configs import Config, ledger_location
from pose_common.client import SupervisorClient, Unavailable
from pose_common.job_states import is_terminal


def run_clip(cfg: Config, args, overrides: list[str]) -> int:
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


def private_roots(cfg: Config, video: str) -> str:
    """The private supervisor accepts the clip the CLI user named (it checks every path it is given)."""
    roots = [*cfg.jobs.allowed_roots, os.path.dirname(os.path.realpath(video))]
    return "jobs.allowed_roots=[" + ",".join("'" + root.replace("'", "\\'") + "'" for root in roots) + "]"


def sibling(out: str, suffix: str) -> str:
    """result.json -> result.overlay.mp4: artifacts land next to the result the user asked for."""
    stem = out[:-len(".json")] if out.endswith(".json") else out
    return stem + suffix


async def follow_job(cfg: Config, video: str, args, frame_hint: int, sup: subprocess.Popen, log_path: str) -> int:
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
            if is_terminal(job["state"]):
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
