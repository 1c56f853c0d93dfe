"""A whole supervisor on a fake world, for the model check (tests/test_supervisor_model.py) and its
regressions (tests/test_supervisor_regressions.py): the real `Supervisor`, `JobRunner`, `WorkerSlot`,
`ChildProcess` and SQLite ledger, with fake sockets (every message packed and parsed as on the wire),
fake worker processes that speak the real protocol, a fake clock, and a ledger that fails on demand.

A supervisor restart is the real thing too: the old one is dropped without a word (its workers die
with it), the ledger is reopened from disk and a fresh supervisor boots on it."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import zmq

from pose_common import exitcodes
from pose_common import protocol as P
from pose_common.ledger import Ledger, LedgerUnavailable
from supervisor import arbiter
from supervisor.process import ChildProcess

FRAMES = 4                # every fake video has this many frames
OTHER_HOST = "other-host:1:abcdef"
WRITES = frozenset({"accept", "claim", "claim_render", "renew", "release", "requeue_running", "set_video_meta",
                    "set_engine_meta", "mark_rendering", "finish", "fail", "fail_all_active", "mark_removed",
                    "add_frame", "add_event", "record_frame_death", "add_crash", "put_blob", "next_generation",
                    "ping"})


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- the ledger that fails -------------------------------------------------------------------------
class FaultyLedger:
    """The real SQLite ledger; `down` makes every call fail (an outage), `fail_writes` the next N
    writes (a disk full, a database locked), each before it reaches the database."""

    def __init__(self, real: Ledger):
        self.real = real
        self.down = False
        self.fail_writes = 0
        self.stored: Counter = Counter()   # (job, frame) -> times add_frame said "stored"

    @property
    def path(self) -> str:
        return self.real.path

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise LedgerUnavailable("injected: the database is unreachable")
            if name in WRITES and self.fail_writes:
                self.fail_writes -= 1
                raise LedgerUnavailable("injected: database or disk is full")
            result = attr(*args, **kwargs)
            if name == "add_frame" and result is True:
                self.stored[(args[0].job_id, args[1])] += 1
            return result
        return call


# --- worker processes --------------------------------------------------------------------------------
class FakePopen:
    """A child as the OS shows it. SIGKILL ends it at once unless it sleeps uninterruptibly in a
    driver; SIGTERM and SIGABRT are acted on when the test says (`obey`)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: Optional[int] = None
        self.signals: list[int] = []
        self.uninterruptible = False

    def poll(self) -> Optional[int]:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        self.signals.append(sig)
        if sig == signal.SIGKILL and not self.uninterruptible:
            self.returncode = -signal.SIGKILL

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: Optional[float] = None) -> int:
        self.obey()
        if self.returncode is None:
            raise subprocess.TimeoutExpired("worker", timeout or 0)
        return self.returncode

    def obey(self) -> None:
        """What a process does with the signals it got (nothing, while in uninterruptible sleep)."""
        if self.returncode is not None or self.uninterruptible or not self.signals:
            return
        if signal.SIGKILL in self.signals:
            self.returncode = -signal.SIGKILL
        elif signal.SIGABRT in self.signals:
            self.returncode = -signal.SIGABRT
        else:
            self.returncode = 0

    def end(self, code: int) -> None:
        if self.returncode is None and not self.uninterruptible:
            self.returncode = code


@dataclass
class RunningJob:
    job_id: str
    start: int
    warm_from: Optional[int]
    script: list[tuple[str, dict]] = field(default_factory=list)


class FakeWorker:
    """A worker process that speaks the protocol: what the supervisor sent it is parsed as the
    worker parses it; `next_message` is what an honest worker would say next."""

    def __init__(self, generation: int, popen: FakePopen):
        self.generation, self.popen = generation, popen
        self.inbox: list[tuple[P.Envelope, P.Body]] = []
        self.job: Optional[RunningJob] = None
        self.images: list[str] = []
        self.said_hello = self.said_ready = False

    @property
    def alive(self) -> bool:
        return self.popen.returncode is None

    def read_inbox(self) -> None:
        for env, body in self.inbox:
            if isinstance(body, P.RunJob) and env.job:
                self.job = RunningJob(env.job, body.start_frame, body.warm_from, script_for(env.job, body))
            elif isinstance(body, P.StopJob) and self.job and env.job == self.job.job_id:
                self.job.script = [(P.T.JOB_FAILED, {"reason": "cancelled"})]
            elif isinstance(body, P.RunImage) and env.req:
                self.images.append(env.req)
        self.inbox.clear()

    def next_message(self) -> Optional[P.Envelope]:
        self.read_inbox()
        if not self.said_hello:
            self.said_hello = True
            return self.envelope(P.T.HELLO, {"pid": self.popen.pid})
        if not self.said_ready:
            self.said_ready = True
            return self.envelope(P.T.READY, {"engine": {"name": "noop", "device": "cpu"}, "stages": ["model"]})
        if self.images:
            return self.envelope(P.T.IMAGE_DONE, {"persons": [], "width": 4, "height": 4}, req=self.images.pop(0))
        if self.job is not None:
            kind, body = self.job.script.pop(0)
            job_id = self.job.job_id
            if not self.job.script:
                self.job = None
            return self.envelope(kind, body, job=job_id)
        return None

    def envelope(self, kind: str, body: dict, job: Optional[str] = None, req: Optional[str] = None) -> P.Envelope:
        return P.Envelope(kind, body, gen=self.generation, job=job, req=req)


def script_for(job_id: str, run: P.RunJob) -> list[tuple[str, dict]]:
    """What an honest worker sends for a RUN_JOB: the video, the warm-up frames of a resumed job,
    the frames from the resume point, then done."""
    meta = {"fps": 10.0, "frame_count": FRAMES, "width": 4, "height": 4, "duration_s": FRAMES / 10, "rotation": 0,
            "codec": "h264"}
    script: list[tuple[str, dict]] = [(P.T.VIDEO, {"meta": meta})]
    if run.start_frame >= FRAMES:  # as gpu_worker/main.py: nothing at or after the start is a failed job
        return [(P.T.JOB_FAILED, {"reason": f"no frame at or after {run.start_frame}"})]
    if run.warm_from is not None:
        script += [(P.T.WARMED, {"index": i, "warm_from": run.warm_from, "start": run.start_frame})
                   for i in range(run.warm_from, run.start_frame)]
    script += [(P.T.FRAME, {"index": i, "pts": i / 10, "persons": []}) for i in range(run.start_frame, FRAMES)]
    return [*script, (P.T.JOB_DONE, {"frames_decoded": FRAMES})]


class FakeSpawner:
    def __init__(self, world: "World"):
        self.world = world

    def worker(self, generation: int, rung: dict) -> ChildProcess:
        world = self.world
        popen = FakePopen(20_000 + len(world.workers))
        world.workers.append(FakeWorker(generation, popen))
        path = os.path.join(world.directory, f"worker-{generation}.stderr")
        open(path, "w").close()
        return ChildProcess(popen, path, f"worker-{generation}", clock=world.clock)  # type: ignore[arg-type]

    def probe(self, rung: dict, tag: str):
        raise AssertionError("the model runs with probe.enabled=false")

    def crumb(self, generation: int) -> dict:
        return {}


# --- the sockets ----------------------------------------------------------------------------------------
class FakeWire:
    """Both ROUTER sockets: messages in are queued for the next tick; a send to the worker reaches
    its inbox (parsed as the worker parses it) or fails as ROUTER_MANDATORY + NOBLOCK fail: peer
    gone (EHOSTUNREACH) or queue full (EAGAIN). Replies are kept by request id."""

    def __init__(self, world: "World"):
        self.world = world
        self.incoming: list[tuple[str, list]] = []
        self.replies: dict[str, P.Envelope] = {}
        self.refuse_next: Optional[str] = None  # "unreachable" | "would_block"
        self.sent: list[P.Envelope] = []

    def poll(self, timeout_ms: int) -> list[tuple[str, list]]:
        received, self.incoming = self.incoming, []
        return received

    def send(self, channel: str, parts: list) -> None:
        identity, env = bytes(parts[0]), P.unpack(parts[1:])
        if channel == arbiter.FRONT:
            self.replies[env.req or ""] = env
            return
        if self.refuse_next:
            refused, self.refuse_next = self.refuse_next, None
            raise zmq.Again() if refused == "would_block" else zmq.ZMQError(errno.EHOSTUNREACH)
        worker = self.world.worker_of(P.generation_of(identity))
        if worker is None or not worker.alive or not worker.said_hello:
            raise zmq.ZMQError(errno.EHOSTUNREACH)
        assert env.type in P.TO_WORKER
        worker.inbox.append((env, P.parse(env)))
        self.sent.append(env)

    def close(self) -> None:
        pass


# --- the world ---------------------------------------------------------------------------------------------
class World:
    """One supervisor (restartable) and everything around it."""

    def __init__(self, overrides: tuple[str, ...] = ()):
        from configs import load_config

        self.directory = tempfile.mkdtemp(prefix="supervisor-model-")
        self.videos = os.path.join(self.directory, "videos")
        os.makedirs(self.videos)
        self.video = os.path.join(self.videos, "clip.mp4")
        open(self.video, "wb").close()
        self.cfg = load_config(["engine.name=noop", "probe.enabled=false", f"state_dir={self.directory}/state",
                                f"jobs.allowed_roots=[{self.videos}]", "jobs.render_overlay=false",
                                "jobs.max_attempts=3", "jobs.retention_sweep_s=0", "supervisor.fatal_retry_s=10",
                                "supervisor.backoff_max_s=4", "supervisor.intensity=100", *overrides])
        self.clock = Clock(1000.0)
        self.workers: list[FakeWorker] = []
        self.wire = FakeWire(self)
        self.deaths: list[tuple[Optional[str], str, bool]] = []    # (job on the worker, cause, blamed)
        self.crash_charges: Counter = Counter()  # job -> supervisor crashes (or lost leases) under it
        self.requests = 0
        self.sup = self.boot()

    def close(self) -> None:
        self.drop_supervisor()

    # --- the supervisor's life --------------------------------------------------------------------
    def boot(self) -> arbiter.Supervisor:
        world = self
        from configs import ledger_path

        class Observed(arbiter.Supervisor):
            def worker_died(self, ending):  # what the model needs to know about each death, then the real thing
                world.deaths.append((self.jobs.current, ending.cause.kind, ending.blames_job))
                super().worker_died(ending)

        self.ledger = FaultyLedger(Ledger(ledger_path(self.cfg)))
        sup = Observed(self.cfg, wire=self.wire, clock=self.clock, spawner=FakeSpawner(self),  # type: ignore[arg-type]
                       ledger=self.ledger, sched_reader=lambda pid: None)  # type: ignore[arg-type]
        sup.boot()
        return sup

    def drop_supervisor(self) -> None:
        sup = self.sup
        for worker in self.workers:  # PR_SET_PDEATHSIG: the workers die with their supervisor
            if worker.alive:
                worker.popen.returncode = exitcodes.EX_ORPHANED
        sup.lock.close()
        sup.ledger.real.close()

    def crash(self) -> None:
        """The supervisor dies at this very step (kill -9, an exception the catch-all could not finish)."""
        with self.ledger.real.transaction():
            for (job_id,) in self.ledger.real.all("SELECT job_id FROM jobs WHERE state='running' AND owner=?",
                                                  (self.sup.owner,)):
                self.crash_charges[job_id] += 1  # boot's requeue keeps the attempt: the worker died with it
        self.drop_supervisor()
        self.wire.incoming.clear()
        self.wire.refuse_next = None
        self.sup = self.boot()

    def stop_gracefully(self) -> None:
        self.sup.shutdown()
        self.sup.lock.close()
        self.sup = self.boot()

    # --- the wire ----------------------------------------------------------------------------------
    def worker_of(self, generation: Optional[int]) -> Optional[FakeWorker]:
        return next((w for w in self.workers if w.generation == generation), None)

    @property
    def worker(self) -> Optional[FakeWorker]:
        """The live worker the supervisor started last."""
        return next((w for w in reversed(self.workers) if w.alive), None)

    def from_worker(self, worker: FakeWorker, env: P.Envelope) -> None:
        self.wire.incoming.append((arbiter.BACK, [P.worker_identity(worker.generation), *P.pack(env)]))

    def request(self, kind: str, body: dict, blobs: Optional[list] = None) -> str:
        self.requests += 1
        req = f"r{self.requests}"
        env = P.Envelope(kind, body, req=req, blobs=blobs or [])
        self.wire.incoming.append((arbiter.FRONT, [b"gateway", *P.pack(env)]))
        return req

    def ask(self, kind: str, body: Optional[dict] = None, blobs: Optional[list] = None) -> P.Envelope:
        req = self.request(kind, body or {}, blobs)
        self.tick()
        return self.wire.replies.pop(req)

    def tick(self, dt: float = 0.0) -> None:
        self.clock.t += dt
        self.sup.tick()

    # --- a healthy world ---------------------------------------------------------------------------------
    def heal(self) -> None:
        self.ledger.down, self.ledger.fail_writes, self.wire.refuse_next = False, 0, None
        for worker in self.workers:
            worker.popen.uninterruptible = False
            worker.popen.obey()

    def cooperate(self) -> None:
        """One beat of a healthy world: asked processes end, the worker says what comes next."""
        for worker in self.workers:
            worker.popen.obey()
        worker = self.worker
        if worker is not None:
            self.from_worker(worker, worker.envelope(P.T.HEARTBEAT, {"rss": 1}))
            message = worker.next_message()
            if message is not None:
                self.from_worker(worker, message)
        self.tick(1.0)

    def job(self, job_id: str):
        return self.ledger.real.job(job_id)

    def submit(self) -> Optional[str]:
        answer = self.ask(P.T.SUBMIT, {"video_path": self.video})
        return answer.body["job"]["job_id"] if answer.status == 202 else None

    def run_until(self, done, steps: int = 300) -> None:
        for _ in range(steps):
            if done():
                return
            self.cooperate()
        raise AssertionError("the world did not get there")


# --- the model check ---------------------------------------------------------------------------------------
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

from supervisor.states import WorkerState as S  # noqa: E402

EXAMPLES = int(os.environ.get("POSE_SUPERVISOR_MODEL_EXAMPLES", "40"))
STEPS = int(os.environ.get("POSE_SUPERVISOR_MODEL_STEPS", "40"))
SETTLE_TICKS = 400
EXIT_CODES = [0, -signal.SIGSEGV, -signal.SIGKILL, -signal.SIGABRT, 255, exitcodes.EX_EXCEPTION,
              exitcodes.EX_CUDA_OOM, exitcodes.EX_CUDA_STICKY, 1]
OUT_OF_TURN = [P.T.HELLO, P.T.READY, P.T.STAGE, P.T.FRAME, P.T.WARMED, P.T.JOB_DONE, P.T.JOB_FAILED, P.T.DYING,
               P.T.IMAGE_DONE, P.T.VIDEO]


def out_of_turn(kind: str, worker: FakeWorker, job: Optional[str], index: int) -> P.Envelope:
    """A well-formed message of `kind` that does not fit what the supervisor expects now: a lifecycle
    message in the wrong state, or a job message for a job that is not (or no longer) the worker's."""
    meta = {"fps": 10.0, "frame_count": FRAMES, "width": 4, "height": 4, "duration_s": 0.4, "rotation": 0,
            "codec": "h264"}
    bodies: dict[str, dict] = {
        P.T.HELLO: {"pid": worker.popen.pid}, P.T.READY: {"engine": {"name": "noop"}},
        P.T.STAGE: {"name": "model", "event": "start"}, P.T.FRAME: {"index": index, "persons": []},
        P.T.WARMED: {"index": index, "warm_from": 0, "start": FRAMES}, P.T.JOB_DONE: {"frames_decoded": FRAMES},
        P.T.JOB_FAILED: {"reason": "stale"}, P.T.DYING: {"cause": "python_exception", "stage": "frame", "frame": index},
        P.T.IMAGE_DONE: {"persons": []}, P.T.VIDEO: {"meta": meta}}
    return worker.envelope(kind, bodies[kind], job=job, req="nobody" if kind == P.T.IMAGE_DONE else None)


class SupervisorModel(RuleBasedStateMachine):
    """Rules: every request, every worker message in every state, every exit, failed and refused sends,
    ledger failures and outages, lease takeovers, reloads, a SIGKILL-proof worker, clock jumps, and
    supervisor crashes and restarts at any step. Invariants after each step; at the end the world is
    healed and must bring every accepted job to an end."""

    @initialize(jobs=st.integers(0, 2))
    def start(self, jobs):
        self.world = World(("supervisor.unkillable_after_s=20", "deadlines.image_s=15"))
        self.accepted: list[str] = []   # in the order accepted (ids are random: never sample them sorted)
        self.cancelled: set[str] = set()
        self.images: set[str] = set()   # requests waiting for an answer from this supervisor
        self.world.run_until(lambda: self.sup.slot.ready)
        for _ in range(jobs):
            self.submit()

    def teardown(self):
        if not hasattr(self, "world"):
            return
        try:
            self.settle()
        finally:
            self.world.close()

    @property
    def sup(self):
        return self.world.sup

    # --- the gateway ------------------------------------------------------------------------------
    @rule()
    def submit(self):
        job_id = self.world.submit()
        if job_id and job_id not in self.accepted:
            self.accepted.append(job_id)

    @rule(what=st.sampled_from(["cancel", "image", "reload", "health"]), data=st.data())
    def operator(self, what, data):
        world = self.world
        if what == "cancel" and self.accepted:
            job_id = self.accepted[data.draw(st.integers(0, len(self.accepted) - 1))]
            finished = world.job(job_id).state in ("done", "error")
            if world.ask(P.T.CANCEL, {"job_id": job_id}).status == 200 and not finished:
                self.cancelled.add(job_id)
        elif what == "image":
            req = world.request(P.T.IMAGE, {}, blobs=[b"not really a jpeg"])
            world.tick()
            if req not in world.wire.replies:
                self.images.add(req)
        elif what == "reload":
            assert world.ask(P.T.RELOAD).status == 200
        else:  # the loop answers health whatever else is going on
            answer = world.ask(P.T.HEALTH)
            assert answer.status == 200 and answer.body["health"]["status"]

    # --- the worker -------------------------------------------------------------------------------------
    @precondition(lambda self: self.world.worker is not None)
    @rule(beats=st.integers(1, 8))
    def worker_goes_on(self, beats):
        """The live worker says what an honest worker says next (hello, ready, image answers, the job's
        video, warm-up frames, frames, done), with heartbeats."""
        for _ in range(beats):
            worker = self.world.worker
            if worker is None:
                return
            self.world.from_worker(worker, worker.envelope(P.T.HEARTBEAT, {"rss": 1}))
            message = worker.next_message()
            if message is not None:
                self.world.from_worker(worker, message)
            self.world.tick(0.2)

    @precondition(lambda self: self.world.worker is not None)
    @rule(kind=st.sampled_from(OUT_OF_TURN), own_job=st.booleans(), index=st.integers(0, FRAMES - 1),
          earlier=st.booleans())
    def worker_says_out_of_turn(self, kind, own_job, index, earlier):
        """Every message in every state: from the live worker, or from an earlier generation."""
        worker = self.world.worker
        if earlier and len(self.world.workers) > 1:
            worker, own_job = self.world.workers[-2], False
        job = worker.job.job_id if own_job and worker.job else "0000stalejob0000"
        if kind in (P.T.JOB_DONE, P.T.JOB_FAILED, P.T.VIDEO):
            job = "0000stalejob0000"  # the worker's verdict on its own job comes only in its turn
        if kind == P.T.FRAME and own_job and worker.job:
            if index not in self.world.ledger.real.stored_indices(worker.job.job_id):
                job = "0000stalejob0000"  # a repeat of a stored frame only (recomputed after a resume)
        self.world.from_worker(worker, out_of_turn(kind, worker, job, index))
        self.world.tick()

    @rule(code=st.sampled_from([None, *EXIT_CODES]))
    def worker_ends(self, code):
        """None: every process does what its signals ask; else the live worker exits with `code`."""
        if code is None:
            for worker in self.world.workers:
                worker.popen.obey()
        elif self.world.worker is not None:
            self.world.worker.popen.end(code)
        self.world.tick()

    # --- faults ---------------------------------------------------------------------------------------------
    @rule(fault=st.sampled_from(["send_unreachable", "send_would_block", "write_fails", "writes_fail",
                                 "ledger_away", "ledger_back", "uninterruptible", "driver_lets_go",
                                 "lease_taken_over"]))
    def fault(self, fault):
        world = self.world
        if fault.startswith("send_"):
            world.wire.refuse_next = fault[len("send_"):]
        elif fault in ("write_fails", "writes_fail"):
            world.ledger.fail_writes = 1 if fault == "write_fails" else 3
        elif fault in ("ledger_away", "ledger_back"):
            world.ledger.down = fault == "ledger_away"
        elif fault == "uninterruptible" and world.worker is not None:
            world.worker.popen.uninterruptible = True
        elif fault == "driver_lets_go":
            for worker in world.workers:
                worker.popen.uninterruptible = False
                if signal.SIGKILL in worker.popen.signals:
                    worker.popen.end(-signal.SIGKILL)
        elif fault == "lease_taken_over" and self.sup.jobs.current and not world.ledger.down:
            # another host took the job, and went away itself (its lease expired too): the attempt that
            # lost its lease is spent, as a host's death spends it
            world.ledger.real.exec("UPDATE jobs SET owner=?, lease_gen=lease_gen+1, lease_until=0 WHERE job_id=?",
                                   (OTHER_HOST, self.sup.jobs.current))
            world.crash_charges[self.sup.jobs.current] += 1
        world.tick()

    # --- time and the supervisor itself -------------------------------------------------------------------
    @rule(dt=st.sampled_from([0.1, 1.0, 3.5, 11.0, 21.0, 31.0, 65.0, 400.0]))
    def time_passes(self, dt):
        self.world.tick(dt)

    @rule(graceful=st.booleans())
    def supervisor_restarts(self, graceful):
        """A crash at this very step (the workers die with it), or a graceful stop; then a fresh boot."""
        if graceful and not (self.world.ledger.down or self.world.ledger.fail_writes):
            self.world.stop_gracefully()
        else:
            self.world.crash()
        self.images.clear()  # their callers' connections went with the supervisor

    # --- what must always hold ----------------------------------------------------------------------------
    @invariant()
    def no_frame_stored_twice(self):
        if hasattr(self, "world"):
            twice = [key for key, times in self.world.ledger.stored.items() if times > 1]
            assert not twice, f"stored twice: {twice}"

    @invariant()
    def attempts_are_charged_only_for_deaths(self):
        if not hasattr(self, "world"):
            return
        for job_id in self.accepted:
            job = self.world.job(job_id)
            deaths = sum(1 for on, _, _ in self.world.deaths if on == job_id) + self.world.crash_charges[job_id]
            running = 0 if job.state == "queued" else 1  # the attempt under way, or the one that ended it
            assert job.attempts <= deaths + running, \
                f"{job_id} ({job.state}) charged {job.attempts} attempts for {deaths} deaths"

    @invariant()
    def every_running_job_has_a_way_on(self):
        if not hasattr(self, "world"):
            return
        sup = self.sup
        for job_id in self.accepted:
            job = self.world.job(job_id)
            if job.state not in ("running", "rendering") or job.owner != sup.owner:
                continue
            assert (job_id == sup.jobs.current or job_id in sup.jobs.unreturned or job_id in sup.jobs.renders
                    or job_id in getattr(sup.jobs, "unfinished", {})), \
                f"{job_id} is {job.state} under our lease with nobody working on it"

    @invariant()
    def a_job_on_the_worker_is_timed(self):
        if not hasattr(self, "world"):
            return
        sup = self.sup
        if sup.jobs.current is not None and not sup.jobs.job_stop_reason:
            assert sup.slot.state in (S.BUSY, S.DRAINING, S.EXITED, S.BACKOFF, S.FATAL), \
                f"job {sup.jobs.current} on a {sup.slot.state.value} worker: no frame deadline"
        if sup.slot.state is S.BUSY:
            assert sup.jobs.current is not None, "busy with no job"

    # --- the end: heal the world and let it finish ---------------------------------------------------------
    def settle(self):
        world = self.world
        world.heal()
        for _ in range(SETTLE_TICKS):
            if self.all_settled():
                break
            world.cooperate()
        unsettled = {j: (world.job(j).state, world.job(j).error) for j in self.accepted
                     if world.job(j).state not in ("done", "error")}
        assert not unsettled, f"jobs that never ended: {unsettled} (worker {self.sup.slot.life.label()})"
        assert not (self.images - set(world.wire.replies)), "image requests never answered"
        for job_id in self.accepted:
            self.check_ending(job_id)

    def all_settled(self) -> bool:
        return all(self.world.job(j).state in ("done", "error") for j in self.accepted) and \
            not (self.images - set(self.world.wire.replies))

    def check_ending(self, job_id: str) -> None:
        world, job = self.world, self.world.job(job_id)
        if job_id in self.cancelled:
            assert job.state == "error" and job.error == "cancelled", (job.state, job.error)
            return
        stored = world.ledger.real.stored_indices(job_id) if job.removed_at is None else set()
        if job.state == "error":
            assert stored != set(range(FRAMES)), f"every frame stored, yet {job_id} failed: {job.error}"
            causes = {cause for on, cause, _ in world.deaths if on == job_id}
            assert (job.error or "").startswith("gave up after"), f"{job_id} failed for no reason we know: {job.error}"
            named = (job.error or "").split("died of: ")[-1]
            assert any(cause in named for cause in causes), f"{job.error!r} names none of {causes}"


TestSupervisorModel = SupervisorModel.TestCase
TestSupervisorModel.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                                        derandomize=True, database=None,
                                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_the_world_runs_a_job_to_done():
    world = World()
    try:
        job_id = world.submit()
        assert job_id
        world.run_until(lambda: world.job(job_id).state == "done")
        assert world.job(job_id).attempts == 1
    finally:
        world.close()
