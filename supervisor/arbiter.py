"""The supervisor: sole writer of the ledger and sole owner of the worker's life.

One loop (gunicorn-style): signal handlers only enqueue; each tick handles signals, routes
messages, reaps and watches the worker and the probe, (re)starts what is missing and dispatches the
next job. Every decision about a death goes through causes.decode_exit and policy.RestartPolicy."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections import deque
from typing import Any, Optional

import structlog
import zmq

from configs import dump_config, rungs
from pose_common import protocol as P
from pose_common.overlay import overlay_path
from pose_common.logs import setup_logging
from pose_common import hostinfo
from supervisor.causes import Death, decode_exit
from supervisor.ledger import Ledger
from supervisor.policy import RestartPolicy
from supervisor.process import ChildProcess, kill_stale_worker, read_json, spawn_probe, spawn_worker
from pose_common.runtime import RuntimeDir
from pose_common.faults import counter_path
from supervisor.results import write_result
from supervisor.states import WorkerLifecycle, WorkerState as S

GRACEFUL_KILLS = ("shutdown", "reload", "step_up", "drill")
KEEP_GENERATIONS = 20


class Supervisor:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, cfg, signal_queue: Optional[queue.SimpleQueue] = None):
        self.cfg = cfg
        self.log = setup_logging("supervisor", cfg.log_level)
        self.signals = signal_queue or queue.SimpleQueue()
        self.runtime = RuntimeDir(cfg.runtime_dir)
        self.runtime.prepare()
        self.ledger = Ledger(os.path.join(cfg.state_dir, "ledger.sqlite3"))
        self.results_dir = os.path.join(cfg.state_dir, "results")
        os.makedirs(self.results_dir, exist_ok=True)
        self.ctx = zmq.Context()
        ends = P.endpoints(cfg.runtime_dir)
        self.front = P.bind_router(self.ctx, ends.gateway)
        self.back = P.bind_router(self.ctx, ends.worker)
        self.poller = zmq.Poller()
        self.poller.register(self.front, zmq.POLLIN)
        self.poller.register(self.back, zmq.POLLIN)

        sup = cfg.supervisor
        self.policy = RestartPolicy(sup.backoff_initial_s, sup.backoff_max_s, sup.intensity, sup.period_s)
        self.life = WorkerLifecycle()
        self.ladder = rungs(cfg)
        self.rung_index = 0
        self.probed_ok: set[int] = set()
        self.proc: Optional[ChildProcess] = None
        self.probe: Optional[ChildProcess] = None
        self.probe_out = ""
        self.probe_purpose = ""
        self.probe_rung = 0
        self.job_id: Optional[str] = None
        self.last_seen = self.last_progress = time.monotonic()
        self.reported: Optional[dict] = None
        self.worker_rss: Optional[int] = None
        self.engine_info: dict = {}
        self.joint_names: list[str] = []
        self.mesh_faces: Optional[list] = None
        self.backoff_until = 0.0
        self.fatal_reason: Optional[str] = None
        self.fatal_since = 0.0
        self.degraded_reason: Optional[str] = None
        self.stepped_down_at = 0.0
        self.boots: deque = deque(maxlen=10)
        self.pending_images: dict[str, tuple[bytes, float]] = {}
        self.renders: list[subprocess.Popen] = []
        self.dropped = 0
        self.stale = 0
        self.running = True
        self.started_at = time.time()

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self.install_signal_handlers()
        self.boot()
        while self.running:
            self.handle_signals()
            self.route_messages(timeout_ms=int(self.cfg.supervisor.tick_s * 1000))
            self.reap_probe()
            self.reap_worker()
            self.watch_worker()
            self.watch_probe()
            self.manage_worker()
            self.dispatch_job()
            self.expire_images()
            self.reap_renders()
        self.shutdown()
        return 0

    def install_signal_handlers(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, lambda signum, _frame: self.signals.put_nowait(signum))

    def handle_signals(self) -> None:
        while not self.signals.empty():
            signum = self.signals.get_nowait()
            self.log.info("signal", signal=signal.Signals(signum).name)
            self.running = False

    def boot(self) -> None:
        stale = kill_stale_worker(self.runtime.worker_pidfile)
        requeued = self.ledger.requeue_running()
        self.log.info("supervisor_boot", pid=os.getpid(), stale_worker_killed=stale, jobs_requeued=requeued,
                      ladder=[f"{r['engine']}@{r['device']}" for r in self.ladder])

    def shutdown(self) -> None:
        self.log.info("supervisor_shutdown", running_job=self.job_id)
        if self.probe and self.probe.alive():
            self.probe.stop("shutdown", 5)
        if self.proc and self.proc.alive():
            self.proc.stop("shutdown", 5)  # the worker exits at once on SIGTERM; its job is requeued below
        if self.job_id:
            self.ledger.mark_queued(self.job_id)  # resumed by the next boot
        self.front.close()
        self.back.close()
        self.ctx.term()
        self.ledger.close()

    # --- messages -------------------------------------------------------------------------------
    def route_messages(self, timeout_ms: int) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            for _ in range(100):  # bounded burst per socket per tick
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.route(sock, parts)

    def route(self, sock, parts) -> None:
        identity = parts[0].bytes
        try:
            env = P.unpack(parts[1:])
        except P.ProtocolError as exc:
            self.dropped += 1
            self.log.warning("dropped_message", reason=str(exc), dropped_total=self.dropped)
            return
        try:
            if sock is self.back:
                self.on_worker_message(identity, env)
            else:
                self.on_request(identity, env)
        except (KeyError, TypeError, ValueError) as exc:
            self.dropped += 1
            self.log.warning("bad_message", type=env.type, reason=repr(exc))
            if sock is self.front:
                self.reply(identity, env, 400, error=f"malformed {env.type} request: {exc!r}")

    def reply(self, identity: bytes, request: P.Envelope, status: int = 200, **body: Any) -> None:
        try:
            self.front.send_multipart([identity, *P.pack(P.reply(request, status, **body))])
        except zmq.ZMQError:
            pass  # the requester went away; nothing to do

    def send_worker(self, kind: str, job: Optional[str] = None, blobs: Optional[list] = None,
                    req: Optional[str] = None, **body: Any) -> bool:
        env = P.Envelope(kind, body, gen=self.life.generation, job=job, req=req, blobs=blobs or [])
        try:
            self.back.send_multipart([P.worker_identity(self.life.generation), *P.pack(env)], copy=False)
            return True
        except zmq.ZMQError:
            return False

    # --- worker messages ---------------------------------------------------------------------------
    def on_worker_message(self, identity: bytes, env: P.Envelope) -> None:
        if P.generation_of(identity) != self.life.generation or self.proc is None:
            self.stale += 1
            return
        self.last_seen = time.monotonic()
        handler = getattr(self, f"on_{env.type}", None)
        if handler is None:
            self.dropped += 1
            return
        handler(env)

    def on_hello(self, env: P.Envelope) -> None:
        self.life.move(S.LOADING, "hello", stage="start")
        self.last_progress = time.monotonic()
        self.boots.append({"generation": self.life.generation, "rung": self.rung_label(), "pid": env.body.get("pid"),
                           "started_at": time.time(), "stages": [], "result": "loading"})

    def on_hb(self, env: P.Envelope) -> None:
        self.worker_rss = env.body.get("rss")

    def on_stage(self, env: P.Envelope) -> None:
        name = env.body["name"]
        if env.body.get("event") == "start":
            self.life.move(S.LOADING, "stage start", stage=name)
            self.last_progress = time.monotonic()
            self.boots[-1]["stages"].append({"name": name, "result": "running", "started_at": time.time()})
        else:
            self.boots[-1]["stages"][-1].update(result="ok", duration_s=env.body.get("duration_s"),
                                                rss_delta=env.body.get("rss_delta"), gpu_delta=env.body.get("gpu_delta"))
        self.log.info("worker_stage", generation=self.life.generation, stage=name, phase=env.body.get("event"),
                      duration_s=env.body.get("duration_s"))

    def on_ready(self, env: P.Envelope) -> None:
        self.life.move(S.READY, "engine loaded")
        self.engine_info, self.joint_names = env.body["engine"], env.body.get("joint_names", [])
        self.mesh_faces = env.body.get("mesh_faces")
        self.life.device = self.engine_info.get("device", "cpu")
        self.policy.healthy()
        self.boots[-1]["result"] = "ready"
        self.log.info("worker_ready", generation=self.life.generation, engine=self.engine_info)

    def on_video(self, env: P.Envelope) -> None:
        self.ledger.set_video_meta(env.job, env.body["meta"])
        self.last_progress = time.monotonic()

    def on_frame(self, env: P.Envelope) -> None:
        body = env.body
        self.ledger.add_frame(env.job, int(body["index"]), body.get("pts"), body.get("persons") or [], body.get("error"))
        self.last_progress = time.monotonic()

    def on_job_done(self, env: P.Envelope) -> None:
        self.finalize_job(env.job, int(env.body["frames_decoded"]), env.body.get("warning"),
                          {"worker_peak_rss": env.body.get("peak_rss"), "worker_generation": self.life.generation})
        self.job_done()

    def on_job_failed(self, env: P.Envelope) -> None:
        self.ledger.fail(env.job, env.body.get("reason") or "failed")
        self.log.warning("job_failed", job_id=env.job, reason=env.body.get("reason"))
        self.job_done()

    def job_done(self) -> None:
        self.job_id = None
        structlog.contextvars.unbind_contextvars("job_id")
        if self.life.state is S.BUSY:
            self.life.move(S.READY, "job finished")

    def on_incident(self, env: P.Envelope) -> None:
        body = env.body
        self.record_crash(process="worker", cause=body["cause"], summary=body.get("message", ""),
                          stage=body.get("stage"), job_id=env.job, frame_index=body.get("frame"),
                          remedy=f"recovered in-process: {body.get('outcome')}", exit_code=None, signal_name=None,
                          stderr_tail="")

    def on_dying(self, env: P.Envelope) -> None:
        self.reported = dict(env.body)

    def on_image_done(self, env: P.Envelope) -> None:
        pending = self.pending_images.pop(env.req or "", None)
        if pending is None:
            return
        identity, _ = pending
        status = int(env.body.pop("code", 200)) if env.body.get("error") else 200
        if self.mesh_faces is not None and status == 200:
            env.body["mesh_faces"] = self.mesh_faces
        self.reply(identity, P.Envelope(P.T.IMAGE, req=env.req), status, **env.body)

    # --- requests from the gateway / CLI --------------------------------------------------------------
    def on_request(self, identity: bytes, env: P.Envelope) -> None:
        deadline = env.body.get("deadline")
        if isinstance(deadline, (int, float)) and deadline < time.time():
            return  # the caller already gave up (queued while we were down)
        handler = getattr(self, f"request_{env.type}", None)
        if handler is None:
            self.reply(identity, env, 400, error=f"unknown request type {env.type!r}")
            return
        handler(identity, env)

    def request_submit(self, identity: bytes, env: P.Envelope) -> None:
        body = env.body
        if self.life.state is S.FATAL:
            self.reply(identity, env, 503, error=f"service is fatal: {self.fatal_reason}", status_word="fatal")
            return
        if len(self.ledger.queue()) >= self.cfg.jobs.queue_max:
            self.reply(identity, env, 429, error=f"Queue full (max {self.cfg.jobs.queue_max})")
            return
        job, created = self.ledger.accept(str(body["video_path"]), body.get("source", "path"),
                                          body.get("idempotency_key"), body.get("kind", "video"))
        self.log.info("job_accepted", job_id=job.job_id, path=job.video_path, created=created)
        self.reply(identity, env, 202 if created else 200, job={**self.job_view(job.job_id), "created": created})

    def request_status(self, identity: bytes, env: P.Envelope) -> None:
        view = self.job_view(str(env.body["job_id"]))
        if view is None:
            self.reply(identity, env, 404, error="Job not found")
        else:
            self.reply(identity, env, 200, job=view)

    request_result = request_status

    def request_health(self, identity: bytes, env: P.Envelope) -> None:
        self.reply(identity, env, 200, health=self.health())

    def request_diagnostics(self, identity: bytes, env: P.Envelope) -> None:
        self.reply(identity, env, 200, **self.diagnostics())

    def request_metrics(self, identity: bytes, env: P.Envelope) -> None:
        self.reply(identity, env, 200, health=self.health(), restarts_by_cause=self.ledger.crash_counts(),
                   jobs_by_state=self.ledger.count_by_state(), worker_rss=self.worker_rss,
                   messages={"dropped": self.dropped, "stale_generation": self.stale})

    def request_image(self, identity: bytes, env: P.Envelope) -> None:
        if self.life.state not in (S.READY, S.BUSY) or not env.blobs:
            code = 400 if not env.blobs else 503
            self.reply(identity, env, code, error="no image" if not env.blobs else
                       f"worker not ready ({self.life.label()})", health=self.health())
            return
        if self.send_worker(P.T.RUN_IMAGE, req=env.req, blobs=[env.blobs[0]]):
            timeout = float(env.body.get("timeout_s") or self.cfg.deadlines.image_s)
            self.pending_images[env.req] = (identity, time.monotonic() + timeout)
        else:
            self.reply(identity, env, 503, error="worker unreachable")

    def request_drill(self, identity: bytes, env: P.Envelope) -> None:
        kind, at = env.body["fault"], env.body.get("at") or "frame:0"
        self.clear_fault_counter(kind, at)
        if at.startswith("frame:") and self.life.state in (S.READY, S.BUSY):
            self.send_worker(P.T.ARM_FAULT, fault=kind, at=at, times=1, hang_s=self.cfg.fault.hang_s)
        else:
            self.cfg.fault.kind, self.cfg.fault.at, self.cfg.fault.times = kind, at, 1
            self.probed_ok.clear()
            self.restart_worker("drill")
        self.log.warning("drill_armed", kind=kind, at=at)
        self.reply(identity, env, 200, armed={"kind": kind, "at": at}, generation=self.life.generation)

    def request_reload(self, identity: bytes, env: P.Envelope) -> None:
        self.policy.reset()
        self.rung_index, self.fatal_reason, self.degraded_reason = 0, None, None
        self.probed_ok.clear()
        self.restart_worker("reload")
        self.reply(identity, env, 200, status_word="reloaded", health=self.health())

    def request_cancel(self, identity: bytes, env: P.Envelope) -> None:
        job_id = str(env.body["job_id"])
        self.ledger.fail(job_id, "cancelled")
        if job_id == self.job_id:
            self.restart_worker("reload")
        self.reply(identity, env, 200, job=self.job_view(job_id))

    def clear_fault_counter(self, kind: str, at: str) -> None:
        path = counter_path(kind, at, self.cfg.runtime_dir)
        if os.path.exists(path):
            os.unlink(path)

    def restart_worker(self, reason: str) -> None:
        if self.proc and self.proc.alive():
            self.proc.send(signal.SIGTERM, reason)
            if self.life.state is not S.DRAINING:
                self.life.move(S.DRAINING, reason)  # no new work for a worker on its way out
        elif self.life.state in (S.FATAL, S.BACKOFF):
            self.life.move(S.EXITED, reason)
            self.backoff_until = 0.0

    # --- the worker's life ----------------------------------------------------------------------------
    def manage_worker(self) -> None:
        if not self.running:
            return
        now = time.monotonic()
        if self.life.state is S.FATAL:
            retry = self.cfg.supervisor.fatal_retry_s
            if retry and now - self.fatal_since > retry:
                self.revive()
            return
        if self.life.state is S.BACKOFF and now >= self.backoff_until:
            self.life.move(S.EXITED, "backoff over")
        if self.life.state is S.EXITED and self.proc is None and self.probe is None:
            self.start_rung()
        self.maybe_step_up(now)

    def start_rung(self) -> None:
        if self.cfg.probe.enabled and self.rung_index not in self.probed_ok:
            self.start_probe(self.rung_index, "boot")
            self.life.move(S.PROBING, f"probe {self.rung_label()}", stage="detector")
        else:
            self.spawn_worker()

    def spawn_worker(self) -> None:
        self.life.generation = self.ledger.next_generation()
        rung = self.ladder[self.rung_index]
        self.prepare_runtime()
        self.proc = spawn_worker(self.runtime, self.life.generation, rung)
        with open(self.runtime.worker_pidfile, "w") as fh:
            json.dump({"pid": self.proc.pid, "generation": self.life.generation}, fh)
        self.reported, self.worker_rss = None, None
        self.last_seen = self.last_progress = time.monotonic()
        self.life.device = rung.get("device", "cpu")
        structlog.contextvars.bind_contextvars(generation=self.life.generation)
        self.life.move(S.SPAWNING, f"spawn {self.rung_label()}")
        self.runtime.prune_generations(keep=KEEP_GENERATIONS)
        self.log.info("worker_spawned", generation=self.life.generation, pid=self.proc.pid, rung=self.rung_label())

    def prepare_runtime(self) -> None:
        """Everything a child needs, written fresh before each spawn: nothing it reads can have been
        pruned, cleaned away by tmpfiles, or left over from an older configuration."""
        self.runtime.prepare()
        dump_config(self.cfg, self.runtime.config)

    def revive(self) -> None:
        self.log.info("fatal_retry", reason=self.fatal_reason)
        self.policy.reset()
        self.rung_index, self.fatal_reason = 0, None
        self.probed_ok.clear()
        self.life.move(S.EXITED, "periodic retry after fatal")

    def reap_worker(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        proc, self.proc = self.proc, None
        crumb = read_json(self.runtime.worker_crumb(self.life.generation))
        reported = self.reported or {}
        if proc.kill_reason in GRACEFUL_KILLS or (proc.poll() == 0 and not self.running):
            self.requeue_current_job()
            self.fail_pending_images(f"worker stopped ({proc.kill_reason})")
            self.life.move(S.EXITED, proc.kill_reason or "exit 0")
            return
        death = Death(returncode=proc.poll(), killed_by_us=proc.kill_reason, reported=self.reported,
                      stage=reported.get("stage") or crumb.get("stage") or self.life.stage,
                      stderr_tail=proc.stderr_tail(self.cfg.supervisor.stderr_tail_lines),
                      rss=self.worker_rss, system_memory=hostinfo.system_memory())
        cause = decode_exit(death)
        frame = reported.get("frame", crumb.get("frame"))
        job_id = self.job_id
        self.record_crash(process="worker", cause=cause.kind, summary=cause.summary, stage=death.stage,
                          job_id=job_id, frame_index=frame if job_id else None, remedy=cause.remedy,
                          exit_code=death.returncode, signal_name=cause.signal, stderr_tail=death.stderr_tail,
                          detail={k: reported.get(k) for k in ("exc_type", "message", "traceback", "error_code")
                                  if reported.get(k) is not None})
        if job_id and frame is not None and death.stage == "frame":
            self.ledger.record_frame_death(job_id, int(frame), cause.kind)
        self.requeue_current_job()
        self.fail_pending_images(f"worker died: {cause.kind}")
        self.life.move(S.EXITED, cause.kind)
        self.apply_policy(cause.kind, cause.counts_toward_intensity, cause.retry)

    def requeue_current_job(self) -> None:
        if not self.job_id:
            return
        job = self.ledger.job(self.job_id)
        self.ledger.mark_queued(self.job_id)
        if job and job.attempts >= self.cfg.jobs.max_attempts:
            self.ledger.fail(self.job_id, f"gave up after {job.attempts} attempts")
        self.job_id = None
        structlog.contextvars.unbind_contextvars("job_id")

    def apply_policy(self, kind: str, counts: bool, retry: bool) -> None:
        now = time.monotonic()
        self.policy.record(now, kind, counts)
        decision = self.policy.decide(now, kind, retry, has_lower_rung=self.rung_index + 1 < len(self.ladder))
        self.log.warning("restart_decision", action=decision.action, delay_s=decision.delay_s, reason=decision.reason,
                         rung=self.rung_label())
        if decision.action == "restart":
            self.backoff_until = now + decision.delay_s
            self.life.move(S.BACKOFF, decision.reason)
        elif decision.action == "step_down":
            self.step_down(decision.reason)
        else:
            self.go_fatal(decision.reason)

    def step_down(self, reason: str) -> None:
        self.rung_index += 1
        self.policy.reset()
        self.stepped_down_at = time.monotonic()
        self.degraded_reason = f"stepped down to {self.rung_label()}: {reason}"
        self.log.warning("step_down", rung=self.rung_label(), reason=reason)

    def go_fatal(self, reason: str) -> None:
        self.fatal_reason, self.fatal_since = reason, time.monotonic()
        self.life.move(S.FATAL, reason)
        failed = self.ledger.fail_all_active(f"service fatal: {reason}")
        self.log.error("fatal", reason=reason, failed_jobs=failed)

    def watch_worker(self) -> None:
        proc = self.proc
        if proc is None or not proc.alive():
            return
        if proc.abort_sent_at is not None:
            proc.kill_if_abort_ignored(self.cfg.supervisor.abort_grace_s)
            return
        if proc.kill_reason:
            return
        overdue = self.overdue(time.monotonic())
        if overdue:
            self.log.error("worker_hang", generation=self.life.generation, reason=overdue)
            proc.abort_then_kill(f"hang: {overdue}")

    def overdue(self, now: float) -> Optional[str]:
        sup, deadlines = self.cfg.supervisor, self.cfg.deadlines
        silent = now - self.last_seen
        if self.life.state is S.SPAWNING:
            return f"no hello within {deadlines.hello_s:g}s" if silent > deadlines.hello_s else None
        if silent > sup.heartbeat_s * sup.liveness_misses:
            return f"no heartbeat for {silent:.1f}s"
        stalled = now - self.last_progress
        if self.life.state is S.LOADING:
            limit = self.stage_deadline(self.life.stage)
            return f"stage {self.life.stage} exceeded {limit:g}s" if stalled > limit else None
        if self.life.state is S.BUSY and stalled > deadlines.frame_s:
            return f"no frame progress for {stalled:.1f}s (limit {deadlines.frame_s:g}s)"
        return None

    def stage_deadline(self, stage: Optional[str]) -> float:
        return float(self.cfg.deadlines.stages.get(stage or "", self.cfg.deadlines.stage_default_s))

    # --- the detector probe ------------------------------------------------------------------------------
    def start_probe(self, rung_index: int, purpose: str) -> None:
        self.probe_rung, self.probe_purpose = rung_index, purpose
        self.prepare_runtime()
        self.probe, self.probe_out = spawn_probe(self.runtime, self.ladder[rung_index], f"rung{rung_index}")
        self.log.info("probe_started", rung=self.rung_label(rung_index), purpose=purpose, pid=self.probe.pid)

    def watch_probe(self) -> None:
        probe = self.probe
        if probe is None or not probe.alive():
            return
        if probe.abort_sent_at is not None:
            probe.kill_if_abort_ignored(self.cfg.supervisor.abort_grace_s)
            return
        report = read_json(self.probe_out)
        stage = report.get("stage") or "start"
        elapsed = time.monotonic() - probe.started
        limit = min(self.cfg.deadlines.probe_s, self.stage_deadline(stage) * max(1, len(report.get("stages", []))))
        if elapsed > limit:
            probe.abort_then_kill(f"hang: probe stage {stage} exceeded {limit:g}s")

    def reap_probe(self) -> None:
        if self.probe is None or self.probe.poll() is None:
            return
        probe, self.probe = self.probe, None
        report = read_json(self.probe_out)
        rung_index = self.probe_rung
        if probe.poll() == 0 and report.get("ok"):
            self.probed_ok.add(rung_index)
            self.log.info("probe_ok", rung=self.rung_label(rung_index), stages=report.get("stages"))
            self.after_probe_ok(rung_index)
            return
        if probe.kill_reason == "shutdown":
            return
        death = Death(returncode=probe.poll(), killed_by_us=probe.kill_reason,
                      reported=report if report.get("cause") else None, stage=report.get("stage"),
                      stderr_tail=probe.stderr_tail(self.cfg.supervisor.stderr_tail_lines),
                      system_memory=hostinfo.system_memory())
        cause = decode_exit(death)
        self.record_crash(process="probe", cause=cause.kind, summary=cause.summary, stage=death.stage, job_id=None,
                          frame_index=None, remedy=cause.remedy, exit_code=death.returncode, signal_name=cause.signal,
                          stderr_tail=death.stderr_tail, rung=self.rung_label(rung_index),
                          detail={k: report.get(k) for k in ("exc_type", "message", "stages") if report.get(k)})
        if self.probe_purpose == "step_up":
            self.stepped_down_at = time.monotonic()  # the rung above still fails: stay, try later
            return
        self.life.move(S.EXITED, f"probe failed: {cause.kind}")
        if self.rung_index + 1 < len(self.ladder):
            # this configuration crashed in isolation: never hand it to the long-lived worker
            self.step_down(f"detector probe {cause.kind} at stage {death.stage}")
        else:
            self.apply_policy(cause.kind, cause.counts_toward_intensity, cause.retry)

    def after_probe_ok(self, rung_index: int) -> None:
        if self.probe_purpose == "boot" and self.life.state is S.PROBING:
            self.spawn_worker()
        elif self.probe_purpose == "step_up" and rung_index < self.rung_index:
            self.log.info("step_up", to=self.rung_label(rung_index))
            self.rung_index = rung_index
            self.degraded_reason = None if rung_index == 0 else self.degraded_reason
            self.policy.reset()
            self.restart_worker("step_up")

    def maybe_step_up(self, now: float) -> None:
        interval = self.cfg.supervisor.step_up_after_s
        if (self.rung_index == 0 or not interval or self.probe is not None or self.life.state is not S.READY
                or now - self.stepped_down_at < interval):
            return
        self.stepped_down_at = now
        self.start_probe(self.rung_index - 1, "step_up")

    # --- jobs -----------------------------------------------------------------------------------------
    def dispatch_job(self) -> None:
        if self.life.state is not S.READY or self.job_id or not self.running:
            return
        job = self.ledger.next_job()
        if job is None:
            return
        start = self.ledger.next_frame(job.job_id)
        poison = self.ledger.poison_frames(job.job_id, self.cfg.jobs.poison_frame_deaths)
        self.ledger.mark_running(job.job_id)
        self.ledger.set_engine_meta(job.job_id, self.engine_info)
        self.job_id = job.job_id
        structlog.contextvars.bind_contextvars(job_id=job.job_id)
        self.send_worker(P.T.RUN_JOB, job=job.job_id, path=job.video_path, start_frame=start,
                         poison={str(k): v for k, v in poison.items() if k >= start})
        self.life.move(S.BUSY, f"job {job.job_id}")
        self.last_progress = time.monotonic()
        self.log.info("job_dispatched", job_id=job.job_id, generation=self.life.generation, start_frame=start,
                      attempt=job.attempts + 1, poison=sorted(poison))

    def finalize_job(self, job_id: str, frames_decoded: int, warning: Optional[str], run_facts: dict) -> None:
        stored = self.ledger.frames_done(job_id)
        if stored != frames_decoded or self.ledger.next_frame(job_id) != frames_decoded:
            self.ledger.fail(job_id, f"internal: {stored} frames stored for {frames_decoded} decoded")
            return
        job = self.ledger.job(job_id)
        path = os.path.join(self.results_dir, f"{job_id}.json")
        write_result(path, job, self.ledger, self.joint_names, warning, {**run_facts, "attempts": job.attempts},
                     self.mesh_faces)
        self.ledger.finish(job_id, frames_decoded, path, warning)
        self.log.info("job_done", job_id=job_id, frames=frames_decoded, warning=warning)
        if self.cfg.jobs.render_overlay:
            self.start_overlay(job.video_path, path)

    def start_overlay(self, video: str, result_path: str) -> None:
        """Off the loop and out of the worker: a short-lived process draws the overlay video."""
        log = open(os.path.join(self.cfg.runtime_dir, "overlay.stderr"), "ab")
        with log:
            self.renders.append(subprocess.Popen(
                [sys.executable, "-m", "pose_common.overlay", video, result_path, overlay_path(result_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log))

    def reap_renders(self) -> None:
        self.renders = [p for p in self.renders if p.poll() is None]

    def job_view(self, job_id: str) -> Optional[dict]:
        job = self.ledger.job(job_id)
        if job is None:
            return None
        view = {k: getattr(job, k) for k in ("job_id", "state", "video_path", "created_at", "started_at",
                                             "finished_at", "attempts", "frames_total", "error", "warning",
                                             "result_path", "source", "kind")}
        view["status"] = "done" if job.state == "done" else job.state
        view["frames_done"] = self.ledger.frames_done(job_id)
        view["video"] = job.meta()
        if job.result_path and os.path.exists(overlay_path(job.result_path)):
            view["overlay_path"] = overlay_path(job.result_path)
        if job.state in ("queued", "running"):
            view["queue_position"] = self.ledger.queue_position(job_id)
        return view

    # --- images ---------------------------------------------------------------------------------------
    def expire_images(self) -> None:
        now = time.monotonic()
        for req, (identity, deadline) in list(self.pending_images.items()):
            if now > deadline:
                del self.pending_images[req]
                self.reply(identity, P.Envelope(P.T.IMAGE, req=req), 504, error="image inference timed out")

    def fail_pending_images(self, reason: str) -> None:
        for req, (identity, _) in self.pending_images.items():
            self.reply(identity, P.Envelope(P.T.IMAGE, req=req), 503, error=reason)
        self.pending_images.clear()

    # --- reports ----------------------------------------------------------------------------------------
    def record_crash(self, process: str, cause: str, summary: str, stage: Optional[str], job_id: Optional[str],
                     frame_index: Optional[int], remedy: str, exit_code: Optional[int], signal_name: Optional[str],
                     stderr_tail: str, rung: Optional[str] = None, detail: Optional[dict] = None) -> None:
        pids = tuple(p.pid for p in (self.proc, self.probe) if p is not None)
        report = {"at": time.time(), "generation": self.life.generation, "process": process,
                  "rung": rung or self.rung_label(), "stage": stage, "job_id": job_id, "frame_index": frame_index,
                  "cause": cause, "summary": summary, "exit_code": exit_code, "signal": signal_name,
                  "remedy": remedy, "stderr_tail": stderr_tail, "worker_rss": self.worker_rss,
                  "system_memory": hostinfo.system_memory(), "gpu_memory": hostinfo.gpu_facts(pids),
                  "detail": detail or {}}
        self.ledger.add_crash(report)
        self.log.error("crash_report", **{k: v for k, v in report.items() if k not in ("stderr_tail", "gpu_memory")})

    def rung_label(self, index: Optional[int] = None) -> str:
        rung = self.ladder[self.rung_index if index is None else index]
        detector = (rung.get("options") or {}).get("detector")
        return f"{rung['engine']}@{rung.get('device', 'cpu')}" + (f"({detector})" if detector else "")

    def health(self) -> dict:
        state = self.life.state
        if state is S.FATAL:
            status = "fatal"
        elif state in (S.READY, S.BUSY):
            status = "degraded" if self.rung_index > 0 else "ready"
        else:
            status = "loading"
        return {"status": status, "worker": self.life.label(), "stage": self.life.stage,
                "generation": self.life.generation, "rung": self.rung_label(), "rung_index": self.rung_index,
                "device": self.life.device, "engine": self.engine_info, "reason": self.fatal_reason or self.degraded_reason,
                "queue_depth": len(self.ledger.queue()), "running_job": self.job_id,
                "uptime_s": round(time.time() - self.started_at, 1)}

    def diagnostics(self) -> dict:
        pids = tuple(p.pid for p in (self.proc, self.probe) if p is not None)
        return {"health": self.health(),
                "worker": {"state": self.life.state.value, "stage": self.life.stage, "generation": self.life.generation,
                           "device": self.life.device, "pid": self.proc.pid if self.proc else None,
                           "rss": self.worker_rss, "transitions": [vars(t) for t in list(self.life.history)[-50:]]},
                "ladder": [self.rung_label(i) for i in range(len(self.ladder))],
                "probed_ok": sorted(self.rung_label(i) for i in self.probed_ok),
                "boots": list(self.boots),
                "crashes": self.ledger.crashes(limit=20),
                "restarts_by_cause": self.ledger.crash_counts(),
                "queue": self.ledger.queue(), "running_job": self.job_id,
                "messages": {"dropped": self.dropped, "stale_generation": self.stale},
                "host": hostinfo.host_facts(), "gpu": hostinfo.gpu_facts(pids),
                "packages": hostinfo.package_versions(),
                "supervisor": {"pid": os.getpid(), "started_at": self.started_at}}


def main(cfg) -> int:
    return Supervisor(cfg).run()
