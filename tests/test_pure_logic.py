"""Pure logic with a fake clock and fake process ends: restart policy, exit decoding, state machine,
the wire protocol, the ledger."""
from __future__ import annotations

import signal
import time

import msgpack
import pytest

from gpu_worker.errors import classify
from pose_common import exitcodes
from pose_common import protocol as P
from pose_common.ledger import Ledger
from supervisor.causes import Death, decode_exit
from supervisor.policy import RestartPolicy
from supervisor.states import IllegalTransition, WorkerLifecycle
from supervisor.states import WorkerState as S


# --- restart policy -------------------------------------------------------------------------------
def test_backoff_is_immediate_then_doubles_to_the_cap():
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4, intensity=100, period_s=60)
    delays = []
    for t in range(7):
        policy.record(float(t), "segfault", counts=True)
        delays.append(policy.decide(float(t), "segfault", retry=True, has_lower_rung=False).delay_s)
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_intensity_steps_down_then_goes_fatal_on_the_last_rung():
    policy = RestartPolicy(intensity=3, period_s=60)
    decisions = []
    for t in (0.0, 10.0, 20.0):
        policy.record(t, "cuda_oom", counts=True)
        decisions.append(policy.decide(t, "cuda_oom", retry=True, has_lower_rung=True).action)
    assert decisions == ["restart", "restart", "step_down"]
    policy.reset()
    for t in (100.0, 101.0, 102.0):
        policy.record(t, "cuda_sticky", counts=True)
        last = policy.decide(t, "cuda_sticky", retry=True, has_lower_rung=False)
    assert last.action == "fatal" and "3 deaths in 60s" in last.reason


def test_deaths_outside_the_window_do_not_count():
    policy = RestartPolicy(intensity=3, period_s=60)
    for t in (0.0, 50.0, 120.0, 180.0):
        policy.record(t, "segfault", counts=True)
        assert policy.decide(t, "segfault", retry=True, has_lower_rung=False).action == "restart"


def test_load_failure_never_loops():
    policy = RestartPolicy()
    policy.record(0.0, "load_failure", counts=False)
    assert policy.decide(0.0, "load_failure", retry=False, has_lower_rung=False).action == "fatal"
    assert policy.decide(0.0, "load_failure", retry=False, has_lower_rung=True).action == "step_down"


def test_ready_worker_resets_backoff():
    policy = RestartPolicy(backoff_initial_s=1)
    for t in range(3):
        policy.record(float(t), "abort", counts=False)
    policy.healthy()
    policy.record(10.0, "abort", counts=False)
    assert policy.decide(10.0, "abort", retry=True, has_lower_rung=False).delay_s == 0.0


# --- exit decoding --------------------------------------------------------------------------------
@pytest.mark.parametrize("returncode,expected", [
    (-signal.SIGSEGV, "segfault"), (-signal.SIGABRT, "abort"), (-signal.SIGBUS, "bus_error"),
    (-signal.SIGKILL, "oom_killed"), (255, "wsl_vm_exit"), (4294967295, "wsl_vm_exit"),
    (exitcodes.EX_CUDA_STICKY, "cuda_sticky"), (exitcodes.EX_LOAD_FAILED, "load_failure"), (0, "clean_exit"),
    (17, "exit"),
])
def test_decode_exit_status(returncode, expected):
    assert decode_exit(Death(returncode=returncode)).kind == expected


def test_our_own_kill_is_a_hang_not_an_oom():
    cause = decode_exit(Death(returncode=-signal.SIGKILL, killed_by_us="hang: no heartbeat for 3.1s"))
    assert cause.kind == "hang" and "heartbeat" in cause.summary


def test_oom_kill_names_memory_and_remedy():
    cause = decode_exit(Death(returncode=-9, rss=3 << 30, system_memory={"percent": 97.5}))
    assert "OOM killer" in cause.summary and "97.5%" in cause.summary and "3072 MiB" in cause.summary
    assert ".wslconfig" in cause.remedy


def test_reported_cause_wins_over_exit_status():
    death = Death(returncode=exitcodes.EX_EXCEPTION, reported={"cause": "cuda_oom", "exc_type": "OutOfMemoryError",
                                                              "message": "CUDA out of memory"})
    cause = decode_exit(death)
    assert cause.kind == "cuda_oom" and "OutOfMemoryError" in cause.summary and cause.counts_toward_intensity


def test_worker_classifies_torch_errors_by_type_and_code():
    torch = pytest.importorskip("torch")
    sticky = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    sticky.error_code = 700
    assert classify(sticky, during_load=False) == ("cuda_sticky", exitcodes.EX_CUDA_STICKY)
    assert classify(torch.cuda.OutOfMemoryError("oom"), during_load=True) == ("cuda_oom", exitcodes.EX_CUDA_OOM)
    assert classify(RuntimeError("CUDA something"), during_load=False)[0] == "python_exception"
    assert classify(ImportError("no hmr2"), during_load=True)[0] == "load_failure"
    assert classify(ImportError("late"), during_load=False)[0] == "python_exception"


# --- state machine --------------------------------------------------------------------------------
def test_lifecycle_happy_path_and_history():
    life = WorkerLifecycle()
    for dst, stage in ((S.PROBING, "detector"), (S.SPAWNING, None), (S.LOADING, "runtime"), (S.LOADING, "model"),
                       (S.READY, None), (S.BUSY, None), (S.READY, None), (S.EXITED, None), (S.BACKOFF, None)):
        life.move(dst, "test", stage=stage)
    assert [t.dst for t in life.history][:3] == ["probing", "spawning", "loading"]
    assert life.state is S.BACKOFF


def test_lifecycle_refuses_impossible_moves():
    life = WorkerLifecycle()
    with pytest.raises(IllegalTransition):
        life.move(S.BUSY, "no worker yet")


# --- protocol -------------------------------------------------------------------------------------
def test_protocol_roundtrip_with_binary_part():
    env = P.Envelope(P.T.RUN_IMAGE, {"x": 1}, gen=3, job="j", req="r", blobs=[b"\x00" * 100_000])
    back = P.unpack(P.pack(env))
    assert (back.type, back.body, back.gen, back.job, back.req) == (P.T.RUN_IMAGE, {"x": 1}, 3, "j", "r")
    assert bytes(back.blobs[0]) == b"\x00" * 100_000


@pytest.mark.parametrize("parts", [
    [], [b""], [b"\xc1"], [msgpack.packb([1, 2])], [msgpack.packb({"v": 99, "type": "x", "body": {}})],
    [msgpack.packb({"v": 1, "type": 5, "body": {}})], [msgpack.packb({"v": 1, "type": "x", "body": []})],
    [b"x" * (P.MAX_HEADER_BYTES + 1)], [msgpack.packb({"v": 1, "type": "x", "body": {}})] + [b""] * 20,
])
def test_protocol_rejects_garbage(parts):
    with pytest.raises(P.ProtocolError):
        P.unpack(parts)


# --- ledger ---------------------------------------------------------------------------------------
def test_ledger_frames_exactly_once_and_resume_point(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    job, created = ledger.accept("/v.mp4", idempotency_key="k")
    again, created_again = ledger.accept("/v.mp4", idempotency_key="k")
    assert created and not created_again and again.job_id == job.job_id
    assert ledger.next_frame(job.job_id) == 0
    lease = ledger.claim("host-a", lease_s=60).lease
    for i in (0, 1, 2, 4):
        assert ledger.add_frame(lease, i, i / 30, [])
    assert ledger.add_frame(lease, 2, 2 / 30, [{"dup": True}]) is False  # recomputed after a crash: ignored
    assert ledger.next_frame(job.job_id) == 3 and ledger.frames_done(job.job_id) == 4
    assert ledger.requeue_running() == 1 and ledger.job(job.job_id).state == "queued"
    assert ledger.record_frame_death(job.job_id, 3, "segfault") == 1
    assert ledger.record_frame_death(job.job_id, 3, "abort") == 2
    assert list(ledger.poison_frames(job.job_id, threshold=2)) == [3]


def test_a_lease_taken_over_fences_out_its_old_holder(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    job, _ = ledger.accept("/v.mp4")
    old = ledger.claim("host-a", lease_s=0.01).lease
    assert ledger.add_frame(old, 0, 0.0, [])
    time.sleep(0.02)  # the lease expires: host-a is presumed dead
    new = ledger.claim("host-b", lease_s=60).lease
    assert new.gen == old.gen + 1 and new.owner == "host-b"
    assert ledger.add_frame(old, 1, 0.03, []) is None            # refused: not the holder any more
    assert not ledger.renew(old, 60) and not ledger.finish(old) and not ledger.release(old)
    assert ledger.add_frame(new, 1, 0.03, []) is True
    assert ledger.stored_indices(job.job_id) == {0, 1}


def test_claim_takes_the_oldest_free_job_and_prefers_its_own(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    first, _ = ledger.accept("/a.mp4")
    second, _ = ledger.accept("/b.mp4")
    assert ledger.claim("host-a", 60).job_id == first.job_id
    assert ledger.claim("host-b", 60).job_id == second.job_id   # the first is held
    assert ledger.claim("host-c", 60) is None
    assert ledger.claim("host-a", 60).job_id == first.job_id     # back after an outage: its own again


def test_artifacts_are_taken_over_only_under_an_expired_lease(tmp_path):
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    job, _ = ledger.accept("/v.mp4")
    lease = ledger.claim("host-a", 60).lease
    ledger.add_frame(lease, 0, 0.0, [])
    assert ledger.mark_rendering(lease, 1, "/r.json", None, {})
    assert ledger.claim_render("host-a", 60) is None and ledger.claim_render("host-b", 60) is None
    ledger.requeue_running()  # a new supervisor on this machine: its predecessor's lease is void
    taken = ledger.claim_render("host-b", 60)
    assert taken.job_id == job.job_id and taken.lease.gen == lease.gen + 1
    assert not ledger.finish(lease) and ledger.finish(taken.lease)


def test_ledger_survives_reopen(tmp_path):
    path = str(tmp_path / "l.sqlite3")
    ledger = Ledger(path)
    job, _ = ledger.accept("/v.mp4")
    ledger.add_frame(ledger.claim("a", 60).lease, 0, 0.0, [{"track_id": 1}])
    ledger.close()
    again = Ledger(path)
    assert again.job(job.job_id).state == "running" and again.schema_version() == 2
    assert next(again.iter_frames(job.job_id))["persons"] == [{"track_id": 1}]


# --- the worker slot, with fake processes and a fake clock ---------------------------------------------
class FakeProc:
    def __init__(self, pid: int):
        self.pid, self.code, self.kill_reason, self.signalled_at, self.started = pid, None, None, None, 0.0
        self.escalating = False

    def poll(self):
        return self.code

    def alive(self) -> bool:
        return self.code is None

    def send(self, sig, reason):
        self.kill_reason = self.kill_reason or reason

    def escalate(self, reason, grace):
        self.escalating, self.kill_reason = True, self.kill_reason or reason

    def kill_if_stuck(self, grace):
        pass

    def stderr_tail(self, lines):
        return ""


class FakeSpawner:
    def __init__(self):
        self.spawned: list[FakeProc] = []

    def worker(self, generation, rung):
        self.spawned.append(FakeProc(1000 + generation))
        return self.spawned[-1]

    def probe(self, rung, tag):
        raise AssertionError("probe disabled in these tests")

    def crumb(self, generation):
        return {}


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


@pytest.fixture
def slot_parts():
    from configs import load_config
    from supervisor.slot import WorkerSlot

    cfg = load_config(["engine.name=noop", "probe.enabled=false", "supervisor.fatal_retry_s=10"])
    clock = [100.0]
    generations = iter(range(1, 1000))
    spawner, events = FakeSpawner(), Events()
    slot = WorkerSlot(cfg, [{"engine": "noop", "device": "cpu"}], spawner, events, lambda: next(generations), Log(),
                      clock=lambda: clock[0])
    return slot, spawner, events, clock


def hello_ready(slot, now):
    slot.on_message(P.T.HELLO, P.Hello(pid=1), now)
    slot.on_message(P.T.READY, P.Ready(engine={"name": "noop"}, stages=["runtime", "model"]), now)


def test_slot_ignores_and_counts_messages_that_do_not_fit_its_state(slot_parts):
    slot, spawner, events, clock = slot_parts
    slot.transition(clock[0])
    assert slot.state is S.SPAWNING
    slot.on_message(P.T.READY, P.Ready(engine={}), clock[0])          # READY before HELLO
    slot.restart("reload")                                               # a reload while spawning
    assert slot.state is S.DRAINING
    slot.on_message(P.T.HELLO, P.Hello(pid=1), clock[0])                # the drained worker says hello late
    slot.on_message(P.T.STAGE, P.StageEvent(name="model", event="start"), clock[0])
    assert slot.ignored == {"ready@spawning": 1, "hello@draining": 1, "stage@draining": 1}
    spawner.spawned[-1].code = 0
    slot.transition(clock[0])
    assert events.seen == [("stopped", "reload")] and slot.state is S.SPAWNING and slot.generation == 2


def test_slot_death_goes_exit_cause_policy_and_backs_off(slot_parts):
    slot, spawner, events, clock = slot_parts
    slot.transition(clock[0])
    hello_ready(slot, clock[0])
    assert slot.ready and slot.stage_names == ["runtime", "model"]
    spawner.spawned[-1].code = -signal.SIGSEGV
    slot.transition(clock[0])
    assert events.seen == [("died", "segfault")]
    assert slot.state is S.SPAWNING and slot.generation == 2  # the first restart is immediate


def test_slot_load_failure_is_fatal_and_retried_once_not_forever(slot_parts):
    slot, spawner, events, clock = slot_parts
    for round_ in range(3):
        slot.transition(clock[0])
        slot.on_message(P.T.HELLO, P.Hello(pid=1), clock[0])
        spawner.spawned[-1].code = exitcodes.EX_LOAD_FAILED
        slot.transition(clock[0])
        assert slot.state is S.FATAL
        clock[0] += 11  # past supervisor.fatal_retry_s
        slot.transition(clock[0])
        if round_ == 0:
            assert slot.state is S.EXITED  # one retry, in case someone fixed the files
    assert slot.state is S.FATAL and "a restart cannot fix this" in slot.health()["reason"]
    assert len(spawner.spawned) == 2


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
