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
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import structlog
import zmq

from configs import dump_config, ledger_path, rungs, video_roots
from pose_common import exitcodes, faults, statelock
from pose_common import protocol as P
from pose_common.hostinfo import gpu_facts, host_facts, package_versions
from pose_common.ledger import LedgerUnavailable
from pose_common.ledger_open import open_ledger
from pose_common.logs import setup_logging
from pose_common.paths import PathRefused, resolve_inside
from pose_common.runtime import RuntimeDir
from supervisor.jobs import JobRunner, PendingImages
from supervisor.metrics import Metrics
from supervisor.process import Spawner, kill_stale_worker
from supervisor.reports import death_report, incident_report
from supervisor.retention import Retention
from supervisor.slot import Ending, WorkerSlot

JOB_MESSAGES = frozenset({P.T.VIDEO, P.T.FRAME, P.T.JOB_DONE, P.T.JOB_FAILED})


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, cfg, signal_queue: Optional[queue.SimpleQueue] = None):
        self.cfg = cfg
        self.log = setup_logging("supervisor", cfg.log_level)
        self.signals = signal_queue or queue.SimpleQueue()
        make_private(cfg.state_dir, cfg.storage_dir)
        self.lock = statelock.hold(os.path.join(cfg.state_dir, "supervisor.lock"), "supervisor")
        self.runtime = RuntimeDir(cfg.runtime_dir)
        self.runtime.prepare()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ledger = open_ledger(cfg.ledger.url, ledger_path(cfg))
        self.outage: Optional[Outage] = None
        self.unwritten_reports: deque = deque(maxlen=100)
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
        self.retention = Retention(self.ledger, self.jobs.results_dir, cfg.jobs.keep_finished_s,
                                   cfg.jobs.keep_max_mb << 20, cfg.jobs.retention_sweep_s, self.log)
        self.dropped: Counter = Counter()
        self.metrics.watch(self.metric_state)
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
        if self.outage:
            self.try_ledger(now)
        else:
            with self.ledger_guard():
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
            with self.ledger_guard():
                requeued = self.ledger.requeue_running()
        self.log.info("supervisor_boot", pid=os.getpid(), owner=self.owner, stale_worker_killed=stale,
                      jobs_requeued=requeued, ledger="postgresql" if self.cfg.ledger.url else "sqlite",
                      ladder=[self.slot.rung_label(i) for i in range(len(self.slot.ladder))])

    def shutdown(self) -> None:
        self.log.info("supervisor_shutdown", running_job=self.jobs.current)
        self.slot.stop(5)
        self.jobs.stop_renders()  # a job left `rendering` gets its artifacts at the next boot
        with self.ledger_guard():
            self.jobs.requeue_current()  # resumed at its first unstored frame by the next claim
        self.front.close()
        self.back.close()
        self.ctx.term()
        self.ledger.close()
        self.lock.close()

    # --- the ledger going away ------------------------------------------------------------------
    @contextmanager
    def ledger_guard(self):
        try:
            yield
        except LedgerUnavailable as exc:
            self.ledger_lost(str(exc))

    def ledger_lost(self, reason: str) -> None:
        if self.outage is not None:
            return
        now = time.monotonic()
        self.outage = Outage(reason, now, now + 1.0)
        self.log.error("ledger_unavailable", reason=reason)
        self.jobs.stop_current(f"the job ledger is unavailable: {reason}", now)

    def try_ledger(self, now: float) -> None:
        """Keep the worker loaded; reconnect with backoff; resume claiming and writing when back."""
        outage = self.outage
        if now < outage.next_try:
            return
        try:
            self.ledger.ping()
        except LedgerUnavailable as exc:
            outage.reason, outage.delay = str(exc), min(30.0, outage.delay * 2)
            outage.next_try = now + outage.delay
            return
        self.outage = None
        self.log.info("ledger_back", down_s=round(now - outage.since, 1))
        while self.unwritten_reports:
            self.record(self.unwritten_reports.popleft())

    def next_generation(self) -> int:
        try:
            return self.ledger.next_generation()
        except LedgerUnavailable as exc:
            self.ledger_lost(str(exc))
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
                self.on_request(identity, env, body)
        except LedgerUnavailable as exc:
            self.ledger_lost(str(exc))
            if sock is self.front:
                self.reply(identity, env, 503, error=f"the job ledger is unavailable: {exc}")

    def drop(self, kind: str, reason: str) -> None:
        self.dropped[kind] += 1
        self.log.warning("dropped_message", kind=kind, reason=reason[:300], dropped_total=sum(self.dropped.values()))

    def reply(self, identity: bytes, request: P.Envelope, status: int = 200, **body: Any) -> None:
        try:
            self.front.send_multipart([identity, *P.pack(P.reply(request, status, **body))])
        except zmq.ZMQError:
            self.dropped["reply_undeliverable"] += 1  # the requester went away

    def send_worker(self, kind: str, job: Optional[str] = None, blobs: Optional[list] = None,
                    req: Optional[str] = None, **body: Any) -> bool:
        env = P.Envelope(kind, body, gen=self.slot.generation, job=job, req=req, blobs=blobs or [])
        try:
            self.back.send_multipart([P.worker_identity(self.slot.generation), *P.pack(env)], copy=False)
            return True
        except zmq.ZMQError as exc:
            self.log.warning("send_failed", type=kind, generation=self.slot.generation, error=str(exc))
            return False

    # --- from the worker ------------------------------------------------------------------------------
    def on_worker_message(self, identity: bytes, env: P.Envelope, body: P.Body) -> None:
        if not self.slot.accepts_from(identity):
            self.dropped["stale_generation"] += 1
            return
        now = time.monotonic()
        self.slot.on_message(env.type, body, now)
        if env.type in JOB_MESSAGES:
            if self.jobs.owns(env.job):
                self.on_job_message(env, body, now)
        elif env.type == P.T.INCIDENT:
            self.record(incident_report(body, self.jobs.current, self.slot.generation, self.slot.rung_label(),
                                        self.slot.rss, self.slot.pids()))
        elif env.type == P.T.IMAGE_DONE:
            self.answer_image(env, body)

    def on_job_message(self, env: P.Envelope, body: P.Body, now: float) -> None:
        if env.type == P.T.VIDEO:
            self.jobs.on_video(env.job, body, now)
        elif env.type == P.T.FRAME:
            self.jobs.on_frame(env.job, body, now)
        elif env.type == P.T.JOB_DONE:
            self.jobs.on_done(env.job, body)
        else:
            self.jobs.on_failed(env.job, body)

    def answer_image(self, env: P.Envelope, body: P.ImageDone) -> None:
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
        with self.ledger_guard():
            self.jobs.requeue_current()

    def worker_died(self, ending: Ending) -> None:
        job_id = self.jobs.current
        self.images.fail_all(f"worker died: {ending.cause.kind}")
        self.record(death_report(ending, job_id, self.slot.rss, self.slot.pids()))
        with self.ledger_guard():
            if job_id:
                self.ledger.add_event(job_id, "restart", {"cause": ending.cause.kind, "frame": ending.frame,
                                                          "worker_generation": ending.generation})
            if job_id and ending.frame is not None:
                self.ledger.record_frame_death(job_id, int(ending.frame), ending.cause.kind)
        with self.ledger_guard():
            self.jobs.requeue_current()

    def probe_died(self, ending: Ending) -> None:
        self.record(death_report(ending, None, None, self.slot.pids()))

    def went_fatal(self, reason: str) -> None:
        with self.ledger_guard():
            failed = self.ledger.fail_all_active(f"service fatal: {reason}")
            self.log.error("jobs_failed_by_fatal", failed_jobs=failed)

    def record(self, report: dict) -> None:
        """Into the ledger; kept in memory while the ledger is away, written when it is back."""
        self.log.error("crash_report", **{k: v for k, v in report.items() if k not in ("stderr_tail", "gpu_memory")})
        if self.outage:
            self.unwritten_reports.append(report)
            return
        try:
            self.ledger.add_crash(report)
        except LedgerUnavailable as exc:
            self.unwritten_reports.append(report)
            self.ledger_lost(str(exc))

    # --- requests from the gateway / CLI ----------------------------------------------------------------
    def on_request(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        if body.deadline is not None and body.deadline < time.time():
            self.dropped["expired_request"] += 1
            return  # the caller already gave up (queued while we were down)
        getattr(self, f"request_{env.type}")(identity, env, body)

    def request_submit(self, identity: bytes, env: P.Envelope, body: P.Submit) -> None:
        if self.slot.is_fatal:
            return self.reply(identity, env, 503, error=f"service is fatal: {self.slot.fatal_reason()}",
                              status_word="fatal")
        if len(self.ledger.queue()) >= self.cfg.jobs.queue_max:
            return self.reply(identity, env, 429, error=f"Queue full (max {self.cfg.jobs.queue_max})",
                              retry_after_s=self.jobs.seconds_until_free(time.monotonic()))
        refusal = self.refuse_path(body.video_path)
        if refusal:
            self.log.warning("submit_refused", reason=refusal)
            return self.reply(identity, env, 403, error=refusal)
        job, created = self.ledger.accept(body.video_path, body.source, body.idempotency_key, body.max_frames)
        self.log.info("job_accepted", job_id=job.job_id, created=created)
        self.reply(identity, env, 202 if created else 200, job={**self.jobs.view(job.job_id), "created": created})

    def refuse_path(self, path: str) -> Optional[str]:
        """Defence in depth: the gateway checked the roots, and so does the ledger's only writer."""
        try:
            resolve_inside(path, video_roots(self.cfg))
        except PathRefused as exc:
            return str(exc)
        return None

    def request_status(self, identity: bytes, env: P.Envelope, body: P.JobRef) -> None:
        view = self.jobs.view(body.job_id)
        if view is None:
            return self.reply(identity, env, 404, error="Job not found")
        self.reply(identity, env, 200, job=view)

    def request_cancel(self, identity: bytes, env: P.Envelope, body: P.JobRef) -> None:
        """DELETE: a job still to run or running is stopped (the engine stays loaded); then, whatever
        its state, its results and files go, and it answers 410 from then on."""
        if self.jobs.view(body.job_id) is None:
            return self.reply(identity, env, 404, error="Job not found")
        self.jobs.cancel(body.job_id, time.monotonic())
        self.retention.delete(body.job_id, "deleted by its owner (DELETE /v1/jobs/{job_id})")
        self.reply(identity, env, 200, job=self.jobs.view(body.job_id))

    def request_health(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.reply(identity, env, 200, health=self.health())

    def request_diagnostics(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.reply(identity, env, 200, **self.diagnostics())

    def request_metrics(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.reply(identity, env, 200, text=self.metrics.exposition())

    def metric_state(self) -> dict:
        gpu = gpu_facts(self.slot.pids())
        return {**self.health(), "worker_rss": self.slot.rss, "jobs_by_state": self.ledger.count_by_state(),
                "deaths_by_cause": self.ledger.crash_counts(), "messages": self.message_counts(),
                "job_fps": self.jobs.progress.fps(time.monotonic()) if self.jobs.current else None,
                "gpu_devices": gpu.get("devices") if gpu.get("available") else []}

    def request_image(self, identity: bytes, env: P.Envelope, body: P.ImageRequest) -> None:
        if not env.blobs:
            return self.reply(identity, env, 400, error="no image")
        if not self.slot.serving:
            return self.reply(identity, env, 503, error=f"worker not ready ({self.slot.life.label()})",
                              health=self.health())
        if not self.send_worker(P.T.RUN_IMAGE, req=env.req, blobs=[env.blobs[0]]):
            self.slot.worker_unreachable("the worker's socket refused an image")
            return self.reply(identity, env, 503, error="worker unreachable; it is being replaced")
        timeout = body.timeout_s or self.cfg.deadlines.image_s
        self.images.add(env.req, identity, time.monotonic() + timeout)

    def request_drill(self, identity: bytes, env: P.Envelope, body: P.DrillRequest) -> None:
        try:
            faults.check(body.fault, body.at, self.slot.stage_names or None)
        except faults.BadFault as exc:
            return self.reply(identity, env, 400, error=str(exc))
        self.clear_fault_counter(body.fault, body.at)
        if body.at == faults.SUPERVISOR:
            self.crash_next_tick = True
        elif body.at.startswith("frame:") or body.at == "image":
            if not self.slot.serving:
                return self.reply(identity, env, 409, error=f"the worker is {self.slot.life.label()}; a frame or "
                                                            "image fault needs a ready worker")
            if not self.send_worker(P.T.ARM_FAULT, fault=body.fault, at=body.at, times=1,
                                    hang_s=self.cfg.fault.hang_s):
                return self.reply(identity, env, 503, error="the worker could not be reached; nothing was armed")
        else:
            self.cfg.fault.kind, self.cfg.fault.at, self.cfg.fault.times = body.fault, body.at, 1
            self.slot.probed_ok.clear()
            self.slot.restart("drill")
        self.log.warning("drill_armed", kind=body.fault, at=body.at)
        self.reply(identity, env, 200, armed={"kind": body.fault, "at": body.at}, generation=self.slot.generation)

    def request_reload(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.slot.reload()
        self.reply(identity, env, 200, status_word="reloaded", health=self.health())

    def clear_fault_counter(self, kind: str, at: str) -> None:
        path = faults.counter_path(kind, at, self.cfg.runtime_dir)
        if os.path.exists(path):
            os.unlink(path)

    # --- views ---------------------------------------------------------------------------------------------
    def health(self) -> dict:
        health = {**self.slot.health(), "queue_depth": None, "running_job": self.jobs.current,
                  "uptime_s": round(time.time() - self.started_at, 1), "ledger": "ok"}
        with self.ledger_guard():
            if not self.outage:
                health["queue_depth"] = len(self.ledger.queue())
        if self.outage:
            down = round(time.monotonic() - self.outage.since, 1)
            health["ledger"] = f"unavailable for {down}s: {self.outage.reason}"
            if health["status"] == "ready":
                health["status"] = "degraded"
            health["reason"] = f"the job ledger is unavailable ({self.outage.reason}); jobs resume when it is back"
        return health

    def message_counts(self) -> dict:
        """`dropped`: refused at the boundary (undecodable, invalid, wrong socket); the rest were
        well-formed but no longer wanted (an old generation, a finished job, a state they don't fit)."""
        refused = ("undecodable", "invalid", "wrong_socket")
        return {"dropped": sum(self.dropped[k] for k in refused), **{k: self.dropped[k] for k in refused},
                "stale_generation": self.dropped["stale_generation"], "stale_job": self.jobs.stale,
                "ignored_for_state": sum(self.slot.ignored.values()),
                "expired_request": self.dropped["expired_request"],
                "reply_undeliverable": self.dropped["reply_undeliverable"]}

    def diagnostics(self) -> dict:
        pids, worker = self.slot.pids(), self.slot.describe()
        return {"health": self.health(), "worker": worker, "ladder": worker["ladder"],
                "probed_ok": worker["probed_ok"], "boots": worker["boots"],
                "crashes": self.ledger.crashes(limit=20), "restarts_by_cause": self.ledger.crash_counts(),
                "queue": self.ledger.queue(), "running_job": self.jobs.current, "messages": self.message_counts(),
                "host": host_facts(), "gpu": gpu_facts(pids), "packages": package_versions(),
                "supervisor": {"pid": os.getpid(), "started_at": self.started_at}}


def make_private(*directories: str) -> None:
    """State and storage are the service user's alone (0700), whatever existed before."""
    for directory in directories:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)


@dataclass
class Outage:
    reason: str
    since: float
    next_try: float
    delay: float = 1.0


def main(cfg) -> int:
    try:
        supervisor = Supervisor(cfg)
    except statelock.StateDirHeld as exc:
        structlog.get_logger().error("state_dir_held", reason=str(exc))
        print(f"pose-service supervisor: {exc}", flush=True)
        return 2
    return supervisor.run()
