"""Jobs on the worker: dispatch from the ledger, frames into the ledger, completion, cancel, and the
single-image requests that interleave with them. The worker's life is the slot's; this module only
asks it whether a job may start and tells it about progress.

A job is `done` only when every artifact its answer names exists and is whole: when the worker has
sent its last frame the job enters `rendering`, the result file and the overlay video are written
by a side process (never on the worker), and only then is the job finished."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable, Optional

import structlog

from pose_common import protocol as P
from pose_common.children import parent_death_signal
from pose_common.ledger import Job, Ledger
from pose_common.overlay import overlay_path
from pose_common.results import mesh_faces_key, split_meshes, write_result
from supervisor.slot import WorkerSlot

SendWorker = Callable[..., bool]
Reply = Callable[..., None]
PROGRESS_EVERY_S = 0.5   # at most this often a progress event per job (SSE reads them)


class JobRunner:
    def __init__(self, cfg, ledger: Ledger, slot: WorkerSlot, send_worker: SendWorker, log):
        self.cfg, self.ledger, self.slot, self.send_worker, self.log = cfg, ledger, slot, send_worker, log
        self.results_dir = os.path.join(cfg.state_dir, "results")
        os.makedirs(self.results_dir, mode=0o700, exist_ok=True)
        self.current: Optional[str] = None
        self.cancelled_at: Optional[float] = None
        self.renders: dict[str, subprocess.Popen] = {}
        self.progress = Progress()
        self.stale = 0

    def resume_renders(self) -> None:
        """On boot: jobs whose frames were all stored when the supervisor stopped get their artifacts."""
        for job in self.ledger.rendering():
            self.start_render(job)

    # --- dispatch -------------------------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        if self.current or not self.slot.ready or self.slot.stopping:
            return
        job = self.ledger.next_job()
        if job is None:
            return
        start = self.ledger.next_frame(job.job_id, job.selected_frames())
        poison = self.ledger.poison_frames(job.job_id, self.cfg.jobs.poison_frame_deaths)
        sent = self.send_worker(P.T.RUN_JOB, job=job.job_id, path=job.video_path, start_frame=start,
                                max_frames=job.max_frames,
                                poison={str(k): v for k, v in poison.items() if k >= start})
        if not sent:
            self.log.error("dispatch_failed", job_id=job.job_id, generation=self.slot.generation)
            self.slot.worker_unreachable("the worker's socket refused the job")
            return  # the job stays queued; its attempt is not spent
        self.ledger.mark_running(job.job_id, self.slot.generation)
        self.ledger.set_engine_meta(job.job_id, {**self.slot.engine_info, "joint_names": self.slot.joint_names})
        self.current = job.job_id
        self.slot.job_started(now)
        self.progress.start(job, now, self.ledger.frames_done(job.job_id))
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
        meta = {name: getattr(body.meta, name) for name in body.meta.__struct_fields__}
        self.ledger.set_video_meta(job_id, meta)
        self.progress.frames_total = meta["frame_count"] or None
        self.slot.progressed(now)

    def on_frame(self, job_id: str, body: P.Frame, now: float) -> None:
        persons = body.persons
        stored = self.ledger.add_frame(job_id, body.index, body.pts, persons, body.error, split_meshes(persons))
        self.slot.progressed(now, frame=True)
        if not stored:
            return  # recomputed after a resume: it was counted the first time
        self.slot.metrics.frame_stored()
        if event := self.progress.frame(now):
            self.ledger.add_event(job_id, "progress", event)

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
        job = self.ledger.job(job_id)
        expected = [i for i in (job.selected_frames() or range(frames_decoded)) if i < frames_decoded]
        stored = self.ledger.stored_indices(job_id)
        if set(expected) != stored:
            self.ledger.fail(job_id, f"internal: {len(stored)} frames stored for {len(expected)} expected")
            return
        warning = self.note_truncation(job, frames_decoded, warning)
        if self.slot.mesh_faces is not None:
            self.ledger.put_blob(mesh_faces_key(self.slot.engine_info.get("name") or ""), self.slot.mesh_faces)
        self.ledger.mark_rendering(job_id, len(stored), os.path.join(self.results_dir, f"{job_id}.json"), warning,
                                   {**run_facts, "frames_decoded": frames_decoded})
        self.log.info("job_frames_complete", job_id=job_id, frames=len(stored), warning=warning)
        self.start_render(self.ledger.job(job_id))

    def note_truncation(self, job: Job, decoded: int, warning: Optional[str]) -> Optional[str]:
        """Compare what was decoded with what the container declares: a cut or damaged file says so."""
        meta = job.meta()
        declared = int(meta.get("frame_count") or 0)
        selected = job.selected_frames()
        meta.update(frames_decoded=decoded, frames_expected=len(selected) if selected else declared or None)
        cut = any(i >= decoded for i in selected) if selected else declared and decoded < declared
        if cut:
            meta["truncated"] = True
            reason = f"video truncated or damaged: decoded {decoded} of the {declared} frames its container declares"
            warning = f"{reason} ({warning})" if warning else reason
        self.ledger.set_video_meta(job.job_id, meta)
        return warning

    # --- artifacts ----------------------------------------------------------------------------------
    def start_render(self, job: Job) -> None:
        """Off the loop and off the worker: a short-lived process writes the result file and the
        overlay; the job is done when it has."""
        write_result(job.result_path, job, self.ledger)
        if not self.cfg.jobs.render_overlay:
            self.ledger.finish(job.job_id)
            return
        with open(os.path.join(self.cfg.runtime_dir, "overlay.stderr"), "ab") as log:
            self.renders[job.job_id] = subprocess.Popen(
                [sys.executable, "-m", "pose_common.overlay", self.ledger.path, job.job_id, job.video_path,
                 overlay_path(job.result_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                preexec_fn=parent_death_signal(os.getpid()))

    def reap_renders(self) -> None:
        for job_id, proc in list(self.renders.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.renders[job_id]
            job = self.ledger.job(job_id)
            if code == 0:
                self.ledger.finish(job_id, overlay_path=overlay_path(job.result_path))
            else:
                self.ledger.finish(job_id, warning=f"the overlay video could not be rendered (exit {code})")
            self.log.info("job_done", job_id=job_id, overlay=code == 0)

    def stop_renders(self) -> None:
        for proc in self.renders.values():
            proc.kill()

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

    # --- views -----------------------------------------------------------------------------------------
    def view(self, job_id: str) -> Optional[dict[str, Any]]:
        job = self.ledger.job(job_id)
        return None if job is None else job_view(job, self.ledger)


def job_view(job: Job, ledger: Ledger) -> dict[str, Any]:
    """What a client sees of a job. `status` is queued|running|done|error; while the result's files are
    written the job is still `running`, with `phase: rendering`."""
    view = {k: getattr(job, k) for k in ("job_id", "state", "video_path", "created_at", "started_at",
                                         "finished_at", "attempts", "frames_total", "error", "warning",
                                         "result_path", "source", "max_frames")}
    view["status"] = "running" if job.state == "rendering" else job.state
    view["phase"] = "rendering" if job.state == "rendering" else None
    view["frames_done"] = ledger.frames_done(job.job_id)
    view["video"] = job.meta()
    if job.overlay_path and job.state == "done":
        view["overlay_path"] = job.overlay_path
    if job.state in ("queued", "running"):
        view["queue_position"] = ledger.queue_position(job.job_id)
    if job.removed_at:
        view["removed"] = {"at": job.removed_at, "reason": job.removed_reason}
    return view


class Progress:
    """Throttled progress of the job on the worker: frames done and total, frames per second, ETA."""

    def __init__(self):
        self.started = self.last_event = 0.0
        self.done = self.stored = 0
        self.frames_total: Optional[int] = None

    def start(self, job: Job, now: float, stored: int) -> None:
        self.started, self.last_event, self.done, self.stored = now, 0.0, 0, stored
        selected = job.selected_frames()
        self.frames_total = len(selected) if selected else (job.frames_total or None)

    def fps(self, now: float) -> Optional[float]:
        return round(self.done / max(now - self.started, 1e-6), 2) if self.done else None

    def frame(self, now: float) -> Optional[dict]:
        self.done += 1
        if now - self.last_event < PROGRESS_EVERY_S:
            return None
        self.last_event = now
        fps = self.done / max(now - self.started, 1e-6)
        left = (self.frames_total - self.stored - self.done) if self.frames_total else None
        return {"frames_done": self.stored + self.done, "frames_total": self.frames_total, "fps": round(fps, 2),
                "eta_s": round(left / fps, 1) if left is not None and fps > 0 else None}


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

