"""The supervisor: sole writer of the ledger; the worker's life belongs to its WorkerSlot.

One loop (gunicorn-style): signal handlers only enqueue; each tick handles signals, routes
messages, lets the slot make its time-driven moves, dispatches the next job and proves it ticked
(the watchdog file). Every message is checked against its schema first; what does not fit is
dropped and counted. An exception in a tick is logged with its traceback, the workers are stopped,
and the process exits non-zero so that its service manager restarts it and the jobs resume."""
from __future__ import annotations

import os
import queue
import signal
import socket
import time
import uuid
from collections import Counter
from typing import Any, Callable, Optional

import structlog
import zmq

from configs import Config, dump_config, ledger_path, rungs, with_fault
from pose_common import exitcodes, statelock
from pose_common import protocol as P
from pose_common.ledger import LedgerUnavailable, SqlLedger
from pose_common.ledger_open import open_ledger
from pose_common.logs import setup_logging
from pose_common.runtime import RuntimeDir
from supervisor import views
from supervisor.causes import Ending
from supervisor.jobs import JobRunner, PendingImages
from supervisor.liveness import SchedReader, read_schedstat
from supervisor.metrics import Metrics
from supervisor.outage import LedgerKeeper
from supervisor.process import Spawner, kill_stale_worker
from supervisor.reports import death_report, incident_report
from supervisor.requests import RequestHandlers
from supervisor.retention import Retention
from supervisor.slot import WorkerSlot

FRONT, BACK = "front", "back"  # the requests' socket and the worker's
# A tick's wait while an overlay process draws a job's last frames: its end is seen this much later at
# most (at the default tick, up to 100 ms of a short job's few seconds).
FINISHING_TICK_S = 0.01


class ZmqWire:
    """The supervisor's two ROUTER sockets. Nothing here ever blocks the loop but `poll`: a send
    the peer cannot take now (gone, or its queue full) raises zmq.ZMQError at once."""

    BURST = 100  # messages read per socket per tick

    def __init__(self, runtime_dir: str):
        self.ctx = zmq.Context()
        ends = P.endpoints(runtime_dir)
        self.sockets = {FRONT: P.bind_router(self.ctx, ends.gateway), BACK: P.bind_router(self.ctx, ends.worker)}
        self.poller = zmq.Poller()
        for sock in self.sockets.values():
            self.poller.register(sock, zmq.POLLIN)

    def poll(self, timeout_ms: int) -> list[tuple[str, list]]:
        ready = dict(self.poller.poll(timeout_ms))
        received = []
        for channel, sock in self.sockets.items():
            for _ in range(self.BURST if sock in ready else 0):
                try:
                    received.append((channel, sock.recv_multipart(zmq.NOBLOCK, copy=False)))
                except zmq.Again:
                    break
        return received

    def send(self, channel: str, parts: list) -> None:
        self.sockets[channel].send_multipart(parts, flags=zmq.NOBLOCK, copy=False)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.ctx.term()


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, cfg: Config, signal_queue: Optional[queue.SimpleQueue] = None, *,
                 wire: Optional[ZmqWire] = None, clock: Callable[[], float] = time.monotonic,
                 spawner: Optional[Spawner] = None, ledger: Optional[SqlLedger] = None,
                 sched_reader: SchedReader = read_schedstat):
        """The keyword arguments are seams for the model check (tests/test_supervisor_model.py): fake
        sockets, clock, processes and a ledger that fails on demand; production passes none."""
        self.cfg = cfg
        self.clock = clock
        self.log = setup_logging("supervisor", cfg.log_level)
        self.signals = signal_queue or queue.SimpleQueue()
        make_private(cfg.state_dir, cfg.storage_dir)
        self.lock = statelock.hold(os.path.join(cfg.state_dir, "supervisor.lock"), "supervisor")
        self.runtime = RuntimeDir(cfg.runtime_dir)
        self.runtime.prepare()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ledger = ledger or open_ledger(cfg.ledger.url, ledger_path(cfg))
        self.keeper = LedgerKeeper(self.ledger, self.log, self.ledger_lost, clock)
        self.wire = wire or ZmqWire(cfg.runtime_dir)
        spawner = spawner or Spawner(self.runtime, lambda path: dump_config(self.child_config(), path),
                                     cfg.supervisor.keep_generations)
        self.metrics = Metrics()
        self.slot = WorkerSlot(cfg, rungs(cfg), spawner, self, self.next_generation, self.log, clock=clock,
                               metrics=self.metrics, sched_reader=sched_reader)
        self.jobs = JobRunner(cfg, self.ledger, self.slot, self.send_worker, self.log, self.owner)
        self.images = PendingImages(self.reply, self.slot)
        self.requests = RequestHandlers(self)
        self.job_messages: dict[str, Callable[[str, Any, float], None]] = {
            P.T.VIDEO: self.jobs.on_video, P.T.FRAME: self.jobs.on_frame, P.T.WARMED: self.jobs.on_warmed,
            P.T.JOB_DONE: self.jobs.on_done,
            P.T.JOB_FAILED: self.jobs.on_failed}
        self.worker_messages: dict[str, Callable[[P.Envelope, Any, float], None]] = {
            P.T.INCIDENT: self.on_incident, P.T.IMAGE_DONE: self.answer_image}
        self.retention = Retention(self.ledger, self.jobs.results_dir, cfg.jobs.keep_finished_s,
                                   cfg.jobs.keep_max_mb << 20, cfg.jobs.retention_sweep_s, self.log)
        self.dropped: Counter = Counter()
        self.metrics.watch(lambda: views.metric_state(self))
        self.running = True
        self.crash_next_tick = False
        self.local_generation = 0
        self.started_at = time.time()

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self.install_signal_handlers()
        try:
            self.boot()
            while self.running:
                self.tick()
            return 0
        except Exception:
            self.log.exception("supervisor_crashed")
            return exitcodes.EX_EXCEPTION
        finally:
            self.shutdown()

    def tick(self) -> None:
        self.handle_signals()
        if self.crash_next_tick:
            self.crash_next_tick = False
            raise RuntimeError("injected: drill raise at supervisor")
        started = self.clock()
        waited = self.route_messages(timeout_ms=int(self.tick_wait_s() * 1000))
        now = self.clock()
        self.slot.transition(now)
        if self.keeper.outage:
            self.keeper.try_again(now)
        else:
            with self.keeper.guard():
                self.jobs.return_leases()
                self.jobs.dispatch(now)
                self.jobs.keep_leases(now)
                self.jobs.renders.reap()
                self.retention.maybe_sweep()
        self.jobs.enforce_stops(now)
        self.images.expire(now)
        self.prove_alive()
        self.metrics.ticked(self.clock() - started - waited)

    def tick_wait_s(self) -> float:
        """How long a tick waits for messages: shorter while an overlay process draws a job's last frames,
        as nothing but its exit (seen by polling it) then stands between the job and `done`."""
        tick_s = self.cfg.supervisor.tick_s
        return min(FINISHING_TICK_S, tick_s) if self.jobs.renders.finishing() else tick_s

    def install_signal_handlers(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, lambda signum, _frame: self.signals.put_nowait(signum))

    def handle_signals(self) -> None:
        while not self.signals.empty():
            signum = self.signals.get_nowait()
            self.log.info("signal", signal=signal.Signals(signum).name)
            self.running = False

    def prove_alive(self) -> None:
        """The service manager sends systemd's WATCHDOG=1 only while this file keeps being touched."""
        try:
            os.utime(self.runtime.supervisor_tick)
        except FileNotFoundError:
            open(self.runtime.supervisor_tick, "a").close()

    def boot(self) -> None:
        stale = kill_stale_worker(self.runtime.worker_pidfile)
        requeued = 0
        if not self.cfg.ledger.url:
            # one machine, one supervisor (the state-dir lock): what the last one held is free now;
            # on a shared database, leases expire instead
            with self.keeper.guard():
                requeued = self.ledger.requeue_running()
        self.log.info("supervisor_boot", pid=os.getpid(), owner=self.owner, stale_worker_killed=stale,
                      jobs_requeued=requeued, ledger="postgresql" if self.cfg.ledger.url else "sqlite",
                      ladder=[self.slot.rung_label(i) for i in range(len(self.slot.ladder))])

    def shutdown(self) -> None:
        self.log.info("supervisor_shutdown", running_job=self.jobs.current)
        self.slot.stop(5)
        self.jobs.renders.stop_all()
        with self.keeper.guard():
            self.jobs.requeue_current(died=False)  # resumed at its first unstored frame by the next claim
        with self.keeper.guard():
            self.jobs.return_leases()  # what an outage left under our name goes back as charged as it was
        self.wire.close()
        self.ledger.close()
        self.lock.close()

    def child_config(self) -> Config:
        """What the worker and the probe read: the service's config, with a drilled fault armed once."""
        if self.slot.drilled is None:
            return self.cfg
        kind, at = self.slot.drilled
        return with_fault(self.cfg, kind, at, times=1)

    def next_generation(self) -> int:
        """From the ledger (generations never repeat across restarts), or counted here while it is away."""
        try:
            return self.ledger.next_generation()
        except LedgerUnavailable as exc:
            self.keeper.lost(exc)
            self.local_generation = max(self.local_generation, self.slot.generation) + 1
            return self.local_generation

    # --- messages ---------------------------------------------------------------------------------
    def route_messages(self, timeout_ms: int) -> float:
        """-> seconds spent waiting for messages (the rest of a tick is work)."""
        polled = self.clock()
        received = self.wire.poll(timeout_ms)
        waited = self.clock() - polled
        for channel, parts in received:
            self.route(channel, parts)
        return waited

    def route(self, channel: str, parts: list) -> None:
        identity = P.blob_bytes(parts[0])
        from_worker = channel == BACK
        try:
            env = P.unpack(parts[1:])
        except P.ProtocolError as exc:
            return self.drop("undecodable", str(exc))
        allowed = P.WORKER_MESSAGES if from_worker else P.REQUESTS
        if env.type not in allowed:
            self.drop("wrong_socket", f"{env.type[:40]!r} on the {'worker' if from_worker else 'request'} socket")
            if not from_worker:
                self.reply(identity, env, 400, error=f"unknown request type {env.type[:40]!r}")
            return
        try:
            body = P.parse(env)
        except P.ProtocolError as exc:
            self.drop("invalid", str(exc))
            if not from_worker:
                self.reply(identity, env, 400, error=f"malformed {env.type} request: {exc}")
            return
        try:
            if from_worker:
                self.on_worker_message(identity, env, body)
            else:
                self.requests.handle(identity, env, body)
        except LedgerUnavailable as exc:
            self.keeper.lost(exc)
            if not from_worker:
                self.reply(identity, env, 503, error=f"the job ledger is unavailable: {exc}")

    def drop(self, kind: str, reason: str) -> None:
        self.dropped[kind] += 1
        self.log.warning("dropped_message", kind=kind, reason=reason[:300], dropped_total=sum(self.dropped.values()))

    def reply(self, identity: bytes, request: P.Envelope, status: int = 200, /, **body: Any) -> None:
        try:
            self.wire.send(FRONT, [identity, *P.pack(P.reply(request, status, **body))])
        except zmq.ZMQError:
            self.dropped["reply_undeliverable"] += 1  # the requester went away, or is not reading

    def send_worker(self, kind: str, job: Optional[str] = None, blobs: Optional[list] = None,
                    req: Optional[str] = None, **body: Any) -> bool:
        env = P.Envelope(kind, body, gen=self.slot.generation, job=job, req=req, blobs=blobs or [])
        P.parse(env)  # what the worker will check; a body that does not fit is a bug here, not there
        try:
            self.wire.send(BACK, [P.worker_identity(self.slot.generation), *P.pack(env)])
            return True
        except zmq.ZMQError as exc:  # gone, or its queue is full (zmq.Again): never wait for it
            self.log.warning("send_failed", type=kind, generation=self.slot.generation, error=str(exc))
            return False

    # --- from the worker ------------------------------------------------------------------------------
    def on_worker_message(self, identity: bytes, env: P.Envelope, body: P.Body) -> None:
        """Lifecycle messages go to the slot; a job's messages to the job runner, only while it is the
        job on the worker; the rest through `worker_messages`."""
        if not self.slot.accepts_from(identity):
            self.dropped["stale_generation"] += 1
            return
        now = self.clock()
        self.slot.on_message(env.type, body, now)
        if env.type in self.job_messages:
            if self.jobs.owns(env.job):
                self.job_messages[env.type](env.job or "", body, now)
        elif (handler := self.worker_messages.get(env.type)) is not None:
            handler(env, body, now)

    def on_incident(self, env: P.Envelope, body: P.Incident, now: float) -> None:
        self.keeper.record(incident_report(body, self.jobs.current, self.slot.generation, self.slot.rung_label(),
                                           self.slot.rss, self.slot.pids()))

    def answer_image(self, env: P.Envelope, body: P.ImageDone, now: float) -> None:
        self.slot.image_answered(env.req)  # late or not, the worker answered: it is not stuck on it
        identity = self.images.take(env.req)
        if identity is None:
            return
        if body.error:
            self.reply(identity, env, body.code or 400, error=body.error)
            return
        answer = {name: getattr(body, name) for name in body.__struct_fields__ if name not in ("error", "code")}
        self.reply(identity, env, 200, **answer, mesh_faces=self.slot.mesh_faces)

    # --- what the slot tells us --------------------------------------------------------------------------
    def worker_stopped(self, reason: str) -> None:
        self.images.fail_all(f"worker stopped ({reason})")
        with self.keeper.guard():
            self.jobs.requeue_current(died=False)

    def worker_died(self, ending: Ending) -> None:
        job_id = self.jobs.current
        self.images.fail_all(f"worker died: {ending.cause.kind}")
        self.keeper.record(death_report(ending, job_id, self.slot.rss, self.slot.pids()))
        with self.keeper.guard():
            if job_id:
                self.ledger.add_event(job_id, "restart", {"cause": ending.cause.kind, "frame": ending.frame,
                                                          "worker_generation": ending.generation})
            if job_id and ending.frame is not None:
                self.ledger.record_frame_death(job_id, int(ending.frame), ending.cause.kind)
        with self.keeper.guard():
            self.jobs.requeue_current(died=ending.blames_job)

    def ledger_lost(self, reason: str) -> None:
        self.jobs.stop_current(f"the job ledger is unavailable: {reason}", self.clock(), give_back=True)

    def probe_died(self, ending: Ending) -> None:
        self.keeper.record(death_report(ending, None, None, self.slot.pids()))

    def went_fatal(self, reason: str, restart_can_fix: bool) -> None:
        """Going fatal stops starting workers, not accepted jobs: they wait in the queue for the
        periodic retry or a reload. Only a cause no restart can fix (missing weights) fails them."""
        with self.keeper.guard():
            if restart_can_fix:
                self.log.error("jobs_wait_for_revival", queued=self.ledger.queue(),
                               retry_in_s=self.cfg.supervisor.fatal_retry_s)
                return
            failed = self.ledger.give_up_host(self.owner, f"service fatal: {reason}")
            self.log.error("jobs_failed_by_fatal", failed_jobs=failed)



def make_private(*directories: str) -> None:
    """State and storage are the service user's alone (0700), whatever existed before."""
    for directory in directories:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)


def main(cfg: Config) -> int:
    try:
        supervisor = Supervisor(cfg)
    except statelock.StateDirHeld as exc:
        structlog.get_logger().error("state_dir_held", reason=str(exc))
        print(f"pose-service supervisor: {exc}", flush=True)
        return 2
    return supervisor.run()
