"""Jobs on the worker: dispatch from the ledger, frames into the ledger, completion, cancel, and the
single-image requests that interleave with them. The worker's life is the slot's; this module only
asks it whether a job may start and tells it about progress. A job is `done` only when every
artifact its answer names exists and is whole: those are written in supervisor/renders.py."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import structlog

from configs import Config, results_dir
from pose_common import protocol as P
from pose_common.job_states import JobState
from pose_common.ledger import Job, Lease, LedgerUnavailable, SqlLedger
from pose_common.results import mesh_faces_key, split_meshes
from pose_common.views import job_view
from supervisor.renders import Renders
from supervisor.resume import resume_context
from supervisor.slot import WorkerSlot

SendWorker = Callable[..., bool]
Reply = Callable[..., None]
PROGRESS_EVERY_S = 0.5   # at most this often a progress event per job (SSE reads them)
DEFAULT_FPS, DEFAULT_JOB_FRAMES = 10.0, 300  # a guess until the running job has shown its pace


class JobRunner:
    def __init__(self, cfg: Config, ledger: SqlLedger, slot: WorkerSlot, send_worker: SendWorker, log, owner: str):
        self.cfg, self.ledger, self.slot, self.send_worker, self.log = cfg, ledger, slot, send_worker, log
        self.owner, self.lease_s = owner, cfg.ledger.lease_s
        self.results_dir = results_dir(cfg)
        os.makedirs(self.results_dir, mode=0o700, exist_ok=True)
        self.lease: Optional[Lease] = None        # the job on the worker
        self.job_stop_reason: Optional[str] = None  # why the job on the worker is being stopped, if it is
        self.stop_gives_back = False  # stopped for a ledger outage: its lease is given back once it is over
        self.stop_asked_at = 0.0
        # leases of jobs that left us while the ledger was away, still `running` under our name there:
        # given back (job id -> lease, charged?) as soon as it answers, before anything is claimed
        self.unreturned: dict[str, tuple[Lease, bool]] = {}
        self.unfinished: dict[str, Unfinished] = {}  # every frame stored, artifacts not written yet
        self.renders = Renders(cfg, ledger, owner, self.results_dir, log)
        self.last_renewal = 0.0
        self.progress = Progress()
        self.stale = 0

    @property
    def current(self) -> Optional[str]:
        return self.lease.job_id if self.lease else None

    def held(self) -> Lease:
        """The lease of the job on the worker; job messages reach us only while there is one (owns())."""
        if self.lease is None:
            raise RuntimeError("a job message with no job on the worker")
        return self.lease

    def job_row(self, job_id: str) -> Job:
        job = self.ledger.job(job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} is not in the ledger")
        return job

    # --- dispatch -------------------------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        if self.lease or self.unreturned or not self.slot.ready or self.slot.shutting_down:
            return
        job = self.ledger.claim(self.owner, self.lease_s)  # counts an attempt: refunded unless a death ends it
        if job is None:
            return
        try:
            start = self.ledger.next_frame(job.job_id, job.selected_frames())
            if every_frame_stored(job, start):
                return self.finish_stored(job)
            poison = self.ledger.poison_frames(job.job_id, self.cfg.jobs.poison_frame_deaths)
            resume = resume_context(self.ledger, job.job_id, start)
        except LedgerUnavailable:
            if job.job_id not in self.unfinished:
                self.unreturned[job.job_id] = (job.lease, False)  # claimed, never sent: given back uncharged
            raise
        sent = self.send_worker(P.T.RUN_JOB, job=job.job_id, path=job.video_path, start_frame=start,
                                max_frames=job.max_frames,
                                poison={str(k): v for k, v in poison.items() if k >= start}, **resume)
        if not sent:
            self.log.error("dispatch_failed", job_id=job.job_id, generation=self.slot.generation)
            self.unreturned[job.job_id] = (job.lease, False)  # it never reached the worker: no attempt used
            self.slot.worker_unreachable("the worker's socket refused the job")
            self.return_leases()
            return  # back in the queue
        self.lease = job.lease  # on the worker now: held, and timed by the slot, before any other write
        self.slot.job_started(now)
        self.ledger.set_engine_meta(job.lease, {**self.slot.engine_info, "joint_names": self.slot.joint_names})
        self.ledger.add_state_event(job.job_id, JobState.RUNNING, attempt=job.attempts,
                                    worker_generation=self.slot.generation)
        self.progress.start(job, now, self.ledger.frames_done(job.job_id))
        self.renders.follow(job)
        structlog.contextvars.bind_contextvars(job_id=job.job_id)
        self.log.info("job_dispatched", job_id=job.job_id, generation=self.slot.generation, start_frame=start,
                      attempt=job.attempts, poison=sorted(poison))

    def owns(self, job_id: Optional[str]) -> bool:
        """A job message counts only for the job on the worker now (not one cancelled or requeued)."""
        if job_id is not None and job_id == self.current:
            return True
        self.stale += 1
        return False

    # --- leases ---------------------------------------------------------------------------------------
    def keep_leases(self, now: float) -> None:
        """Renew what we hold, and finish the artifacts of jobs a stopped host left half-written."""
        if now - self.last_renewal < self.lease_s / 3:
            return
        self.last_renewal = now
        if self.lease and not self.job_stop_reason and not self.ledger.renew(self.lease, self.lease_s):
            self.stop_current("the job's lease was lost (taken over by another host, or cancelled)", now)
        self.renders.keep()

    def stop_current(self, reason: str, now: float, give_back: bool = False) -> None:
        """Stop the job on the worker between two frames without writing for it any more. `give_back`:
        its lease is still ours (the ledger went away), so it is returned to the queue once it is back."""
        if not self.lease or self.job_stop_reason:
            return
        self.log.warning("job_stopping", job_id=self.current, reason=reason)
        self.job_stop_reason, self.stop_asked_at, self.stop_gives_back = reason, now, give_back
        if not self.send_worker(P.T.STOP_JOB, job=self.current):
            self.slot.worker_unreachable("the worker's socket refused a stop")

    def finish_stored(self, job: Job) -> None:
        """Claimed with every frame already stored (the worker's `done`, or the supervisor, died after
        the last frame): a worker has nothing to do, the artifacts are written here and now."""
        declared = int(job.meta().get("frame_count") or 0)
        self.log.info("job_frames_already_stored", job_id=job.job_id, frames=declared)
        unfinished = Unfinished(job.lease, declared, None, {"worker_generation": None})
        self.unfinished[job.job_id] = unfinished
        self.finalize(unfinished)
        del self.unfinished[job.job_id]

    def return_leases(self) -> None:
        """Give back the jobs that left us during a ledger outage (or before they reached the worker),
        each charged only if a worker death ended it; finish those whose artifacts could not be written."""
        for job_id, (lease, died) in list(self.unreturned.items()):
            self.give_back(lease, died)
            del self.unreturned[job_id]
        for job_id, left in list(self.unfinished.items()):
            job = self.ledger.job(job_id)
            if job is not None and job.lease == left.lease and job.state == JobState.RUNNING:
                self.finalize(left)
            elif job is not None and job.lease == left.lease and job.state == JobState.RENDERING:
                self.renders.start(job, left.lease)
            del self.unfinished[job_id]

    def enforce_stops(self, now: float) -> None:
        if self.job_stop_reason and now - self.stop_asked_at > self.cfg.supervisor.stop_grace_s:
            self.log.warning("stop_ignored", job_id=self.current, reason=self.job_stop_reason)
            self.stop_asked_at = now
            self.slot.restart("cancel")

    # --- job messages from the worker -------------------------------------------------------------
    def on_video(self, job_id: str, body: P.VideoFound, now: float) -> None:
        meta = {name: getattr(body.meta, name) for name in body.meta.__struct_fields__}
        if self.job_stop_reason or not self.ledger.set_video_meta(self.held(), meta):
            return self.stop_current("the job's lease was lost", now)
        self.progress.frames_total = meta["frame_count"] or None
        self.slot.progressed(now)

    def on_warmed(self, job_id: str, body: P.Warmed, now: float) -> None:
        """A warm-up frame costs what a frame costs: it feeds the frame pace, and the job's view says
        it is resuming rather than showing stored frames that do not move."""
        self.slot.progressed(now, frame=True)
        if not self.job_stop_reason:
            self.ledger.add_event(job_id, "resuming", resuming_phase(body))

    def on_frame(self, job_id: str, body: P.Frame, now: float) -> None:
        self.slot.progressed(now, frame=True)
        if self.job_stop_reason:
            return
        persons = body.persons
        stored = self.ledger.add_frame(self.held(), body.index, body.pts, persons, body.error, split_meshes(persons))
        if stored is None:
            return self.stop_current("the job's lease was lost", now)
        if not stored:
            return  # recomputed after a resume: it was counted the first time
        self.slot.metrics.frame_stored()
        if event := self.progress.frame(now):
            self.ledger.add_event(job_id, "progress", event)

    def on_done(self, job_id: str, body: P.JobDone, now: float) -> None:
        """The worker is free whatever the ledger says; what could not be written is finished later."""
        unfinished = Unfinished(self.held(), body.frames_decoded, body.warning,
                                {"worker_peak_rss": body.peak_rss, "worker_generation": self.slot.generation})
        try:
            if not self.job_stop_reason:
                self.finalize(unfinished)
        except LedgerUnavailable:
            self.unfinished[job_id] = unfinished
            raise
        finally:
            self.release()

    def on_failed(self, job_id: str, body: P.JobFailed, now: float) -> None:
        lease = self.held()
        try:
            if not self.job_stop_reason:
                self.ledger.fail(job_id, body.reason, lease)
                self.log.warning("job_failed", job_id=job_id, reason=body.reason)
        except LedgerUnavailable:
            self.unreturned[job_id] = (lease, False)  # run again (and judged again) once the ledger is back
            raise
        finally:
            self.release()

    def release(self) -> None:
        """The worker is done with the job (whatever became of it): it is free for the next."""
        self.let_go(died=False)
        self.slot.job_finished()

    def let_go(self, died: bool) -> Optional[Lease]:
        """The job leaves the worker. -> its lease when it is ours to give back now (not stopped)."""
        lease, stopping, gives_back = self.lease, self.job_stop_reason, self.stop_gives_back
        self.lease, self.job_stop_reason, self.stop_gives_back = None, None, False
        structlog.contextvars.unbind_contextvars("job_id")
        if lease is not None and stopping and gives_back:
            self.unreturned[lease.job_id] = (lease, died)
        return None if stopping else lease

    def finalize(self, done: "Unfinished") -> None:
        """Every frame is in: the job's artifacts are written and it is done (or, for a count that does
        not add up, failed saying so)."""
        lease, frames_decoded, warning, run_facts = done.lease, done.frames_decoded, done.warning, done.run_facts
        job = self.job_row(lease.job_id)
        expected = [i for i in (job.selected_frames() or range(frames_decoded)) if i < frames_decoded]
        stored = self.ledger.stored_indices(lease.job_id)
        if set(expected) != stored:
            self.ledger.fail(lease.job_id, f"internal: {len(stored)} frames stored for {len(expected)} expected", lease)
            return
        warning = self.note_truncation(job, lease, frames_decoded, warning)
        if self.slot.mesh_faces is not None:
            self.ledger.put_blob(mesh_faces_key(self.slot.engine_info.get("name") or ""), self.slot.mesh_faces)
        result_path = os.path.join(self.results_dir, f"{lease.job_id}.json")
        if not self.ledger.mark_rendering(lease, len(stored), result_path, warning,
                                          {**run_facts, "frames_decoded": frames_decoded}):
            self.log.warning("finalize_refused", job_id=lease.job_id, reason="lease lost")
            return
        self.log.info("job_frames_complete", job_id=lease.job_id, frames=len(stored), warning=warning)
        self.renders.start(self.job_row(lease.job_id), lease)

    def note_truncation(self, job: Job, lease: Lease, decoded: int, warning: Optional[str]) -> Optional[str]:
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
        self.ledger.set_video_meta(lease, meta)
        return warning

    # --- when the worker goes ---------------------------------------------------------------------------
    def requeue_current(self, died: bool = True) -> Optional[str]:
        """The worker stopped or died under the current job: back to the queue (it resumes at the first
        unstored frame), unless deaths have used up its attempts. -> the job id, if there was one."""
        job_id = self.current
        lease = self.let_go(died)
        if lease is None:
            return job_id  # none, or not ours to write for any more (cancelled, lost lease, or no ledger)
        try:
            self.give_back(lease, died)
        except LedgerUnavailable:
            self.unreturned[lease.job_id] = (lease, died)  # given back when the ledger answers again
            raise
        return lease.job_id

    def give_back(self, lease: Lease, died: bool) -> None:
        """Back to the queue, charged only for a death; failed once deaths have used up its attempts
        (unless its frames are all stored: then nothing is left for a worker to die of)."""
        job = self.ledger.job(lease.job_id)
        complete = job is not None and every_frame_stored(job, self.ledger.next_frame(lease.job_id,
                                                                                     job.selected_frames()))
        if died and job and job.attempts >= self.cfg.jobs.max_attempts and not complete:
            self.ledger.fail(lease.job_id, gave_up(job.attempts, self.ledger.attempt_causes(lease.job_id)), lease)
        else:
            self.ledger.release(lease, charge_attempt=died)

    def cancel(self, job_id: str, now: float) -> None:
        """An operator's cancel: recorded at once; the worker stops the job between two frames and
        the engine stays loaded (see enforce_stops for a worker that does not)."""
        self.ledger.fail(job_id, "cancelled")
        if job_id == self.current:
            self.stop_current("cancelled", now)
        self.renders.drop(job_id)  # a cancelled job leaves no partial overlay

    def seconds_until_free(self, now: float) -> int:
        """When a place in a full queue is likely to open: the running job's frames left at its
        recent pace (a client's Retry-After)."""
        fps = self.progress.fps(now) or DEFAULT_FPS
        left = max(0, (self.progress.frames_total or DEFAULT_JOB_FRAMES) - self.progress.stored - self.progress.done)
        return int(min(3600, max(1, math.ceil(left / fps)))) if self.lease else 1

    # --- views -----------------------------------------------------------------------------------------
    def view(self, job_id: str) -> Optional[dict[str, Any]]:
        job = self.ledger.job(job_id)
        return None if job is None else job_view(job, self.ledger)


@dataclass
class Unfinished:
    """A job whose frames are all stored, with what its artifacts need."""
    lease: Lease
    frames_decoded: int
    warning: Optional[str]
    run_facts: dict


def every_frame_stored(job: Job, next_frame: int) -> bool:
    """The first unstored frame is past the last one the job needs (as its container declares them)."""
    selected = job.selected_frames()
    if selected:
        return next_frame > selected[-1]
    declared = int(job.meta().get("frame_count") or 0)
    return declared > 0 and next_frame >= declared


def resuming_phase(body: P.Warmed) -> dict[str, Any]:
    return {"status": "running", "phase": "resuming", "resume_at": body.start,
            "warm_frames": body.start - body.warm_from, "warm_frames_done": body.index + 1 - body.warm_from}


def gave_up(attempts: int, causes: list[str]) -> str:
    counted = Counter(causes)
    listed = ", ".join(f"{cause} x{count}" for cause, count in counted.most_common())
    return f"gave up after {attempts} attempts" + (f" (the worker died of: {listed})" if listed else "")


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

    def __init__(self, reply: Reply, slot: Optional[WorkerSlot] = None):
        self.reply, self.slot = reply, slot
        self.waiting: dict[str, tuple[bytes, float]] = {}

    def add(self, req: str, identity: bytes, deadline: float) -> None:
        """Sent to the worker: the caller waits until `deadline`; the slot times the worker's answer
        (deadlines.image_s of run time) and replaces a worker that never gives it."""
        self.waiting[req] = (identity, deadline)
        if self.slot is not None:
            self.slot.image_sent(req, self.slot.clock())

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

