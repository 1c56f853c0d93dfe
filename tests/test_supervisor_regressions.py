"""The supervisor's known holes and what its model check (tests/test_supervisor_model.py) found,
each kept as a plain, named example on the same fake world: the real Supervisor, JobRunner,
WorkerSlot, ChildProcess and SQLite ledger; fake sockets, workers and clock."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from test_supervisor_model import FRAMES, World

from pose_common import protocol as P
from supervisor.states import WorkerState as S


@pytest.fixture
def world(request):
    made: list[World] = []

    def make(*overrides: str) -> World:
        made.append(World(overrides))
        return made[-1]
    yield make
    for world_ in made:
        world_.close()


def beat(world: World, dt: float = 1.0, say_next: bool = True) -> None:
    """One second of a worker that is alive (heartbeats) and, if `say_next`, goes on with its work."""
    worker = world.worker
    if worker is not None:
        world.from_worker(worker, worker.envelope(P.T.HEARTBEAT, {"rss": 1}))
        message = worker.next_message() if say_next else None
        if message is not None:
            world.from_worker(worker, message)
    world.tick(dt)


def ready(world: World) -> None:
    world.run_until(lambda: world.sup.slot.ready)


def restart_causes(world: World, job_id: str) -> list[str]:
    return world.ledger.real.attempt_causes(job_id)


# --- B1: an image the ready worker never answers --------------------------------------------------------------
def test_an_image_the_ready_worker_never_answers_replaces_it_within_the_image_deadline(world):
    """Before: 504 after the image deadline, the slot stayed `ready` with the same worker, the next
    video job waited for the frame deadline, the worker was killed as `hang` and the death charged
    to that job (attempts 2)."""
    w = world("deadlines.image_s=10")
    ready(w)
    hung = w.worker
    req = w.request(P.T.IMAGE, {}, blobs=[b"jpeg"])
    w.tick()
    for _ in range(11):  # alive (heartbeats) but never answers the image; health is answered throughout
        assert w.ask(P.T.HEALTH).status == 200
        beat(w, 1.0, say_next=False)
    assert w.wire.replies[req].status == 504
    assert signal.SIGABRT in hung.popen.signals, "the worker stuck on the image was not replaced"
    hung.popen.obey()
    w.tick()
    crash = w.ledger.real.crashes(limit=1)[0]
    assert crash["cause"] == "hang" and crash["stage"] == "image" and "image" in crash["summary"]
    job_id = w.submit()
    w.run_until(lambda: w.job(job_id).state == "done")
    assert w.job(job_id).attempts == 1 and restart_causes(w, job_id) == []


def test_a_job_dispatched_behind_a_hung_image_is_not_charged_with_its_death(world):
    w = world("deadlines.image_s=10")
    ready(w)
    w.worker.images.append("stuck")  # the worker takes the image, then never answers it
    w.request(P.T.IMAGE, {}, blobs=[b"jpeg"])
    w.tick()
    job_id = w.submit()  # sent to the same worker, which never gets to it
    assert w.sup.jobs.current == job_id
    for _ in range(12):
        beat(w, 1.0, say_next=False)
    for worker in w.workers:
        worker.popen.obey()
    w.tick()
    assert w.job(job_id).state == "queued" and w.job(job_id).attempts == 0
    w.run_until(lambda: w.job(job_id).state == "done")
    assert w.job(job_id).attempts == 1


# --- B2: a worker that survives SIGKILL ----------------------------------------------------------------------
def test_a_worker_that_survives_sigkill_is_abandoned_and_its_job_goes_back_charged_and_named(world):
    """Before: SIGKILL re-sent every tick, the slot busy and the job's lease renewed for ever."""
    w = world("supervisor.unkillable_after_s=20")
    ready(w)
    job_id = w.submit()
    w.run_until(lambda: len(w.ledger.real.stored_indices(job_id)) == 2)
    stuck = w.worker
    stuck.popen.uninterruptible = True  # in a driver call: no heartbeat, no frame, SIGKILL does nothing
    for _ in range(int(w.cfg.deadlines.frame_s + w.cfg.supervisor.abort_grace_s + 25)):
        w.tick(1.0)
    assert signal.SIGKILL in stuck.popen.signals and stuck.popen.returncode is None
    assert w.sup.slot.proc is None or w.sup.slot.proc.pid != stuck.popen.pid, "still waiting for it"
    assert w.job(job_id).state in ("queued", "running") and w.job(job_id).attempts >= 1
    assert restart_causes(w, job_id) == ["unkillable"]
    crash = w.ledger.real.crashes(limit=1)[0]
    assert crash["cause"] == "unkillable" and "SIGKILL" in crash["summary"] and crash["exit_code"] is None
    w.run_until(lambda: w.job(job_id).state == "done")
    assert w.job(job_id).attempts == 2
    stuck.popen.uninterruptible = False
    stuck.popen.obey()
    w.tick()
    assert w.sup.slot.abandoned == [], "an abandoned worker that finally ends is reaped"


# --- B3: a full send queue ------------------------------------------------------------------------------------
SEND_TO_A_WORKER_THAT_DOES_NOT_READ = textwrap.dedent("""
    import os, sys, tempfile, threading
    import zmq
    from configs import load_config
    from pose_common import protocol as P
    from supervisor.arbiter import Supervisor

    state = tempfile.mkdtemp()
    cfg = load_config(["engine.name=noop", f"state_dir={state}"])
    sup = Supervisor(cfg)
    peer = zmq.Context()
    dealer = peer.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, P.worker_identity(sup.slot.generation))
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.connect(P.endpoints(cfg.runtime_dir).worker)
    dealer.send_multipart(P.pack(P.Envelope(P.T.HEARTBEAT, {}, gen=sup.slot.generation)))
    sup.route_messages(timeout_ms=2000)  # the supervisor knows the peer now
    results = []

    def flood():
        for _ in range(5000):  # the worker reads none of it
            results.append(sup.send_worker(P.T.STOP_JOB, job="j" * 16, blobs=[b"x" * 65536]))
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(20)
    print("blocked" if sender.is_alive() else f"returned refused={results.count(False)}", flush=True)
    os._exit(0)
""")


def test_a_full_send_queue_to_the_worker_never_blocks_the_loop():
    """Before: ROUTER_MANDATORY without NOBLOCK: a worker that stops reading blocked the whole loop."""
    done = subprocess.run([sys.executable, "-c", SEND_TO_A_WORKER_THAT_DOES_NOT_READ], capture_output=True,
                          text=True, timeout=120)
    said = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert said.startswith("returned"), said
    assert int(said.split("refused=")[1]) > 0, "the queue never filled: the test proves nothing"


def test_a_send_that_would_block_is_a_failed_send_and_the_worker_is_replaced(world):
    w = world()
    ready(w)
    first = w.worker
    w.wire.refuse_next = "would_block"
    job_id = w.submit()
    assert w.sup.jobs.current is None and first.popen.signals == [signal.SIGTERM]
    w.run_until(lambda: w.job(job_id).state == "done")
    assert w.job(job_id).attempts == 1


# --- B4: attempts only for deaths ------------------------------------------------------------------------------
def test_a_dispatch_that_never_reached_the_worker_is_not_charged(world):
    """Before: claim counted the attempt and release kept it: attempts 1 for a job no worker saw."""
    w = world()
    ready(w)
    w.wire.refuse_next = "unreachable"
    job_id = w.submit()
    assert w.job(job_id).state == "queued" and w.job(job_id).attempts == 0
    w.run_until(lambda: w.job(job_id).state == "done")
    assert w.job(job_id).attempts == 1


def test_an_outage_reclaim_is_not_charged(world):
    """Before: the job stopped for an outage stayed `running` under our name and its re-claim counted
    a second attempt with no death."""
    w = world()
    ready(w)
    job_id = w.submit()
    w.run_until(lambda: len(w.ledger.real.stored_indices(job_id)) == 1)
    w.ledger.down = True
    for _ in range(5):
        beat(w)  # the worker is told to stop; frames are not stored meanwhile
    w.ledger.down = False
    w.run_until(lambda: w.job(job_id).state == "done")
    assert w.job(job_id).attempts == 1


# --- found by the model check ----------------------------------------------------------------------------------
def test_a_job_whose_frames_are_all_stored_ends_done_when_the_supervisor_died_before_done(world):
    """Model check: a crash between the last frame and `done` sent the job to a new worker with
    start_frame past the end; the worker (rightly) found no frame there and the job failed."""
    w = world()
    ready(w)
    job_id = w.submit()
    w.run_until(lambda: len(w.ledger.real.stored_indices(job_id)) == FRAMES)
    w.crash()
    w.run_until(lambda: w.job(job_id).state in ("done", "error"))
    assert w.job(job_id).state == "done", w.job(job_id).error


def test_a_job_whose_frames_are_all_stored_is_not_given_up_when_its_worker_dies_before_done(world):
    w = world("jobs.max_attempts=1")
    ready(w)
    job_id = w.submit()
    w.run_until(lambda: len(w.ledger.real.stored_indices(job_id)) == FRAMES)
    w.worker.popen.end(-signal.SIGSEGV)
    w.run_until(lambda: w.job(job_id).state in ("done", "error"))
    assert w.job(job_id).state == "done", w.job(job_id).error


def test_a_graceful_stop_during_an_outage_gives_back_the_stopped_job_uncharged(world):
    """Model check: the job stopped for an outage left the worker; a graceful restart before the
    ledger was probed again left it `running`, and boot's requeue kept the attempt."""
    w = world()
    ready(w)
    job_id = w.submit()
    w.run_until(lambda: len(w.ledger.real.stored_indices(job_id)) == 1)
    w.ledger.fail_writes = 1
    for _ in range(3):
        beat(w, 0.1)
    assert w.sup.keeper.outage and w.sup.jobs.current is None
    w.stop_gracefully()
    assert w.job(job_id).state == "queued" and w.job(job_id).attempts == 0


def test_a_done_whose_write_fails_frees_the_worker_and_finishes_the_job_when_the_ledger_is_back(world):
    """Model check: `done` with a failing write left the slot busy with the job on a worker that was
    idle, so it was killed as hung a minute later and charged to the job."""
    w = world()
    ready(w)
    job_id = w.submit()
    w.run_until(lambda: len(w.ledger.real.stored_indices(job_id)) == FRAMES)
    w.ledger.fail_writes = 1
    beat(w)  # job_done arrives; its first write fails
    assert w.sup.slot.state is not S.BUSY
    w.run_until(lambda: w.job(job_id).state == "done")
    assert w.job(job_id).attempts == 1 and w.deaths == []


# --- a drill arms the next worker, not the service's own config -----------------------------------------------
def test_a_drill_arms_the_children_config_and_leaves_the_services_own_untouched(world):
    world = world()
    ready(world)
    world.sup.slot.drill("segfault", "start")
    assert world.sup.cfg.fault.kind is None, "the drill rewrote the shared config"
    armed = world.sup.child_config()
    assert (armed.fault.kind, armed.fault.at, armed.fault.times) == ("segfault", "start", 1)
    assert armed is not world.sup.cfg and armed.engine.name == world.sup.cfg.engine.name
