"""Jobs on the worker: dispatch from the ledger, frames into the ledger, completion, cancel, and the
single-image requests that interleave with them. The worker's life is the slot's; this module only
asks it whether a job may start and tells it about progress."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable, Optional

import structlog

from pose_common import protocol as P
from pose_common.overlay import overlay_path
from supervisor.ledger import Ledger
from supervisor.results import write_result
from supervisor.slot import WorkerSlot

SendWorker = Callable[..., bool]
Reply = Callable[..., None]


class JobRunner:
    def __init__(self, cfg, ledger: Ledger, slot: WorkerSlot, send_worker: SendWorker, log):
        self.cfg, self.ledger, self.slot, self.send_worker, self.log = cfg, ledger, slot, send_worker, log
        self.results_dir = os.path.join(cfg.state_dir, "results")
        os.makedirs(self.results_dir, exist_ok=True)
        self.current: Optional[str] = None
        self.cancelled_at: Optional[float] = None
        self.renders: list[subprocess.Popen] = []
        self.stale = 0

    # --- dispatch -------------------------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        if self.current or not self.slot.ready or self.slot.stopping:
            return
        job = self.ledger.next_job()
        if job is None:
            return
        start = self.ledger.next_frame(job.job_id)
        poison = self.ledger.poison_frames(job.job_id, self.cfg.jobs.poison_frame_deaths)
        sent = self.send_worker(P.T.RUN_JOB, job=job.job_id, path=job.video_path, start_frame=start,
                                poison={str(k): v for k, v in poison.items() if k >= start})
        if not sent:
            self.log.error("dispatch_failed", job_id=job.job_id, generation=self.slot.generation)
            self.slot.worker_unreachable("the worker's socket refused the job")
            return  # the job stays queued; its attempt is not spent
        self.ledger.mark_running(job.job_id)
        self.ledger.set_engine_meta(job.job_id, self.slot.engine_info)
        self.current = job.job_id
        self.slot.job_started(now)
        structlog.contextvars.bind_contextvars(job_id=job.job_id)
        self.log.info("job_dispatched", job_id=job.job_id, generation=self.slot.generation, start_frame=start,
                      attempt=job.attempts + 1, poison=sorted(poison))

    def owns(self, job_id: Optional[str]) -> bool:
        """A job message counts only for the job on the worker now (not one cancelled or requeued)."""
        if job_id is not None and job_id == self.current:
            return True
        self.stale += 1
        return False

    # --- job messages from the worker -------------------------------------------------------------
    def on_video(self, job_id: str, body: P.VideoFound, now: float) -> None:
        self.ledger.set_video_meta(job_id, {name: getattr(body.meta, name) for name in body.meta.__struct_fields__})
        self.slot.progressed(now)

    def on_frame(self, job_id: str, body: P.Frame, now: float) -> None:
        self.ledger.add_frame(job_id, body.index, body.pts, body.persons, body.error)
        self.slot.progressed(now, frame=True)

    def on_done(self, job_id: str, body: P.JobDone) -> None:
        if self.cancelled_at is None:
            self.finalize(job_id, body.frames_decoded, body.warning,
                          {"worker_peak_rss": body.peak_rss, "worker_generation": self.slot.generation})
        self.release()

    def on_failed(self, job_id: str, body: P.JobFailed) -> None:
        self.ledger.fail(job_id, body.reason)
        self.log.warning("job_failed", job_id=job_id, reason=body.reason)
        self.release()

    def release(self) -> None:
        self.current, self.cancelled_at = None, None
        structlog.contextvars.unbind_contextvars("job_id")
        self.slot.job_finished()

    def finalize(self, job_id: str, frames_decoded: int, warning: Optional[str], run_facts: dict) -> None:
        stored = self.ledger.frames_done(job_id)
        if stored != frames_decoded or self.ledger.next_frame(job_id) != frames_decoded:
            self.ledger.fail(job_id, f"internal: {stored} frames stored for {frames_decoded} decoded")
            return
        job = self.ledger.job(job_id)
        path = os.path.join(self.results_dir, f"{job_id}.json")
        write_result(path, job, self.ledger, self.slot.joint_names, warning, {**run_facts, "attempts": job.attempts},
                     self.slot.mesh_faces)
        self.ledger.finish(job_id, frames_decoded, path, warning)
        self.log.info("job_done", job_id=job_id, frames=frames_decoded, warning=warning)
        if self.cfg.jobs.render_overlay:
            self.start_overlay(job.video_path, path)

    # --- when the worker goes ---------------------------------------------------------------------------
    def requeue_current(self) -> Optional[str]:
        """The worker stopped or died under the current job: back to the queue (it resumes at the first
        unstored frame), unless it has used up its attempts. -> the job id, if there was one."""
        job_id, self.current, self.cancelled_at = self.current, None, None
        if not job_id:
            return None
        structlog.contextvars.unbind_contextvars("job_id")
        job = self.ledger.job(job_id)
        self.ledger.mark_queued(job_id)
        if job and job.attempts >= self.cfg.jobs.max_attempts:
            self.ledger.fail(job_id, f"gave up after {job.attempts} attempts")
        return job_id

    def cancel(self, job_id: str, now: float) -> bool:
        """-> True when the job is on the worker, which is then asked to stop it between two frames
        (the engine stays loaded); see enforce_cancels for a worker that does not."""
        self.ledger.fail(job_id, "cancelled")
        if job_id != self.current:
            return False
        self.cancelled_at = self.cancelled_at or now
        return True

    def enforce_cancels(self, now: float) -> None:
        if self.cancelled_at is not None and now - self.cancelled_at > self.cfg.supervisor.stop_grace_s:
            self.log.warning("cancel_ignored", job_id=self.current)
            self.cancelled_at = None
            self.slot.restart("cancel")

    # --- overlay renders ----------------------------------------------------------------------------
    def start_overlay(self, video: str, result_path: str) -> None:
        """Off the loop and out of the worker: a short-lived process draws the overlay video."""
        with open(os.path.join(self.cfg.runtime_dir, "overlay.stderr"), "ab") as log:
            self.renders.append(subprocess.Popen(
                [sys.executable, "-m", "pose_common.overlay", video, result_path, overlay_path(result_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log))

    def reap_renders(self) -> None:
        self.renders = [p for p in self.renders if p.poll() is None]

    # --- views -----------------------------------------------------------------------------------------
    def view(self, job_id: str) -> Optional[dict[str, Any]]:
        job = self.ledger.job(job_id)
        if job is None:
            return None
        view = {k: getattr(job, k) for k in ("job_id", "state", "video_path", "created_at", "started_at",
                                             "finished_at", "attempts", "frames_total", "error", "warning",
                                             "result_path", "source")}
        view["status"] = job.state
        view["frames_done"] = self.ledger.frames_done(job_id)
        view["video"] = job.meta()
        if job.result_path and os.path.exists(overlay_path(job.result_path)):
            view["overlay_path"] = overlay_path(job.result_path)
        if job.state in ("queued", "running"):
            view["queue_position"] = self.ledger.queue_position(job_id)
        return view


class PendingImages:
    """Single-image requests handed to the worker, each answered once: by the worker, by a timeout,
    or by the worker's end."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.waiting: dict[str, tuple[bytes, float]] = {}

    def add(self, req: str, identity: bytes, deadline: float) -> None:
        self.waiting[req] = (identity, deadline)

    def take(self, req: Optional[str]) -> Optional[bytes]:
        entry = self.waiting.pop(req or "", None)
        return entry[0] if entry else None

    def expire(self, now: float) -> None:
        for req, (identity, deadline) in list(self.waiting.items()):
            if now > deadline:
                del self.waiting[req]
                self.reply(identity, P.Envelope(P.T.IMAGE, req=req), 504, error="image inference timed out")

    def fail_all(self, reason: str) -> None:
        for req, (identity, _) in self.waiting.items():
            self.reply(identity, P.Envelope(P.T.IMAGE, req=req), 503, error=reason)
        self.waiting.clear()
