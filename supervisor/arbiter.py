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

from configs import Config, dump_config, ledger_path, rungs
from pose_common import exitcodes, statelock
from pose_common import protocol as P
from pose_common.ledger import LedgerUnavailable
from pose_common.ledger_open import open_ledger
from pose_common.logs import setup_logging
from pose_common.runtime import RuntimeDir
from supervisor import views
from supervisor.causes import Ending
from supervisor.jobs import JobRunner, PendingImages
from supervisor.metrics import Metrics
from supervisor.outage import LedgerKeeper
from supervisor.process import Spawner, kill_stale_worker
from supervisor.reports import death_report, incident_report
from supervisor.requests import RequestHandlers
from supervisor.retention import Retention
from supervisor.slot import WorkerSlot


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, cfg: Config, signal_queue: Optional[queue.SimpleQueue] = None):
        self.cfg = cfg
        self.log = setup_logging("supervisor", cfg.log_level)
        self.signals = signal_queue or queue.SimpleQueue()
        make_private(cfg.state_dir, cfg.storage_dir)
        self.lock = statelock.hold(os.path.join(cfg.state_dir, "supervisor.lock"), "supervisor")
        self.runtime = RuntimeDir(cfg.runtime_dir)
        self.runtime.prepare()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ledger = open_ledger(cfg.ledger.url, ledger_path(cfg))
        self.keeper = LedgerKeeper(self.ledger, self.log, self.ledger_lost)
        self.ctx = zmq.Context()
        ends = P.endpoints(cfg.runtime_dir)
        self.front = P.bind_router(self.ctx, ends.gateway)
        self.back = P.bind_router(self.ctx, ends.worker)
        self.poller = zmq.Poller()
        self.poller.register(self.front, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)
        spawner = Spawner(self.runtime, lambda path: dump_config(self.cfg, path), cfg.supervisor.keep_generations)
        self.metrics = Metrics()
        self.slot = WorkerSlot(cfg, rungs(cfg), spawner, self, self.next_generation, self.log, metrics=self.metrics)
        self.jobs = JobRunner(cfg, self.ledger, self.slot, self.send_worker, self.log, self.owner)
        self.images = PendingImages(self.reply)
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
        started = time.monotonic()
        waited = self.route_messages(timeout_ms=int(self.cfg.supervisor.tick_s * 1000))
        now = time.monotonic()
        self.slot.transition(now)
        if self.keeper.outage:
            self.keeper.try_again(now)
        else:
            with self.keeper.guard():
                self.jobs.dispatch(now)
                self.jobs.keep_leases(now)
                self.jobs.reap_renders()
                self.retention.maybe_sweep()
        self.jobs.enforce_stops(now)
        self.images.expire(now)
        self.prove_alive()
        self.metrics.ticked(time.monotonic() - started - waited)

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
        self.jobs.stop_renders()  # a job left `rendering` gets its artifacts at the next boot
        with self.keeper.guard():
            self.jobs.requeue_current(died=False)  # resumed at its first unstored frame by the next claim
        self.front.close()
        self.back.close()
        self.ctx.term()
        self.ledger.close()
        self.lock.close()

    def next_generation(self) -> int:
        """From the ledger (generations never repeat across restarts), or counted here while it is away."""
        try:
            return self.ledger.next_generation()
        except LedgerUnavailable as exc:
            self.keeper.lost(str(exc))
            self.local_generation = max(self.local_generation, self.slot.generation) + 1
            return self.local_generation

    # --- messages ---------------------------------------------------------------------------------
    def route_messages(self, timeout_ms: int) -> float:
        """-> seconds spent waiting for messages (the rest of a tick is work)."""
        polled = time.monotonic()
        ready = self.poller.poll(timeout_ms)
        waited = time.monotonic() - polled
        for sock, _ in ready:
            for _ in range(100):  # bounded burst per socket per tick
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.route(sock, parts)
        return waited

    def route(self, sock: zmq.Socket, parts: list) -> None:
        identity = parts[0].bytes
        try:
            env = P.unpack(parts[1:])
        except P.ProtocolError as exc:
            return self.drop("undecodable", str(exc))
        allowed = P.WORKER_MESSAGES if sock is self.back else P.REQUESTS
        if env.type not in allowed:
            self.drop("wrong_socket", f"{env.type[:40]!r} on the {'worker' if sock is self.back else 'request'} socket")
            if sock is self.front:
                self.reply(identity, env, 400, error=f"unknown request type {env.type[:40]!r}")
            return
        try:
            body = P.parse(env)
        except P.ProtocolError as exc:
            self.drop("invalid", str(exc))
            if sock is self.front:
                self.reply(identity, env, 400, error=f"malformed {env.type} request: {exc}")
            return
        try:
            if sock is self.back:
                self.on_worker_message(identity, env, body)
            else:
                self.requests.handle(identity, env, body)
        except LedgerUnavailable as exc:
            self.keeper.lost(str(exc))
            if sock is self.front:
                self.reply(identity, env, 503, error=f"the job ledger is unavailable: {exc}")

    def drop(self, kind: str, reason: str) -> None:
        self.dropped[kind] += 1
        self.log.warning("dropped_message", kind=kind, reason=reason[:300], dropped_total=sum(self.dropped.values()))

    def reply(self, identity: bytes, request: P.Envelope, status: int = 200, /, **body: Any) -> None:
        try:
            self.front.send_multipart([identity, *P.pack(P.reply(request, status, **body))])
        except zmq.ZMQError:
            self.dropped["reply_undeliverable"] += 1  # the requester went away

    def send_worker(self, kind: str, job: Optional[str] = None, blobs: Optional[list] = None,
                    req: Optional[str] = None, **body: Any) -> bool:
        env = P.Envelope(kind, body, gen=self.slot.generation, job=job, req=req, blobs=blobs or [])
        P.parse(env)  # what the worker will check; a body that does not fit is a bug here, not there
        try:
            self.back.send_multipart([P.worker_identity(self.slot.generation), *P.pack(env)], copy=False)
            return True
        except zmq.ZMQError as exc:
            self.log.warning("send_failed", type=kind, generation=self.slot.generation, error=str(exc))
            return False

    # --- from the worker ------------------------------------------------------------------------------
    def on_worker_message(self, identity: bytes, env: P.Envelope, body: P.Body) -> None:
        """Lifecycle messages go to the slot; a job's messages to the job runner, only while it is the
        job on the worker; the rest through `worker_messages`."""
        if not self.slot.accepts_from(identity):
            self.dropped["stale_generation"] += 1
            return
        now = time.monotonic()
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
            self.jobs.requeue_current()

    def ledger_lost(self, reason: str) -> None:
        self.jobs.stop_current(f"the job ledger is unavailable: {reason}", time.monotonic())

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
            failed = self.ledger.fail_all_active(f"service fatal: {reason}")
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
