"""A job's artifacts, in a room of their own: the result file, and the overlay process that draws
beside the inference.

From a job's first dispatch a side process at a lower CPU priority (never the worker) follows the
ledger and draws each frame as it is stored (pose_common/overlay.py). When the last frame is stored
the job is `rendering`: the result file is written here, on the supervisor's loop, and once the
overlay process has encoded the last frames and exited the job is `done`. A job left `rendering` by
a supervisor that stopped is taken over (ledger.claim_render) and its overlay drawn whole.

While its job's frames are inferred the overlay process is in the kernel's idle scheduling class as
well as at nice OVERLAY_NICENESS, where it can be moved back (`idle_class_can_be_left`): a nice process
still delays the worker's threads each time they wake for a frame, an idle-class one gives way at once
(what the overlay cost a short job's frames fell from 5-7% to 2-4%, bench/RESULTS.md). Once the frames are all
stored it is moved back to the normal class (`lift`), so that nothing else keeping every core busy can
hold the job in `rendering`.

The overlay process is a warm standby where there is one (jobs.overlay_standby): started ahead of
need at the same priority, past its imports, it is handed the job over a Unix socket with the video's
open descriptor, and the next standby starts once that job's frames are all stored (not beside them).
A standby that died, or ended before it said it took the job, leaves the job to an overlay process
started for it, as without one."""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from configs import Config, video_roots
from pose_common.children import parent_death_signal
from pose_common.job_states import IN_QUEUE
from pose_common.ledger import Job, Lease, SqlLedger
from pose_common.overlay import TAKEN, handoff_message, overlay_path, partial_path, remove
from pose_common.paths import PathRefused, open_inside
from pose_common.results import write_result
from pose_common.runtime import RuntimeDir

OVERLAY_NICENESS = 10    # the overlay drawn beside the inference takes only the CPU the worker leaves
TAKEN_OVER_PER_ROUND = 4  # jobs left rendering by a stopped host, taken over a few at a time
# A follower draws a job's last frames within a few tenths of a second of the last one stored (0.04-0.06 s
# in bench.user_wait); the loop watches for its end closely this long, no longer (each tick asks the
# ledger for the next job while the worker is idle).
FINISHING_WINDOW_S = 1.0


@dataclass
class Render:
    proc: subprocess.Popen
    lease: Optional[Lease]  # None while the frames are still being inferred (the job's own lease covers it)
    result_path: str
    handoff: Optional[socket.socket] = None  # a standby's channel: did it take the job before it ended?
    stored_at: Optional[float] = None  # time.monotonic() when a follower's job had all its frames stored


@dataclass
class Standby:
    proc: subprocess.Popen
    channel: socket.socket  # ours; the process holds the other end


class Renders:
    def __init__(self, cfg: Config, ledger: SqlLedger, owner: str, results_dir: str, log):
        self.cfg, self.ledger, self.owner, self.results_dir, self.log = cfg, ledger, owner, results_dir, log
        self.lease_s = cfg.ledger.lease_s
        self.running: dict[str, Render] = {}
        self.standby_wanted = cfg.jobs.render_overlay and cfg.jobs.overlay_standby
        self.standby: Optional[Standby] = None
        self.standby_due = self.standby_wanted  # started at the next reap(), not in the middle of a dispatch
        self.idle_class = idle_class_can_be_left()

    def __contains__(self, job_id: object) -> bool:
        return job_id in self.running

    def result_path(self, job: Job) -> str:
        return job.result_path or os.path.join(self.results_dir, f"{job.job_id}.json")

    # --- from the job runner ---------------------------------------------------------------------------
    def follow(self, job: Job) -> None:
        """Start drawing the overlay as the frames are stored (once per job: a resumed job's
        follower simply waits for the frames the new worker stores)."""
        if self.cfg.jobs.render_overlay and job.job_id not in self.running:
            self.spawn(job, None)

    def start(self, job: Job, lease: Lease) -> None:
        """The job's frames are all stored: the result file now; the overlay's follower (or, for a job
        taken over from a stopped host, a fresh one) ends on its own. The job is done when both exist."""
        write_result(self.result_path(job), job, self.ledger)
        if not self.cfg.jobs.render_overlay:
            self.ledger.finish(lease)
        elif job.job_id in self.running:
            render = self.running[job.job_id]
            render.lease, render.stored_at = lease, time.monotonic()
            self.lift(render)
            self.replace_standby()  # before the next job is dispatched, so that it finds one
        else:
            self.spawn(job, lease)

    def drop(self, job_id: str) -> None:
        """The job will not finish here (cancelled, failed, taken over): no partial overlay is left."""
        render = self.running.get(job_id)
        if render is None:
            return
        self.forget(job_id)
        render.proc.kill()
        render.proc.wait()
        remove(partial_path(render.result_path))

    # --- from the loop ---------------------------------------------------------------------------------
    def keep(self) -> None:
        """Renew the leases of the artifacts we write, let go of followers whose job will not finish
        here, and take over a few jobs a stopped host left half-written."""
        for job_id, render in list(self.running.items()):
            if render.lease is None:
                self.check_follower(job_id)
            elif not self.ledger.renew(render.lease, self.lease_s):
                self.log.warning("render_lease_lost", job_id=job_id)
                self.drop(job_id)
        for _ in range(TAKEN_OVER_PER_ROUND):
            job = self.ledger.claim_render(self.owner, self.lease_s)
            if job is None or job.job_id in self.running:
                break
            self.start(job, job.lease)

    def reap(self) -> None:
        """How each overlay process ended decides how its job finishes."""
        self.replace_standby()
        for job_id, render in list(self.running.items()):
            code = render.proc.poll()
            if code is None or self.redrawn(job_id, render, code):
                continue
            if render.lease is None:  # ended before the frames were all stored (the job failed, or it
                self.forget(job_id)   # crashed: the overlay is then drawn whole once they are)
                self.log.info("overlay_follower_exited", job_id=job_id, code=code)
                continue
            if code == 0:
                self.ledger.finish(render.lease, overlay_path=overlay_path(render.result_path))
            else:
                self.ledger.finish(render.lease, warning=f"the overlay video could not be rendered (exit {code})")
            self.forget(job_id)  # only now: an outage above leaves it to be finished later
            self.log.info("job_done", job_id=job_id, overlay=code == 0)

    def stop_all(self) -> None:
        """Shutdown: a job left `rendering` gets its artifacts at the next boot; no standby is left."""
        for render in self.running.values():
            render.proc.kill()
        self.standby_due = False
        if self.standby is not None:
            dismiss(self.standby)
            self.standby = None

    # --- the overlay process ---------------------------------------------------------------------------
    def spawn(self, job: Job, lease: Optional[Lease], warm: bool = True) -> None:
        """The job's overlay process: the standby where there is one (`warm`), else one of its own."""
        result_path = self.result_path(job)
        try:
            with open_inside(job.video_path, video_roots(self.cfg)) as readable:
                # the renderer reads the very file checked here, through the descriptor it is given
                video_fd = int(readable.rsplit("/", 1)[1])
                render = self.hand_to_standby(job.job_id, video_fd, result_path, lease) \
                    if warm and self.standby_wanted else None
                if render is None:
                    proc = self.start_overlay_process([self.ledger.path, job.job_id, readable,
                                                       overlay_path(result_path)], video_fd)
                    render = Render(proc, lease, result_path)
        except PathRefused as exc:
            if lease is not None:
                self.ledger.finish(lease, warning=f"the overlay video could not be rendered: {exc}")
            return
        self.running[job.job_id] = render
        if lease is not None:
            self.lift(render)

    def lift(self, render: Render) -> None:
        """The job's frames are all stored: its overlay leaves the idle class (at nice OVERLAY_NICENESS still),
        as only it now stands between the job and `done`."""
        if not self.idle_class:
            return
        try:
            to_the_normal_class(render.proc.pid)
        except OSError as exc:  # refused (EPERM) despite idle_class_can_be_left: the loop goes on regardless
            self.log.warning("overlay_left_in_idle_class", pid=render.proc.pid, error=str(exc))

    def start_overlay_process(self, args: list[str], fd: int) -> subprocess.Popen:
        """`python -m pose_common.overlay ARGS`, behind the worker, given the one descriptor `fd`."""
        with open(RuntimeDir(self.cfg.runtime_dir).overlay_stderr, "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "pose_common.overlay", *args],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    pass_fds=(fd,), preexec_fn=behind_the_worker(os.getpid(), self.idle_class))

    def forget(self, job_id: str) -> None:
        render = self.running.pop(job_id)
        if render.handoff is not None:
            render.handoff.close()

    # --- the warm standby ------------------------------------------------------------------------------
    def replace_standby(self) -> None:
        """One standby waits for the next job: started once, then after each one handed a job, once no
        job's frames are being inferred (its start-up would take CPU from a short job's first frames)."""
        if not self.standby_due or self.inferring():
            return
        self.standby_due = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)  # the loop never waits on a standby
        with theirs:
            try:
                proc = self.start_overlay_process(["--standby", str(theirs.fileno())], theirs.fileno())
            except OSError as exc:  # the next job's overlay process is started for it, which tries again
                ours.close()
                self.log.warning("overlay_standby_not_started", error=str(exc))
                return
        self.standby = Standby(proc, ours)

    def finishing(self) -> bool:
        """A follower's job had its frames all stored less than FINISHING_WINDOW_S ago, and it draws the
        last of them: the loop looks for its end sooner than once a tick (the user waits for it). An
        overlay drawn whole for a job taken over is not one: it takes as long as the video."""
        now = time.monotonic()
        return any(render.stored_at is not None and now - render.stored_at < FINISHING_WINDOW_S
                   for render in self.running.values())

    def inferring(self) -> bool:
        """A job's overlay follows frames not all stored yet: being inferred, or (a job requeued after a
        worker's death) waiting to be; the next job then gets an overlay process of its own."""
        return any(render.lease is None for render in self.running.values())

    def hand_to_standby(self, job_id: str, video_fd: int, result_path: str,
                        lease: Optional[Lease]) -> Optional[Render]:
        """-> the job's Render, drawn by the standby; None where there is no standby alive to take it.
        A standby still importing takes the job once it is ready: the job waits in its socket."""
        standby, self.standby, self.standby_due = self.standby, None, True
        if standby is None:
            return None
        message = handoff_message(self.ledger.path, job_id, overlay_path(result_path))
        if standby.proc.poll() is None and sent(standby.channel, message, video_fd):
            return Render(standby.proc, lease, result_path, handoff=standby.channel)
        self.log.warning("overlay_standby_lost", job_id=job_id, code=standby.proc.poll())
        dismiss(standby)
        return None

    def redrawn(self, job_id: str, render: Render, code: int) -> bool:
        """A standby that ended before it took the job (killed, or never came up): the job gets an
        overlay process of its own, so no job loses its overlay to a standby. -> whether it did."""
        if render.handoff is None:
            return False
        if taken(render.handoff):  # its exit status is the job's, now and at every later reap
            render.handoff.close()
            render.handoff = None
            return False
        job = self.ledger.job(job_id)
        if job is None:
            return False
        self.log.warning("overlay_standby_lost", job_id=job_id, code=code)
        self.forget(job_id)
        self.spawn(job, render.lease, warm=False)
        return True

    def check_follower(self, job_id: str) -> None:
        """A follower is only for a job that may still finish here."""
        job = self.ledger.job(job_id)
        if job is None or job.state not in IN_QUEUE or job.owner not in (None, self.owner):
            self.drop(job_id)


def sent(channel: socket.socket, message: bytes, fd: int) -> bool:
    try:
        socket.send_fds(channel, [message], [fd])
        return True
    except OSError:  # the standby died after it was last seen alive
        return False


def taken(channel: socket.socket) -> bool:
    """Once the standby has ended: did it say it took the job? (Its end is closed: no wait here.)"""
    try:
        return channel.recv(len(TAKEN)) == TAKEN
    except OSError:
        return False


def dismiss(standby: Standby) -> None:
    standby.proc.kill()
    standby.proc.wait()
    standby.channel.close()


def behind_the_worker(parent_pid: int, idle_class: bool):
    """A Popen preexec_fn for the overlay: dies with the supervisor, and yields the CPU to the worker (at nice
    OVERLAY_NICENESS, and in the idle class with `idle_class`)."""
    arm = parent_death_signal(parent_pid)

    def prepare() -> None:
        arm()
        os.nice(OVERLAY_NICENESS)
        if idle_class:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return prepare


def to_the_normal_class(pid: int, rounds: int = 3) -> None:
    """Every thread of process `pid` into the normal class, its niceness kept. The class is a thread's, not the
    process's: a drawing overlay has nine threads (the decoder's, OpenCV's), each made in the idle class.
    Looked at again for threads made meanwhile by one not yet moved; one that has ended is passed over
    (as is a process that has: it is not reaped yet, so its pid is still its own)."""
    moved: set[int] = set()
    for _ in range(rounds):
        try:
            threads = {int(tid) for tid in os.listdir(f"/proc/{pid}/task")} - moved
        except FileNotFoundError:
            return
        if not threads:
            return
        for tid in sorted(threads):
            try:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except ProcessLookupError:
                pass
        moved |= threads


def idle_class_can_be_left(euid: Optional[int] = None, nice_limit: Optional[int] = None) -> bool:
    """Whether an overlay process (this one's child, of its user and limits) put in the idle class may be
    moved back to the normal class at nice OVERLAY_NICENESS: Linux allows that to root, or where RLIMIT_NICE
    lets a process lower its niceness to that value (20 - niceness <= the limit; the system units set
    LimitNICE=+10). Without it the overlay is never put there: left in the idle class for good, it would wait
    while anything else keeps every core busy, its job `rendering`."""
    euid = os.geteuid() if euid is None else euid
    nice_limit = resource.getrlimit(resource.RLIMIT_NICE)[0] if nice_limit is None else nice_limit
    return euid == 0 or nice_limit == resource.RLIM_INFINITY or nice_limit >= 20 - OVERLAY_NICENESS
