"""The worker slot, model-checked: Hypothesis drives `WorkerSlot` with fake processes and a fake clock
through every event in any order (reloads, drills, cancels, stops, probe and worker exits of every
kind, every worker message in every state, timer expiries, failed sends) and checks after each step
that it is never wedged, never runs two workers or two probes, and reaps what it starts.

The core suite runs a bounded number of examples; `POSE_SLOT_MODEL_EXAMPLES` raises it (the
endurance tier runs it deeper)."""
from __future__ import annotations

import copy
import json
import os
import signal
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pose_common import exitcodes
from pose_common import protocol as P
from supervisor.liveness import SchedSample
from supervisor.states import WorkerState as S

EXAMPLES = int(os.environ.get("POSE_SLOT_MODEL_EXAMPLES", "50"))
LADDER = [{"engine": "noop", "device": "cuda"}, {"engine": "noop", "device": "cpu"}]
FATAL_RETRY_S = 10.0
EXIT_CODES = [0, -signal.SIGSEGV, -signal.SIGKILL, -signal.SIGABRT, -signal.SIGBUS, 255, exitcodes.EX_LOAD_FAILED,
              exitcodes.EX_EXCEPTION, exitcodes.EX_CUDA_OOM, exitcodes.EX_CUDA_STICKY, exitcodes.EX_ORPHANED, 1]
SETTLE_STEPS = 200


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeProc:
    """A child process as the slot sees it; the test decides when and how it ends."""

    def __init__(self, kind: str, pid: int, clock, out: str = ""):
        self.kind, self.pid, self.clock, self.out = kind, pid, clock, out
        self.code = None
        self.kill_reason = None
        self.signals: list[int] = []
        self.abort_sent_at = None
        self.started = clock()
        self.polled_dead = False

    def poll(self):
        if self.code is not None:
            self.polled_dead = True
        return self.code

    def alive(self) -> bool:
        return self.code is None

    def send(self, sig, reason):
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.code is None:
            self.signals.append(sig)

    def escalate(self, reason, grace_s):
        if self.abort_sent_at is None:
            self.send(signal.SIGABRT, reason)
            self.abort_sent_at = self.clock()
        elif self.clock() - self.abort_sent_at > grace_s:
            self.send(signal.SIGKILL, reason)

    @property
    def escalating(self) -> bool:
        return self.abort_sent_at is not None

    def kill_if_stuck(self, grace_s):
        pass

    def unkillable_for(self, now: float) -> float:
        return 0.0  # every process here ends when it is killed (tests/test_supervisor_regressions.py: one that does not)

    def stop(self, reason, timeout_s):
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.code is None:
            self.code = 0
        return self.code

    def stderr_tail(self, lines):
        return ""

    def end(self, code: int, report: dict | None = None) -> None:
        if self.out and report is not None:
            with open(self.out, "w") as fh:
                json.dump(report, fh)
        self.code = code

    def end_as_asked(self) -> None:
        """What a healthy process does with the signals it got."""
        if signal.SIGKILL in self.signals:
            self.end(-signal.SIGKILL)
        elif signal.SIGABRT in self.signals:
            self.end(-signal.SIGABRT)
        else:
            self.end(0, {"ok": False, "stage": "detector"} if self.kind == "probe" else None)


class FakeSpawner:
    def __init__(self, clock, directory: str):
        self.clock, self.directory = clock, directory
        self.procs: list[FakeProc] = []
        self.rungs: list[dict] = []  # what each worker was told to run

    def worker(self, generation, rung):
        self.rungs.append(rung)
        self.procs.append(FakeProc("worker", 10_000 + len(self.procs), self.clock))
        return self.procs[-1]

    def probe(self, rung, tag):
        out = os.path.join(self.directory, f"probe-{len(self.procs)}.json")
        self.procs.append(FakeProc("probe", 10_000 + len(self.procs), self.clock, out))
        return self.procs[-1], out

    def crumb(self, generation):
        return {}

    def alive(self, kind: str) -> list[FakeProc]:
        return [p for p in self.procs if p.kind == kind and p.alive()]


class Events:
    def __init__(self):
        self.seen: list[tuple] = []

    def worker_stopped(self, reason):
        self.seen.append(("stopped", reason))

    def worker_died(self, ending):
        self.seen.append(("died", ending.cause.kind))

    def probe_died(self, ending):
        self.seen.append(("probe_died", ending.cause.kind))

    def went_fatal(self, reason, restart_can_fix):
        self.seen.append(("fatal", reason))


class Log:
    def __getattr__(self, _name):
        return lambda *a, **k: None


def build_slot(clock, spawner, events, sched_reader=lambda pid: None):
    from configs import load_config
    from supervisor.slot import WorkerSlot

    cfg = load_config(["engine.name=noop", f"supervisor.fatal_retry_s={FATAL_RETRY_S}",
                       "supervisor.step_up_after_s=20", "supervisor.backoff_max_s=8"])
    generations = iter(range(1, 1_000_000))
    return WorkerSlot(cfg, [dict(r) for r in LADDER], spawner, events, lambda: next(generations), Log(),
                      clock=clock, sched_reader=sched_reader)


class SlotModel(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.clock = Clock(1000.0)
        self.spawner = FakeSpawner(self.clock, tempfile.mkdtemp(prefix="slot-model-"))
        self.events = Events()
        self.slot = build_slot(self.clock, self.spawner, self.events)
        self.stopped = False
        self.slot.transition(self.now)

    @property
    def now(self) -> float:
        return self.clock.t

    # --- time and the operator ------------------------------------------------------------------------
    @rule(dt=st.sampled_from([0.0, 0.1, 1.0, 2.5, 4.0, 11.0, 25.0, 70.0]))
    def time_passes(self, dt):
        self.clock.t += dt
        self.slot.transition(self.now)

    @precondition(lambda self: not self.stopped)
    @rule()
    def reload(self):
        self.slot.reload()

    @precondition(lambda self: not self.stopped)
    @rule(kind=st.sampled_from(["raise", "segfault", "hang"]), at=st.sampled_from(["start", "stage:model"]))
    def drill(self, kind, at):
        self.slot.drill(kind, at)

    @precondition(lambda self: not self.stopped)
    @rule()
    def cancel_that_the_worker_ignores(self):
        self.slot.restart("cancel")

    @precondition(lambda self: not self.stopped)
    @rule()
    def send_fails(self):
        self.slot.worker_unreachable("socket refused")

    @rule()
    def stop(self):
        self.stopped = True
        self.slot.stop(1.0)
        self.slot.transition(self.now)

    # --- processes ending -------------------------------------------------------------------------------
    @rule(outcome=st.sampled_from(["ok", "failed", "killed", "crashed", "as_asked"]))
    def probe_exits(self, outcome):
        for proc in self.spawner.alive("probe"):
            if outcome == "ok":
                proc.end(0, {"ok": True, "stages": ["detector"]})
            elif outcome == "failed":
                proc.end(exitcodes.EX_LOAD_FAILED, {"ok": False, "cause": "load_failure", "stage": "detector"})
            elif outcome == "killed":
                proc.end(-signal.SIGKILL)
            elif outcome == "crashed":
                proc.end(-signal.SIGSEGV, {"ok": False, "stage": "detector"})
            else:
                proc.end_as_asked()

    @rule(code=st.sampled_from(EXIT_CODES), as_asked=st.booleans())
    def worker_exits(self, code, as_asked):
        for proc in self.spawner.alive("worker"):
            proc.end_as_asked() if as_asked and proc.signals else proc.end(code)

    # --- messages from the worker, in any state ----------------------------------------------------------
    @precondition(lambda self: self.slot.proc is not None)
    @rule(message=st.sampled_from(["hello", "hb", "stage_start", "stage_end", "ready", "dying"]))
    def worker_says(self, message):
        bodies = {
            "hello": (P.T.HELLO, P.Hello(pid=1)),
            "hb": (P.T.HEARTBEAT, P.Heartbeat(rss=100)),
            "stage_start": (P.T.STAGE, P.StageEvent(name="model", event="start")),
            "stage_end": (P.T.STAGE, P.StageEvent(name="model", event="end", duration_s=0.1)),
            "ready": (P.T.READY, P.Ready(engine={"name": "noop", "device": "cpu"}, stages=["model"])),
            "dying": (P.T.DYING, P.DyingReport(cause="python_exception", stage="frame", frame=3)),
        }
        self.slot.on_message(*bodies[message], self.now)

    @rule()
    def job_dispatched(self):
        self.slot.job_started(self.now)  # the job runner asks; the slot says whether it may

    @rule()
    def frame_stored(self):
        self.slot.progressed(self.now, frame=True)

    @rule()
    def job_ends(self):
        self.slot.job_finished()

    # --- what must always hold -----------------------------------------------------------------------------
    @invariant()
    def at_most_one_worker_and_one_probe(self):
        if not hasattr(self, "slot"):
            return
        assert len(self.spawner.alive("worker")) <= 1
        assert len(self.spawner.alive("probe")) <= 1

    @invariant()
    def every_live_process_is_owned(self):
        if not hasattr(self, "slot"):
            return
        owned = {id(self.slot.proc), id(self.slot.probe.proc) if self.slot.probe else None}
        for proc in self.spawner.procs:
            assert not proc.alive() or id(proc) in owned, f"{proc.kind} {proc.pid} alive but not owned"

    @invariant()
    def states_agree_with_processes(self):
        if not hasattr(self, "slot"):
            return
        slot = self.slot
        if slot.state is S.PROBING:
            assert slot.probe is not None and slot.probe.purpose == "boot"
        if slot.state in (S.SPAWNING, S.LOADING, S.READY, S.BUSY):
            assert slot.proc is not None

    @invariant()
    def never_stuck(self):
        """Left alone with healthy processes and time passing, it serves (a copy is left alone, so the
        sequence under test goes on undisturbed)."""
        if not hasattr(self, "slot") or self.stopped:
            return
        world = World.copy_of(self.slot, self.spawner, self.clock)
        generation_before = world.slot.generation
        replacing = any(p.kind == "worker" and p.alive() and p.kill_reason for p in world.spawner.procs)
        world.settle()
        assert world.slot.state is S.READY, f"stuck in {world.slot.life.label()}"
        if replacing:
            assert world.slot.generation > generation_before, "a stopped worker was not replaced"

    def teardown(self):
        if hasattr(self, "slot") and not self.stopped:
            self.stop()
            for proc in self.spawner.alive("probe") + self.spawner.alive("worker"):
                proc.end_as_asked()
            self.slot.transition(self.now)
            assert not self.spawner.alive("worker") and not self.spawner.alive("probe")


class World:
    """A copy of the slot and its processes, for asking "what if nothing else went wrong now"."""

    def __init__(self, slot, spawner, clock):
        self.slot, self.spawner, self.clock = slot, spawner, clock

    @classmethod
    def copy_of(cls, slot, spawner, clock) -> "World":
        shared = {id(slot.metrics): slot.metrics, id(slot.log): slot.log}
        slot, spawner, clock = copy.deepcopy((slot, spawner, clock), shared)
        spawner.directory = tempfile.mkdtemp(prefix="slot-settle-")
        for proc in spawner.procs:  # each copy reads and writes its own probe reports
            if proc.out:
                moved = os.path.join(spawner.directory, os.path.basename(proc.out))
                if os.path.exists(proc.out):
                    with open(proc.out) as src, open(moved, "w") as dst:
                        dst.write(src.read())
                proc.out = moved
        if slot.probe is not None:
            slot.probe.out = slot.probe.proc.out
        return cls(slot, spawner, clock)

    def settle(self):
        slot = self.slot
        for _ in range(SETTLE_STEPS):
            if slot.state is S.READY and not any(p.alive() and p.kill_reason for p in self.spawner.procs):
                break
            self.cooperate()
            self.clock.t += 1.0
            slot.transition(self.clock.t)
            if slot.state is S.FATAL and "cannot fix" in (slot.fatal_reason() or ""):
                slot.reload()  # no retry timer left: only an operator helps, and one must
        for proc in self.spawner.procs:
            assert proc.code is None or proc.polled_dead, f"{proc.kind} {proc.pid} ended but was never reaped"

    def cooperate(self):
        """One beat of a healthy world: asked processes end, probes pass, workers load and serve."""
        for proc in self.spawner.alive("probe"):
            proc.end_as_asked() if proc.signals else proc.end(0, {"ok": True, "stages": ["detector"]})
        for proc in self.spawner.alive("worker"):
            if proc.signals:
                proc.end_as_asked()
        slot, now = self.slot, self.clock.t
        if slot.proc is None or not slot.proc.alive():
            return
        slot.on_message(P.T.HEARTBEAT, P.Heartbeat(rss=1), now)
        if slot.state is S.SPAWNING:
            slot.on_message(P.T.HELLO, P.Hello(pid=slot.proc.pid), now)
        elif slot.state is S.LOADING:
            slot.on_message(P.T.READY, P.Ready(engine={"name": "noop"}, stages=[]), now)
        elif slot.state is S.BUSY:
            slot.job_finished()


TestSlotModel = SlotModel.TestCase
TestSlotModel.settings = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# --- the sequences it found, kept as plain regressions -----------------------------------------------------
@pytest.fixture
def world():
    clock = [1000.0]
    spawner = FakeSpawner(lambda: clock[0], tempfile.mkdtemp(prefix="slot-regression-"))
    events = Events()
    return build_slot(lambda: clock[0], spawner, events), spawner, events, clock


def test_a_reload_while_a_finished_probe_awaits_reaping_does_not_wedge_the_slot(world):
    """The outside attack's hang: restart() moved PROBING -> DRAINING, the probe had already exited 0,
    after_probe_ok acted only in PROBING, and nothing moved DRAINING on: `loading` for good."""
    slot, spawner, _, clock = world
    slot.transition(clock[0])
    probe = spawner.alive("probe")[0]
    probe.end(0, {"ok": True})           # exits 0 between two ticks ...
    slot.reload()                          # ... and a reload arrives before it is reaped
    slot.transition(clock[0])
    assert slot.state is not S.DRAINING
    clock[0] += 1
    slot.transition(clock[0])
    assert slot.state is S.PROBING and spawner.alive("probe"), "a fresh probe judges the new configuration"


def test_a_probe_that_passed_for_the_old_configuration_is_not_trusted_after_a_drill(world):
    slot, spawner, _, clock = world
    slot.transition(clock[0])
    spawner.alive("probe")[0].end(0, {"ok": True})
    slot.drill("segfault", "stage:detector")
    slot.transition(clock[0])
    assert 0 not in slot.probed_ok


def probe_report(proc: FakeProc, stages: list[str]) -> None:
    """What gpu_worker/probe.py writes as it goes: the stage it is in and those it began."""
    with open(proc.out, "w") as fh:
        json.dump({"stage": stages[-1] if stages else "start", "ok": False,
                   "stages": [{"name": name, "result": "running"} for name in stages]}, fh)


def killed_once_past(slot, probe: FakeProc, clock: list[float], limit_s: float) -> str:
    """The probe lives a second short of `limit_s` more, and is killed a second past it: why."""
    clock[0] += limit_s - 1
    slot.transition(clock[0])
    assert probe.kill_reason is None, probe.kill_reason
    clock[0] += 2
    slot.transition(clock[0])
    assert probe.kill_reason
    return probe.kill_reason


def test_a_probe_starts_up_within_the_workers_hello_time_and_its_stages_are_timed_from_the_first(world):
    """A cold import before the probe's first stage (torch on a busy disk) is a worker's start-up, not
    a stage: it was timed against the stage's deadline from spawn, and a sound probe could be killed as hung."""
    slot, spawner, _, clock = world
    deadlines = slot.cfg.deadlines
    deadlines.stages["runtime"] = runtime_s = 20.0  # shorter than the start-up allowed (hello_s, 60 s)
    slot.transition(clock[0])
    probe = spawner.alive("probe")[0]
    slow_start = runtime_s + 1
    clock[0] += slow_start
    slot.transition(clock[0])
    probe_report(probe, ["runtime"])
    slot.transition(clock[0])
    assert "probe stage runtime exceeded" in killed_once_past(slot, probe, clock, runtime_s)


def test_a_probe_that_never_reaches_its_first_stage_is_killed_after_the_hello_time(world):
    slot, spawner, _, clock = world
    slot.transition(clock[0])
    probe = spawner.alive("probe")[0]
    assert "probe start-up exceeded" in killed_once_past(slot, probe, clock, slot.cfg.deadlines.hello_s)


def test_a_failed_send_while_draining_is_not_an_illegal_move(world):
    slot, spawner, _, clock = world
    slot.transition(clock[0])
    spawner.alive("probe")[0].end(0, {"ok": True})
    slot.transition(clock[0])
    assert slot.state is S.SPAWNING
    slot.restart("reload")
    slot.proc.kill_reason = None           # a stop that was sent by someone else: still draining
    slot.worker_unreachable("socket refused")
    assert slot.state is S.DRAINING


# --- liveness that load cannot fool ------------------------------------------------------------------------
class Sched:
    """A scripted /proc schedstat: what the worker's threads did with the wall time."""

    def __init__(self):
        self.cpu, self.waits = 0.0, {1: 0.0, 2: 0.0}

    def __call__(self, pid):
        return SchedSample(self.cpu, dict(self.waits))


def busy_worker(clock, sched, steps: int, wall_per_step: float, waited: float, cpu: float):
    """Advance the clock, the worker's waits for a CPU and its CPU time together."""
    for _ in range(steps):
        clock[0] += wall_per_step
        sched.waits[1] += waited
        sched.cpu += cpu


@pytest.fixture
def live_world():
    clock, sched = [1000.0], Sched()
    spawner = FakeSpawner(lambda: clock[0], tempfile.mkdtemp(prefix="slot-live-"))
    slot = build_slot(lambda: clock[0], spawner, Events(), sched_reader=sched)
    slot.cfg.probe.enabled = False
    slot.transition(clock[0])
    slot.on_message(P.T.HELLO, P.Hello(pid=1), clock[0])
    slot.on_message(P.T.READY, P.Ready(engine={"name": "noop"}), clock[0])
    assert slot.ready
    return slot, sched, clock


def warm_frames(slot, clock, sched, count=10, frame_s=0.05):
    slot.job_started(clock[0])
    for _ in range(count):
        clock[0] += frame_s
        sched.cpu += frame_s
        slot.on_message(P.T.HEARTBEAT, P.Heartbeat(), clock[0])
        slot.progressed(clock[0], frame=True)


def test_a_worker_starved_of_cpu_is_slow_not_hung(live_world):
    slot, sched, clock = live_world
    warm_frames(slot, clock, sched)
    # 8 busy processes on 2 cores: 10 s of wall time, 9 of them waiting for a CPU, no beat arrives
    for _ in range(20):
        busy_worker(clock, sched, 1, 0.5, 0.45, 0.05)
        assert slot.overdue(clock[0]) is None


def test_a_frame_spread_over_a_starved_thread_pool_is_slow_not_hung(live_world):
    """The main thread sleeps while two pool threads take turns waiting for a CPU: each waits only
    part of the time, together nearly all of it (the CI hog's false `hang`, with the longest wait)."""
    slot, sched, clock = live_world
    warm_frames(slot, clock, sched)
    for _ in range(20):
        clock[0] += 0.5
        sched.waits[1] += 0.24
        sched.waits[2] += 0.22
        sched.cpu += 0.04
        assert slot.overdue(clock[0]) is None


def test_a_sleeping_deadlock_is_a_hang_within_seconds(live_world):
    slot, sched, clock = live_world
    warm_frames(slot, clock, sched)
    for _ in range(8):  # idle host: no waits, no CPU, no beats
        clock[0] += 0.5
        slot.run_clock.mark(clock[0])
    assert "no heartbeat" in (slot.overdue(clock[0]) or "")


def test_native_code_holding_the_gil_is_judged_by_its_progress_deadline(live_world):
    slot, sched, clock = live_world
    warm_frames(slot, clock, sched)
    limit = slot.pace.limit_s()
    steps = int(limit / 0.5) - 1
    for _ in range(steps):  # computing flat out, heartbeat thread starved of the GIL
        busy_worker(clock, sched, 1, 0.5, 0.0, 0.5)
        assert slot.overdue(clock[0]) is None
    busy_worker(clock, sched, 4, 0.5, 0.0, 0.5)
    assert "no frame progress" in (slot.overdue(clock[0]) or "")


def test_a_computing_idle_worker_is_caught_at_the_busy_silence_limit(live_world):
    slot, sched, clock = live_world
    limit = slot.cfg.supervisor.busy_silence_s
    busy_worker(clock, sched, int(limit / 0.5) - 2, 0.5, 0.0, 0.5)
    assert slot.overdue(clock[0]) is None
    busy_worker(clock, sched, 4, 0.5, 0.0, 0.5)
    assert "while computing" in (slot.overdue(clock[0]) or "")


# --- the GPU memory plan at start and before a step-up -------------------------------------------------------
def gpu_world(total_mb: float, free_mb: float):
    from configs import load_config
    from pose_common.memplan import GpuFacts
    from supervisor.slot import WorkerSlot

    cfg = load_config(["engine.name=noop", "probe.enabled=false", "supervisor.step_up_after_s=5"], config_name="gpu")
    clock = Clock(1000.0)
    spawner = FakeSpawner(clock, tempfile.mkdtemp(prefix="slot-gpu-"))
    card = {"free": free_mb}
    slot = WorkerSlot(cfg, [dict(r) for r in cfg.ladder], spawner, Events(), iter(range(1, 100)).__next__, Log(),
                      clock=clock, sched_reader=lambda pid: None,
                      gpu_facts=lambda device: GpuFacts(total_mb=total_mb, free_mb=card["free"]))
    return slot, spawner, clock, card


def test_a_6_gb_card_starts_on_the_rung_that_fits_and_says_it_is_ready_not_degraded():
    slot, spawner, clock, _ = gpu_world(6144, 5900)
    assert slot.rung_index == 1 and "regnety" in slot.rung_label()
    slot.transition(clock())
    slot.on_message(P.T.HELLO, P.Hello(pid=1), clock())
    slot.on_message(P.T.READY, P.Ready(engine={"name": "hmr2_phalp"}), clock())
    assert slot.health()["status"] == "ready"
    assert "rung 0 needs" in slot.describe()["memory_plan"]["start"]["reason"]


def test_an_8_gb_card_starts_on_vitdet_in_fp16():
    slot, *_ = gpu_world(8192, 7900)
    assert slot.rung_index == 0 and "vitdet" in slot.rung_label()
    assert slot.describe()["memory_plan"]["start"]["precision"] == "fp16"


def test_a_24_gb_card_starts_on_vitdet():
    slot, *_ = gpu_world(24576, 24000)
    assert slot.rung_index == 0 and "vitdet" in slot.rung_label()


@pytest.mark.parametrize("free_mb", [24000, 7900])
def test_the_worker_is_told_the_precision_the_plan_chose_not_left_to_read_nvml_again(free_mb):
    slot, spawner, clock, _ = gpu_world(24576, free_mb)
    slot.transition(clock())
    planned = slot.describe()["memory_plan"]["start"]
    told = spawner.rungs[-1]
    assert told["options"]["precision"] == planned["precision"] and planned["precision"] != "auto", (told, planned)
    assert slot.ladder[slot.rung_index].get("options", {}).get("precision", "auto") == "auto", "the ladder is unchanged"


def test_a_step_up_probe_waits_until_it_fits_beside_the_worker_and_says_why():
    slot, spawner, clock, card = gpu_world(24576, 24000)
    slot.transition(clock())
    slot.on_message(P.T.HELLO, P.Hello(pid=1), clock())
    slot.on_message(P.T.READY, P.Ready(engine={"name": "hmr2_phalp"}), clock())
    slot.step_down("test: the rung above failed")   # now on RegNetY, the worker holding its memory
    slot.restart("step_up")
    spawner.alive("worker")[0].end(0)
    clock.t += 1
    slot.transition(clock())
    slot.on_message(P.T.HELLO, P.Hello(pid=1), clock())
    slot.on_message(P.T.READY, P.Ready(engine={"name": "hmr2_phalp"}), clock())
    assert slot.health()["status"] == "degraded"
    card["free"] = 3000                              # another program holds the card
    clock.t += 10
    slot.transition(clock())
    assert slot.probe is None and "waiting" in slot.describe()["memory_plan"]["step_up"]
    card["free"] = 20000
    clock.t += 10
    slot.transition(clock())
    assert slot.probe is not None and slot.probe.purpose == "step_up" and slot.probe.rung_index == 0


# --- plain examples ------------------------------------------------------------------------------------------
@pytest.fixture
def slot_parts():
    from configs import load_config
    from supervisor.slot import WorkerSlot

    cfg = load_config(["engine.name=noop", "probe.enabled=false", "supervisor.fatal_retry_s=10"])
    clock = Clock(100.0)
    spawner, events = FakeSpawner(clock, tempfile.mkdtemp(prefix="slot-unit-")), Events()
    slot = WorkerSlot(cfg, [{"engine": "noop", "device": "cpu"}], spawner, events, iter(range(1, 1000)).__next__,
                      Log(), clock=clock, sched_reader=lambda pid: None)
    return slot, spawner, events, clock


def hello_ready(slot, now):
    slot.on_message(P.T.HELLO, P.Hello(pid=1), now)
    slot.on_message(P.T.READY, P.Ready(engine={"name": "noop"}, stages=["runtime", "model"]), now)


def test_the_slot_ignores_and_counts_messages_that_do_not_fit_its_state(slot_parts):
    slot, spawner, events, clock = slot_parts
    slot.transition(clock())
    assert slot.state is S.SPAWNING
    slot.on_message(P.T.READY, P.Ready(engine={}), clock())          # READY before HELLO
    slot.restart("reload")                                               # a reload while spawning
    assert slot.state is S.DRAINING
    slot.on_message(P.T.HELLO, P.Hello(pid=1), clock())                # the drained worker says hello late
    slot.on_message(P.T.STAGE, P.StageEvent(name="model", event="start"), clock())
    assert slot.ignored == {"ready@spawning": 1, "hello@draining": 1, "stage@draining": 1}
    spawner.procs[-1].code = 0
    slot.transition(clock())
    assert events.seen == [("stopped", "reload")] and slot.state is S.SPAWNING and slot.generation == 2


def test_the_slot_death_goes_exit_cause_policy_and_backs_off(slot_parts):
    slot, spawner, events, clock = slot_parts
    slot.transition(clock())
    hello_ready(slot, clock())
    assert slot.ready and slot.stage_names == ["runtime", "model"]
    spawner.procs[-1].code = -signal.SIGSEGV
    slot.transition(clock())
    assert events.seen == [("died", "segfault")]
    assert slot.state is S.SPAWNING and slot.generation == 2  # the first restart is immediate


def test_the_slot_load_failure_is_fatal_and_retried_once_not_forever(slot_parts):
    slot, spawner, events, clock = slot_parts
    for round_ in range(3):
        slot.transition(clock())
        slot.on_message(P.T.HELLO, P.Hello(pid=1), clock())
        spawner.procs[-1].code = exitcodes.EX_LOAD_FAILED
        slot.transition(clock())
        assert slot.state is S.FATAL
        clock.t += 11  # past supervisor.fatal_retry_s
        slot.transition(clock())
        if round_ == 0:
            assert slot.state is S.EXITED  # one retry, in case someone fixed the files
    assert slot.state is S.FATAL and "a restart cannot fix this" in slot.health()["reason"]
    assert len(spawner.procs) == 2


def test_frame_pace_keeps_the_long_deadline_for_the_first_frames_then_adapts():
    from supervisor.liveness import FramePace

    pace = FramePace(first_s=60, warmup=5, floor_s=3, factor=20)
    pace.restart(0.0)
    for i in range(4):
        pace.frame(0.04 * (i + 1))
    assert pace.limit_s() == 60
    for i in range(4, 30):
        pace.frame(0.04 * (i + 1))
    assert pace.limit_s() == 3  # 20 x 40 ms is below the floor
    slow = FramePace(first_s=60, warmup=5, floor_s=3, factor=20)
    slow.restart(0.0)
    for i in range(10):
        slow.frame(0.5 * (i + 1))
    assert slow.limit_s() == pytest.approx(10.0)  # a healthy 0.5 s/frame GPU worker gets 10 s
