"""The worker slot, the one owner of the worker's life (after supervisord's Subprocess): the state
machine, generation, rung, probe, backoff and fatal timers, liveness and progress deadlines. Every
time-driven move happens in `transition(now)`; every end goes exit -> cause -> policy (`finish_*`).
A message that does not fit the state is ignored and counted, never raised. What the slot decides
about jobs it tells its `SlotEvents` listener; it never touches the ledger."""
from __future__ import annotations

import signal
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import msgspec

from configs import Config
from pose_common import protocol as P
from pose_common.hostinfo import system_memory
from pose_common.memplan import read_gpu_facts
from supervisor.causes import Cause, Death, Ending, decode_exit
from supervisor.gpu_plan import FactsReader, MemoryPlanner
from supervisor.liveness import FramePace, Mark, RunClock, SchedReader, read_schedstat, silent_but_computing
from supervisor.metrics import Metrics
from supervisor.policy import Fatal, RestartPolicy
from supervisor.process import ChildProcess, Spawner, read_json
from supervisor.states import WORKER_ALIVE, WorkerLifecycle
from supervisor.states import WorkerState as S

# a worker we stopped on purpose: its end is not a crash and not a restart decision
GRACEFUL_STOPS = frozenset({"shutdown", "reload", "step_up", "drill", "cancel"})


class SlotEvents(Protocol):
    def worker_stopped(self, reason: str) -> None: ...
    def worker_died(self, ending: Ending) -> None: ...
    def probe_died(self, ending: Ending) -> None: ...
    def went_fatal(self, reason: str, restart_can_fix: bool) -> None: ...


@dataclass
class ProbeRun:
    proc: ChildProcess
    out: str
    purpose: str                 # "boot" | "step_up"
    rung_index: int
    superseded: bool = False     # a reload or drill came after it started: its verdict is stale
    clock: Optional[RunClock] = None
    stages_from: Optional[float] = None  # its run time when its first stage was seen


class WorkerSlot:
    def __init__(self, cfg: Config, ladder: list[dict], spawner: Spawner, events: SlotEvents,
                 next_generation: Callable[[], int], log, clock: Callable[[], float] = time.monotonic,
                 metrics: Optional[Metrics] = None, sched_reader: SchedReader = read_schedstat,
                 gpu_facts: FactsReader = read_gpu_facts):
        self.cfg, self.ladder, self.spawner, self.events, self.log, self.clock = \
            cfg, ladder, spawner, events, log, clock
        self.metrics = metrics or Metrics()
        self.next_generation = next_generation
        sup, deadlines = cfg.supervisor, cfg.deadlines
        self.policy = RestartPolicy(sup.backoff_initial_s, sup.backoff_max_s, sup.intensity, sup.period_s)
        self.life = WorkerLifecycle()
        self.planner = MemoryPlanner(ladder, gpu_facts)
        self.rung_index = self.planned_rung = self.planner.start_rung()
        self.probed_ok: set[int] = set()
        self.proc: Optional[ChildProcess] = None
        self.probe: Optional[ProbeRun] = None
        self.abandoned: list[ChildProcess] = []   # outlived SIGKILL: replaced, reaped if they ever end
        self.images_in_flight: dict[str, Mark] = {}  # image requests the worker has not answered, since when
        self.hang_stage: Optional[str] = None      # where our own deadline judged the worker hung, if it did
        self.backoff_until = 0.0
        self.fatal: Optional[Fatal] = None
        self.degraded_reason: Optional[str] = None
        self.stepped_down_at = 0.0
        self.step_up_to: Optional[int] = None  # a rung above probed fine: moved to once the worker is idle
        self.run_clock = RunClock(sched_reader)
        self.last_seen = self.last_progress = self.run_clock.mark(clock())
        self.pace = FramePace(deadlines.frame_s, deadlines.frame_warmup, deadlines.frame_floor_s,
                              deadlines.frame_factor)
        self.reported: Optional[dict] = None
        self.rss: Optional[int] = None
        self.engine_info: dict = {}
        self.joint_names: list[str] = []
        self.mesh_faces: Optional[list] = None
        self.stage_names: list[str] = []
        self.boots: deque = deque(maxlen=10)
        self.ignored: Counter = Counter()
        self.lifecycle_messages: dict[str, Callable[[Any, float], None]] = {
            P.T.HELLO: self.on_hello, P.T.HEARTBEAT: self.on_hb, P.T.STAGE: self.on_stage, P.T.READY: self.on_ready,
            P.T.DYING: self.on_dying}
        self.shutting_down = False
        self.drilled: Optional[tuple[str, str]] = None  # a load-time fault an operator armed (kind, at)

    # --- what others ask ---------------------------------------------------------------------
    @property
    def state(self) -> S:
        return self.life.state

    @property
    def generation(self) -> int:
        return self.life.generation

    @property
    def ready(self) -> bool:
        """Ready for a job. Not while a step-up waits: the next job starts on the rung above."""
        return self.life.state is S.READY and self.step_up_to is None

    @property
    def serving(self) -> bool:
        return self.life.state in (S.READY, S.BUSY)

    def pids(self) -> tuple[int, ...]:
        procs = (self.proc, self.probe.proc if self.probe else None)
        return tuple(p.pid for p in procs if p is not None)

    def rung_label(self, index: Optional[int] = None) -> str:
        rung = self.ladder[self.rung_index if index is None else index]
        detector = (rung.get("options") or {}).get("detector")
        return f"{rung['engine']}@{rung.get('device', 'cpu')}" + (f"({detector})" if detector else "")

    def accepts_from(self, identity: bytes) -> bool:
        return self.proc is not None and P.generation_of(identity) == self.life.generation

    # --- time-driven moves ----------------------------------------------------------------------
    def transition(self, now: float) -> None:
        self.reap()
        self.watch(now)
        if self.shutting_down:
            if self.proc is None and self.probe is None and self.life.state is not S.EXITED:
                self.life.move(S.EXITED, "stopped")
            return
        if self.life.state is S.FATAL:
            self.maybe_revive(now)
            return
        if self.life.state is S.BACKOFF and now >= self.backoff_until:
            self.life.move(S.EXITED, "backoff over")
        if self.life.state is S.DRAINING and self.proc is None and self.probe is None:
            self.life.move(S.EXITED, "drained")  # whatever ended the last process, nothing is left to wait for
        if self.life.state is S.EXITED and self.proc is None and self.probe is None:
            self.start_rung()
        self.maybe_finish_step_up()
        self.maybe_step_up(now)

    def start_rung(self) -> None:
        if self.cfg.probe.enabled and self.rung_index not in self.probed_ok:
            self.start_probe(self.rung_index, "boot")
            self.life.move(S.PROBING, f"probe {self.rung_label()}", stage="detector")
        else:
            self.spawn()

    def spawn(self) -> None:
        self.life.generation = self.next_generation()
        rung = self.planner.as_planned(self.rung_index, self.ladder[self.rung_index])
        self.proc = self.spawner.worker(self.life.generation, rung)
        self.reported, self.rss, self.stage_names = None, None, []
        self.images_in_flight, self.hang_stage = {}, None
        self.run_clock.attach(self.proc.pid, self.clock())
        self.last_seen = self.last_progress = self.run_clock.mark(self.clock())
        self.life.device = rung.get("device", "cpu")
        self.life.move(S.SPAWNING, f"spawn {self.rung_label()}")
        self.log.info("worker_spawned", generation=self.life.generation, pid=self.proc.pid, rung=self.rung_label())

    def start_probe(self, rung_index: int, purpose: str) -> None:
        proc, out = self.spawner.probe(self.ladder[rung_index], f"rung{rung_index}")
        clock = RunClock(self.run_clock.reader)
        clock.attach(proc.pid, self.clock())
        self.probe = ProbeRun(proc, out, purpose, rung_index, clock=clock)
        self.log.info("probe_started", rung=self.rung_label(rung_index), purpose=purpose, pid=proc.pid)

    def maybe_revive(self, now: float) -> None:
        retry_s, fatal = self.cfg.supervisor.fatal_retry_s, self.fatal
        if not retry_s or fatal is None or now - fatal.since <= retry_s:
            return
        if not fatal.restart_can_fix and fatal.retries >= 1:
            return  # tried once more in case it was fixed; looping on it would only hide the reason
        self.log.info("fatal_retry", reason=fatal.reason)
        fatal.retries += 1
        self.policy.reset()
        self.rung_index = self.planned_rung = self.planner.start_rung()
        self.probed_ok.clear()
        self.life.move(S.EXITED, "periodic retry after fatal")

    def maybe_step_up(self, now: float) -> None:
        interval = self.cfg.supervisor.step_up_after_s
        if (self.rung_index == 0 or not interval or self.probe is not None or self.life.state is not S.READY
                or self.step_up_to is not None
                or now - self.stepped_down_at < interval):
            return
        self.stepped_down_at = now
        if self.planner.may_step_up(self.ladder[self.rung_index - 1]):  # else it waits, and says why
            self.start_probe(self.rung_index - 1, "step_up")

    # --- deadlines ------------------------------------------------------------------------------
    def watch(self, now: float) -> None:
        grace, unkillable_after = self.cfg.supervisor.abort_grace_s, self.cfg.supervisor.unkillable_after_s
        if self.probe is not None and self.probe.proc.unkillable_for(now) > unkillable_after:
            self.abandon_probe(self.probe, now)
        elif self.probe is not None and self.probe.proc.alive():
            self.watch_probe(self.probe, now, grace)
        proc = self.proc
        if proc is None or not proc.alive():
            return
        if proc.unkillable_for(now) > unkillable_after:
            self.abandon_worker(proc, now)
        elif proc.escalating:
            proc.escalate(proc.kill_reason or "hang", grace)
        elif proc.kill_reason:
            proc.kill_if_stuck(self.cfg.supervisor.stop_grace_s)
        elif late := self.image_overdue(now):
            self.hung("image", late, grace)
        elif overdue := self.overdue(now):
            self.hung(self.life.stage, overdue, grace)

    def hung(self, stage: Optional[str], reason: str, grace: float) -> None:
        self.log.error("worker_hang", generation=self.life.generation, stage=stage, reason=reason)
        self.hang_stage = stage
        if self.proc is not None:
            self.proc.escalate(f"hang: {reason}", grace)

    def image_overdue(self, now: float) -> Optional[str]:
        """An image the worker has not answered in deadlines.image_s of its run time: whatever it is
        stuck in, it is stuck (while ready there is no other deadline to catch it)."""
        if not self.images_in_flight or self.life.state not in (S.READY, S.BUSY):
            return None
        waited = self.run_clock.mark(now).run_s - min(m.run_s for m in self.images_in_flight.values())
        limit = self.cfg.deadlines.image_s
        return f"no answer to an image for {waited:.1f}s of run time (limit {limit:g}s)" if waited > limit else None

    def overdue(self, now: float) -> Optional[str]:
        """Every deadline counts the worker's run time (wall time less its waits for a CPU, see
        supervisor/liveness.py), so a starved worker is slow, never hung."""
        sup, deadlines = self.cfg.supervisor, self.cfg.deadlines
        at = self.run_clock.mark(now)
        silent = at.run_s - self.last_seen.run_s
        if self.life.state is S.SPAWNING:
            return f"no hello within {deadlines.hello_s:g}s" if silent > deadlines.hello_s else None
        if silent > sup.heartbeat_s * sup.liveness_misses:
            computing = silent_but_computing(silent, at.cpu_s - self.last_seen.cpu_s, sup.busy_cpu_fraction)
            if not computing:
                return f"no heartbeat for {silent:.1f}s of run time"
            if silent > sup.busy_silence_s:
                return f"no heartbeat for {silent:.1f}s of run time while computing (limit {sup.busy_silence_s:g}s)"
        stalled = at.run_s - self.last_progress.run_s
        if self.life.state is S.LOADING:
            limit = self.stage_deadline(self.life.stage)
            return f"stage {self.life.stage} exceeded {limit:g}s" if stalled > limit else None
        if self.life.state is S.BUSY and stalled > (limit := self.pace.limit_s()):
            return f"no frame progress for {stalled:.1f}s of run time (limit {limit:g}s)"
        return None

    def stage_deadline(self, stage: Optional[str]) -> float:
        return float(self.cfg.deadlines.stages.get(stage or "", self.cfg.deadlines.stage_default_s))

    def watch_probe(self, run: ProbeRun, now: float, grace: float) -> None:
        if run.proc.escalating or run.proc.kill_reason:
            run.proc.escalate(run.proc.kill_reason or "hang", grace) if run.proc.escalating \
                else run.proc.kill_if_stuck(self.cfg.supervisor.stop_grace_s)
            return
        ran = run.clock.mark(now).run_s if run.clock else now - run.proc.started
        overdue = self.probe_overdue(run, read_json(run.out), ran)
        if overdue:
            run.proc.escalate(f"hang: {overdue}", grace)

    def probe_overdue(self, run: ProbeRun, report: dict, ran: float) -> Optional[str]:
        """A probe's start-up (the interpreter, its imports, the engine built) is the work a worker does
        before its hello, so it has deadlines.hello_s; its stages then have deadlines.probe_s from the
        first one, each stage at most its own deadline. Counted from spawn, a slow start-up (a cold
        import of torch on a busy disk) ate the stages' time, and a sound probe could be killed as hung."""
        stages = report.get("stages") or []
        if not stages:
            limit = self.cfg.deadlines.hello_s
            return f"probe start-up exceeded {limit:g}s of run time" if ran > limit else None
        if run.stages_from is None:
            run.stages_from = ran
        stage = report.get("stage") or stages[-1].get("name")
        limit = min(self.cfg.deadlines.probe_s, self.stage_deadline(stage) * len(stages))
        if ran - run.stages_from > limit:
            return f"probe stage {stage} exceeded {limit:g}s of run time"
        return None

    # --- messages from the worker -----------------------------------------------------------------
    def on_message(self, kind: str, body: P.Body, now: float) -> None:
        """Lifecycle messages (hello, hb, stage, ready, dying); job messages go to the job runner,
        which reports progress through `progressed`."""
        self.last_seen = self.run_clock.mark(now)
        handler = self.lifecycle_messages.get(kind)
        if handler is not None:
            handler(body, now)

    def ignore(self, kind: str) -> None:
        self.ignored[f"{kind}@{self.life.state.value}"] += 1
        self.log.info("message_ignored", type=kind, state=self.life.state.value, generation=self.life.generation)

    def on_hello(self, body: P.Hello, now: float) -> None:
        if self.life.state is not S.SPAWNING:
            return self.ignore(P.T.HELLO)
        self.life.move(S.LOADING, "hello", stage="start")
        self.last_progress = self.run_clock.mark(now)
        self.boots.append({"generation": self.life.generation, "rung": self.rung_label(), "pid": body.pid,
                           "started_at": time.time(), "stages": [], "result": "loading"})

    def on_hb(self, body: P.Heartbeat, now: float) -> None:
        if body.rss is not None:
            self.rss = body.rss

    def on_stage(self, body: P.StageEvent, now: float) -> None:
        if self.life.state is not S.LOADING or not self.boots:
            return self.ignore(P.T.STAGE)
        stages = self.boots[-1]["stages"]
        if body.event == "start":
            self.life.move(S.LOADING, "stage start", stage=body.name)
            self.last_progress = self.run_clock.mark(now)
            stages.append({"name": body.name, "result": "running", "started_at": time.time()})
        elif stages:
            stages[-1].update(result="ok", duration_s=body.duration_s, rss_delta=body.rss_delta,
                              gpu_delta=body.gpu_delta)
            if body.duration_s is not None:
                self.metrics.stage_loaded(body.name, body.duration_s)
        self.log.info("worker_stage", generation=self.life.generation, stage=body.name, phase=body.event,
                      duration_s=body.duration_s)

    def on_ready(self, body: P.Ready, now: float) -> None:
        if self.life.state is not S.LOADING:
            return self.ignore(P.T.READY)
        self.life.move(S.READY, "engine loaded")
        self.fatal = None
        self.engine_info, self.joint_names, self.mesh_faces = body.engine, body.joint_names, body.mesh_faces
        self.stage_names = body.stages or [stage["name"] for stage in self.boots[-1]["stages"]]
        self.life.device = self.engine_info.get("device", self.life.device)
        self.policy.healthy()
        if self.boots:
            self.boots[-1]["result"] = "ready"
        self.log.info("worker_ready", generation=self.life.generation, engine=self.engine_info)

    def on_dying(self, body: P.DyingReport, now: float) -> None:
        self.reported = {k: v for k, v in msgspec.structs.asdict(body).items() if v is not None}

    def image_sent(self, req: str, now: float) -> None:
        self.images_in_flight[req] = self.run_clock.mark(now)

    def image_answered(self, req: Optional[str]) -> None:
        self.images_in_flight.pop(req or "", None)

    def job_started(self, now: float) -> bool:
        if self.life.state is not S.READY:
            return False
        self.life.move(S.BUSY, "job")
        self.last_progress = self.run_clock.mark(now)
        self.pace.restart(self.last_progress.run_s)
        return True

    def job_finished(self) -> None:
        if self.life.state is S.BUSY:
            self.life.move(S.READY, "job finished")

    def progressed(self, now: float, frame: bool = False) -> None:
        self.last_progress = self.run_clock.mark(now)
        if frame:
            self.pace.frame(self.last_progress.run_s)

    # --- requests ------------------------------------------------------------------------------------
    def restart(self, reason: str) -> None:
        """Stop the worker and any probe gracefully; transition() starts the next one. A probe that
        already finished but is not yet reaped is superseded too: it judged the old configuration."""
        if self.probe is not None:
            self.probe.superseded = True
            if self.probe.proc.alive():
                self.probe.proc.send(signal.SIGTERM, reason)
        if self.proc is not None and self.proc.alive():
            self.proc.send(signal.SIGTERM, reason)
        if self.life.can_move(S.DRAINING) and (self.proc is not None or self.life.state is S.PROBING):
            self.life.move(S.DRAINING, reason)
        elif self.life.state in (S.FATAL, S.BACKOFF):
            self.life.move(S.EXITED, reason)
            self.backoff_until = 0.0

    def worker_unreachable(self, reason: str) -> None:
        """A send to the worker failed: it cannot be given work, so it is replaced (and the death
        is named for what it was, not a hang found a minute later)."""
        proc = self.proc
        if proc is not None and proc.poll() is None and not proc.kill_reason and self.life.can_move(S.DRAINING):
            proc.send(signal.SIGTERM, f"unreachable: {reason}")
            self.life.move(S.DRAINING, "unreachable")

    def reload(self) -> None:
        """Start over from the top rung with a clean record (an operator asked for it)."""
        self.policy.reset()
        self.rung_index = self.planned_rung = self.planner.start_rung()
        self.fatal, self.degraded_reason = None, None
        self.probed_ok.clear()
        self.restart("reload")

    def drill(self, kind: str, at: str) -> None:
        """Arm a load-time fault: the next worker (and its probe) are built with it (child_config)."""
        self.drilled = (kind, at)
        self.probed_ok.clear()
        self.restart("drill")

    def stop(self, timeout_s: float) -> None:
        self.shutting_down = True
        if self.probe is not None and self.probe.proc.alive():
            self.probe.proc.stop("shutdown", timeout_s)
        if self.proc is not None and self.proc.alive():
            self.proc.stop("shutdown", timeout_s)

    # --- how processes end ------------------------------------------------------------------------------
    def reap(self) -> None:
        for gone in [p for p in self.abandoned if p.poll() is not None]:
            self.abandoned.remove(gone)
            self.log.warning("abandoned_process_ended", pid=gone.pid, label=gone.label, code=gone.poll())
        if self.probe is not None and self.probe.proc.poll() is not None:
            run, self.probe = self.probe, None
            self.finish_probe(run)
        if self.proc is not None and self.proc.poll() is not None:
            proc, self.proc = self.proc, None
            self.finish_worker(proc)

    def finish_worker(self, proc: ChildProcess) -> None:
        if proc.kill_reason in GRACEFUL_STOPS or (proc.poll() == 0 and self.shutting_down):
            self.events.worker_stopped(proc.kill_reason or "exit 0")
            self.life.move(S.EXITED, proc.kill_reason or "exit 0")
            return
        self.worker_ended(proc, None)

    def abandon_worker(self, proc: ChildProcess, now: float) -> None:
        """It outlived SIGKILL for supervisor.unkillable_after_s (uninterruptible sleep in a driver):
        it can no longer be waited for. Its job goes back, a new worker starts, and it is reaped if
        it ever ends; its messages are an old generation's, dropped."""
        self.log.error("worker_unkillable", generation=self.life.generation, pid=proc.pid,
                       killed_for=proc.kill_reason, after_s=round(proc.unkillable_for(now), 1))
        self.proc = None
        self.abandoned.append(proc)
        self.worker_ended(proc, proc.unkillable_for(now))

    def worker_ended(self, proc: ChildProcess, unkillable_s: Optional[float]) -> None:
        """A worker death, decoded, told and judged: exit -> cause -> policy."""
        crumb = self.spawner.crumb(self.life.generation)
        reported = self.reported or {}
        ending = self.ending_of("worker", proc, self.rung_index, self.reported,
                                reported.get("stage") or self.hang_stage or crumb.get("stage") or self.life.stage,
                                ("exc_type", "message", "traceback", "error_code"), unkillable_s)
        if ending.death.stage == "frame":
            ending.frame = reported.get("frame", crumb.get("frame"))
        ending.blames_job = self.hang_stage != "image"  # a job waiting behind a hung image did not kill it
        if self.boots and self.boots[-1]["generation"] == self.life.generation:
            self.boots[-1]["result"] = ending.cause.kind
        self.events.worker_died(ending)
        self.life.move(S.EXITED, ending.cause.kind)
        self.apply_policy(ending.cause)

    def ending_of(self, process: str, proc: ChildProcess, rung_index: int, reported: Optional[dict],
                  stage: Optional[str], detail_keys: tuple[str, ...], unkillable_s: Optional[float] = None) -> Ending:
        """The one place a death is recorded: exit status, our own signal, what the process said
        before it went, where it was, its stderr tail and memory, decoded into a cause."""
        code = None if unkillable_s is not None else proc.poll() or 0
        death = Death(returncode=code, killed_by_us=proc.kill_reason, reported=reported, stage=stage,
                      stderr_tail=proc.stderr_tail(self.cfg.supervisor.stderr_tail_lines),
                      rss=self.rss if process == "worker" else None, system_memory=system_memory(),
                      unkillable_s=unkillable_s)
        said = reported or {}
        return Ending(process, decode_exit(death), death, self.life.generation, self.rung_label(rung_index),
                      detail={k: said[k] for k in detail_keys if said.get(k) not in (None, "", [])})

    def finish_probe(self, run: ProbeRun) -> None:
        report = read_json(run.out)
        ok = run.proc.poll() == 0 and bool(report.get("ok"))
        stopped_by_us = run.proc.kill_reason in GRACEFUL_STOPS
        if not stopped_by_us:
            self.metrics.probe_finished(ok)
        if ok and not run.superseded:
            self.probed_ok.add(run.rung_index)
            self.log.info("probe_ok", rung=self.rung_label(run.rung_index), stages=report.get("stages"))
            return self.after_probe_ok(run)
        if ok or stopped_by_us:
            return  # a verdict on a configuration that was replaced, or no verdict at all
        ending = self.ending_of("probe", run.proc, run.rung_index, report if report.get("cause") else None,
                                report.get("stage"), ("exc_type", "message", "stages"))
        cause = ending.cause
        self.events.probe_died(ending)
        if run.superseded:
            return
        if run.purpose == "step_up":
            self.stepped_down_at = self.clock()  # the rung above still fails: stay, try later
            return
        if self.life.state is not S.PROBING:
            return
        self.life.move(S.EXITED, f"probe failed: {cause.kind}")
        if self.rung_index + 1 < len(self.ladder):
            # this configuration crashed in isolation: never hand it to the long-lived worker
            self.step_down(f"detector probe {cause.kind} at stage {ending.death.stage}")
        else:
            self.apply_policy(cause)

    def abandon_probe(self, run: ProbeRun, now: float) -> None:
        """A probe that outlived SIGKILL: judged unkillable, like a worker (see abandon_worker)."""
        self.probe = None
        self.abandoned.append(run.proc)
        ending = self.ending_of("probe", run.proc, run.rung_index, None, read_json(run.out).get("stage"),
                                (), run.proc.unkillable_for(now))
        self.events.probe_died(ending)
        if not run.superseded and run.purpose == "boot" and self.life.state is S.PROBING:
            self.life.move(S.EXITED, "probe unkillable")
            self.apply_policy(ending.cause)

    def after_probe_ok(self, run: ProbeRun) -> None:
        if run.purpose == "boot" and self.life.state is S.PROBING:
            self.spawn()
        elif run.purpose == "step_up" and run.rung_index < self.rung_index:
            self.step_up_to = run.rung_index
            self.maybe_finish_step_up()

    def maybe_finish_step_up(self) -> None:
        """Move up only between jobs: a job stopped for it would end with frames from two engines."""
        if self.step_up_to is None or self.life.state is S.BUSY or self.images_in_flight:
            return
        rung, self.step_up_to = self.step_up_to, None
        self.log.info("step_up", to=self.rung_label(rung))
        self.rung_index = rung
        self.degraded_reason = None if rung <= self.planned_rung else self.degraded_reason
        self.policy.reset()
        self.restart("step_up")

    def apply_policy(self, cause: Cause) -> None:
        now = self.clock()
        self.policy.record(now, cause.kind, cause.counts_toward_intensity)
        decision = self.policy.decide(now, cause.kind, cause.retry, self.rung_index + 1 < len(self.ladder))
        self.log.warning("restart_decision", action=decision.action, delay_s=decision.delay_s,
                         reason=decision.reason, rung=self.rung_label())
        if decision.action == "restart":
            self.backoff_until = now + decision.delay_s
            self.life.move(S.BACKOFF, decision.reason)
        elif decision.action == "step_down":
            self.step_down(decision.reason)
        else:
            self.go_fatal(decision.reason, restart_can_fix=cause.retry)

    def step_down(self, reason: str) -> None:
        self.step_up_to = None
        self.rung_index += 1
        self.policy.reset()
        self.stepped_down_at = self.clock()
        self.degraded_reason = f"stepped down to {self.rung_label()}: {reason}"
        self.log.warning("step_down", rung=self.rung_label(), reason=reason)

    def go_fatal(self, reason: str, restart_can_fix: bool) -> None:
        earlier = self.fatal  # still set while a periodic retry runs: its count must survive it
        retries = earlier.retries if earlier is not None and not restart_can_fix else 0
        self.fatal = Fatal(reason, self.clock(), restart_can_fix, retries)
        self.life.move(S.FATAL, reason)
        self.events.went_fatal(reason, restart_can_fix)
        self.log.error("fatal", reason=reason)

    # --- views ------------------------------------------------------------------------------------------
    @property
    def is_fatal(self) -> bool:
        return self.life.state is S.FATAL

    def fatal_reason(self) -> Optional[str]:
        fatal = self.fatal
        if fatal is None or not self.is_fatal:
            return None
        if not fatal.restart_can_fix and fatal.retries >= 1:
            return (f"{fatal.reason} (still so after a retry: a restart cannot fix this; fix the cause, "
                    "see `pose-service diagnose`, then POST /v1/reload)")
        return fatal.reason

    def status_word(self) -> str:
        if self.life.state is S.FATAL:
            return "fatal"
        if self.serving:
            return "degraded" if self.rung_index > self.planned_rung else "ready"  # below what the card fits
        return "loading"

    def health(self) -> dict[str, Any]:
        return {"status": self.status_word(), "worker": self.life.label(), "stage": self.life.stage,
                "generation": self.life.generation, "rung": self.rung_label(), "rung_index": self.rung_index,
                "engine_name": self.ladder[self.rung_index]["engine"],
                "detector": (self.ladder[self.rung_index].get("options") or {}).get("detector"),
                "device": self.life.device, "engine": self.engine_info,
                "reason": self.fatal_reason() if self.is_fatal else self.degraded_reason}

    def describe(self) -> dict[str, Any]:
        return {"state": self.life.state.value, "stage": self.life.stage, "generation": self.life.generation,
                "device": self.life.device, "pid": self.proc.pid if self.proc else None, "rss": self.rss,
                "alive": self.life.state in WORKER_ALIVE, "frame_deadline_s": round(self.pace.limit_s(), 3),
                "ignored_messages": dict(self.ignored), "memory_plan": self.planner.describe(),
                "transitions": [vars(t) for t in list(self.life.history)[-50:]],
                "ladder": [self.rung_label(i) for i in range(len(self.ladder))],
                "probed_ok": sorted(self.rung_label(i) for i in self.probed_ok),
                "boots": list(self.boots)}

