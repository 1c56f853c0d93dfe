"""Jobs on the worker: dispatch from the ledger, frames into the ledger, completion, cancel, and the
single-image requests that interleave with them. The worker's life is the slot's; this module only
asks it whether a job may start and tells it about progress.

A job is `done` only when every artifact its answer names exists and is whole. The overlay video is
drawn beside the inference by a side process at a lower priority (never on the worker) that follows
the ledger from the job's first dispatch; when the worker has sent its last frame the job enters
`rendering`, the result file is written (on the supervisor's loop), and once the overlay process
has encoded the last frames and exited the job is finished."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

import structlog

from configs import Config, results_dir, video_roots
from pose_common import protocol as P
from pose_common.children import parent_death_signal
from pose_common.ledger import Job, Lease, SqlLedger
from pose_common.overlay import overlay_path, partial_path, remove
from pose_common.paths import PathRefused, open_inside
from pose_common.results import mesh_faces_key, split_meshes, write_result
from pose_common.runtime import RuntimeDir
from pose_common.views import job_view
from supervisor.resume import resume_context
from supervisor.slot import WorkerSlot

SendWorker = Callable[..., bool]
Reply = Callable[..., None]
PROGRESS_EVERY_S = 0.5   # at most this often a progress event per job (SSE reads them)
DEFAULT_FPS, DEFAULT_JOB_FRAMES = 10.0, 300  # a guess until the running job has shown its pace
OVERLAY_NICENESS = 10    # the overlay drawn beside the inference takes only the CPU the worker leaves


class JobRunner:
    def __init__(self, cfg: Config, ledger: SqlLedger, slot: WorkerSlot, send_worker: SendWorker, log, owner: str):
        self.cfg, self.ledger, self.slot, self.send_worker, self.log = cfg, ledger, slot, send_worker, log
        self.owner, self.lease_s = owner, cfg.ledger.lease_s
        self.results_dir = results_dir(cfg)
        os.makedirs(self.results_dir, mode=0o700, exist_ok=True)
        self.lease: Optional[Lease] = None        # the job on the worker
        self.job_stop_reason: Optional[str] = None  # why the job on the worker is being stopped, if it is
        self.stop_asked_at = 0.0
        self.renders: dict[str, Render] = {}
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
        if self.lease or not self.slot.ready or self.slot.shutting_down:
            return
        job = self.ledger.claim(self.owner, self.lease_s)
        if job is None:
            return
        start = self.ledger.next_frame(job.job_id, job.selected_frames())
        poison = self.ledger.poison_frames(job.job_id, self.cfg.jobs.poison_frame_deaths)
        sent = self.send_worker(P.T.RUN_JOB, job=job.job_id, path=job.video_path, start_frame=start,
                                max_frames=job.max_frames,
                                poison={str(k): v for k, v in poison.items() if k >= start},
                                **resume_context(self.ledger, job.job_id, start))
        if not sent:
            self.log.error("dispatch_failed", job_id=job.job_id, generation=self.slot.generation)
            self.ledger.release(job.lease)
            self.slot.worker_unreachable("the worker's socket refused the job")
            return  # back in the queue
        self.lease = job.lease
        self.ledger.set_engine_meta(job.lease, {**self.slot.engine_info, "joint_names": self.slot.joint_names})
        self.ledger.add_event(job.job_id, "running", {"status": "running", "attempt": job.attempts,
                                                      "worker_generation": self.slot.generation})
        self.slot.job_started(now)
        self.progress.start(job, now, self.ledger.frames_done(job.job_id))
        self.follow_with_overlay(job)
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
        for job_id, render in list(self.renders.items()):
            if render.lease is None:
                self.check_follower(job_id, render)
            elif not self.ledger.renew(render.lease, self.lease_s):
                self.log.warning("render_lease_lost", job_id=job_id)
                self.drop_render(job_id)
        for _ in range(4):  # a few per round; the rest next time
            job = self.ledger.claim_render(self.owner, self.lease_s)
            if job is None or job.job_id in self.renders:
                break
            self.start_render(job, job.lease)

    def stop_current(self, reason: str, now: float) -> None:
        """Stop the job on the worker between two frames without writing for it any more."""
        if not self.lease or self.job_stop_reason:
            return
        self.log.warning("job_stopping", job_id=self.current, reason=reason)
        self.job_stop_reason, self.stop_asked_at = reason, now
        self.send_worker(P.T.STOP_JOB, job=self.current)

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
        if not self.job_stop_reason:
            self.finalize(body.frames_decoded, body.warning,
                          {"worker_peak_rss": body.peak_rss, "worker_generation": self.slot.generation})
        self.release()

    def on_failed(self, job_id: str, body: P.JobFailed, now: float) -> None:
        if not self.job_stop_reason:
            self.ledger.fail(job_id, body.reason, self.lease)
            self.log.warning("job_failed", job_id=job_id, reason=body.reason)
        self.release()

    def release(self) -> None:
        """The worker is done with the job (whatever became of it): it is free for the next."""
        self.lease, self.job_stop_reason = None, None
        structlog.contextvars.unbind_contextvars("job_id")
        self.slot.job_finished()

    def finalize(self, frames_decoded: int, warning: Optional[str], run_facts: dict) -> None:
        lease = self.held()
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
        self.start_render(self.job_row(lease.job_id), lease)

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

    # --- artifacts ----------------------------------------------------------------------------------
    def result_path(self, job: Job) -> str:
        return job.result_path or os.path.join(self.results_dir, f"{job.job_id}.json")

    def follow_with_overlay(self, job: Job) -> None:
        """Start drawing the overlay as the frames are stored (once per job: a resumed job's
        follower simply waits for the frames the new worker stores)."""
        if self.cfg.jobs.render_overlay and job.job_id not in self.renders:
            self.spawn_render(job, None)

    def start_render(self, job: Job, lease: Lease) -> None:
        """The job's frames are all stored: the result file here, on the loop; the overlay's
        follower (or, for a job taken over from a stopped host, a fresh one) ends on its own.
        The job is done when both exist."""
        write_result(self.result_path(job), job, self.ledger)
        if not self.cfg.jobs.render_overlay:
            self.ledger.finish(lease)
        elif job.job_id in self.renders:
            self.renders[job.job_id].lease = lease
        else:
            self.spawn_render(job, lease)

    def spawn_render(self, job: Job, lease: Optional[Lease]) -> None:
        result_path = self.result_path(job)
        try:
            with open_inside(job.video_path, video_roots(self.cfg)) as readable, \
                    open(RuntimeDir(self.cfg.runtime_dir).overlay_stderr, "ab") as log:
                # the renderer reads the very file checked here, through the descriptor it inherits
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pose_common.overlay", self.ledger.path, job.job_id, readable,
                     overlay_path(result_path)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    pass_fds=(int(readable.rsplit("/", 1)[1]),), preexec_fn=behind_the_worker(os.getpid()))
        except PathRefused as exc:
            if lease is not None:
                self.ledger.finish(lease, warning=f"the overlay video could not be rendered: {exc}")
            return
        self.renders[job.job_id] = Render(proc, lease, result_path)

    def check_follower(self, job_id: str, render: "Render") -> None:
        """A follower is only for a job that may still finish here."""
        job = self.ledger.job(job_id)
        if job is None or job.state not in ("queued", "running") or (job.owner not in (None, self.owner)):
            self.drop_render(job_id)

    def drop_render(self, job_id: str) -> None:
        render = self.renders.pop(job_id)
        render.proc.kill()
        render.proc.wait()
        remove(partial_path(render.result_path))

    def reap_renders(self) -> None:
        for job_id, render in list(self.renders.items()):
            code = render.proc.poll()
            if code is None:
                continue
            if render.lease is None:  # ended before the frames were all stored (the job failed, or it
                del self.renders[job_id]  # crashed: the overlay is then drawn whole once they are)
                self.log.info("overlay_follower_exited", job_id=job_id, code=code)
                continue
            if code == 0:
                self.ledger.finish(render.lease, overlay_path=overlay_path(render.result_path))
            else:
                self.ledger.finish(render.lease, warning=f"the overlay video could not be rendered (exit {code})")
            del self.renders[job_id]  # only now: an outage above leaves it to be finished later
            self.log.info("job_done", job_id=job_id, overlay=code == 0)

    def stop_renders(self) -> None:
        for render in self.renders.values():
            render.proc.kill()

    # --- when the worker goes ---------------------------------------------------------------------------
    def requeue_current(self, died: bool = True) -> Optional[str]:
        """The worker stopped or died under the current job: back to the queue (it resumes at the first
        unstored frame), unless deaths have used up its attempts. -> the job id, if there was one."""
        lease, stopping = self.lease, self.job_stop_reason
        self.lease, self.job_stop_reason = None, None
        if lease is None:
            return None
        structlog.contextvars.unbind_contextvars("job_id")
        if stopping:
            return lease.job_id  # not ours to write for any more (cancelled, lost lease, or no ledger)
        job = self.ledger.job(lease.job_id)
        if died and job and job.attempts >= self.cfg.jobs.max_attempts:
            self.ledger.fail(lease.job_id, gave_up(job.attempts, self.ledger.attempt_causes(lease.job_id)), lease)
        else:
            self.ledger.release(lease, charge_attempt=died)
        return lease.job_id

    def cancel(self, job_id: str, now: float) -> None:
        """An operator's cancel: recorded at once; the worker stops the job between two frames and
        the engine stays loaded (see enforce_stops for a worker that does not)."""
        self.ledger.fail(job_id, "cancelled")
        if job_id == self.current:
            self.stop_current("cancelled", now)
        if job_id in self.renders:
            self.drop_render(job_id)  # a cancelled job leaves no partial overlay

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


def resuming_phase(body: P.Warmed) -> dict[str, Any]:
    return {"status": "running", "phase": "resuming", "resume_at": body.start,
            "warm_frames": body.start - body.warm_from, "warm_frames_done": body.index + 1 - body.warm_from}


def gave_up(attempts: int, causes: list[str]) -> str:
    counted = Counter(causes)
    listed = ", ".join(f"{cause} x{count}" for cause, count in counted.most_common())
    return f"gave up after {attempts} attempts" + (f" (the worker died of: {listed})" if listed else "")


def behind_the_worker(parent_pid: int):
    """A Popen preexec_fn for the overlay: dies with the supervisor, and yields the CPU to the worker."""
    arm = parent_death_signal(parent_pid)

    def prepare() -> None:
        arm()
        os.nice(OVERLAY_NICENESS)
    return prepare


@dataclass
class Render:
    proc: subprocess.Popen
    lease: Optional[Lease]  # None while the frames are still being inferred (the job's own lease covers it)
    result_path: str


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

