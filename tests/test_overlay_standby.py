"""The warm standby overlay process (issue 30): the supervisor keeps one overlay process waiting past
its imports, hands it a job's video as an open descriptor, and starts the next one; a standby that
died, or ended before it took its job, leaves the job to an overlay process of its own. Renders is
driven here as the supervisor's loop drives it, with real processes and a real ledger."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import av
import pytest

from configs import ledger_path, load_config
from pose_common.ledger import Job, Ledger
from pose_common.overlay import STANDBY_NAME, partial_path
from pose_common.runtime import RuntimeDir
from supervisor.arbiter import FINISHING_TICK_S, Supervisor
from supervisor.renders import FINISHING_WINDOW_S, OVERLAY_NICENESS, Renders, idle_class_can_be_left

from support import make_clip, pid_gone, process_name, wait_for

FRAMES = 24
OWNER = "host"


class Log:
    def __init__(self):
        self.events: list[str] = []

    def info(self, event: str, **_fields) -> None:
        self.events.append(event)

    warning = info


class Room:
    """A supervisor's overlay bookkeeping (Renders) over its own ledger, clip and results dir."""

    def __init__(self, tmp: Path, *overrides: str):
        (tmp / "videos").mkdir()
        self.clip = str(make_clip(tmp / "videos" / "clip.mp4", frames=FRAMES))
        self.cfg = load_config([f"state_dir={tmp / 'state'}", f"jobs.allowed_roots=[{tmp / 'videos'}]", *overrides])
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        RuntimeDir(self.cfg.runtime_dir).prepare()
        self.ledger = Ledger(ledger_path(self.cfg))
        self.log = Log()
        self.renders = Renders(self.cfg, self.ledger, OWNER, str(tmp / "results"), self.log)
        os.makedirs(self.renders.results_dir, exist_ok=True)

    def close(self) -> None:
        self.renders.stop_all()
        for render in self.renders.running.values():
            render.proc.wait()
        self.ledger.close()

    def warm_standby(self) -> int:
        """-> the pid of the standby once it waits past its imports."""
        self.renders.reap()
        standby = self.renders.standby
        assert standby is not None, "a standby is started ahead of any job"
        wait_for(lambda: process_name(standby.proc.pid) == STANDBY_NAME, 60, interval=0.05, what="a warm standby")
        return standby.proc.pid

    def dispatched(self) -> Job:
        """A job as the runner dispatches it: claimed, then followed by an overlay process."""
        self.ledger.accept(self.clip)
        job = self.ledger.claim(OWNER, 60)
        assert job is not None and job.lease is not None
        self.renders.follow(job)
        return job

    def store_frames(self, job: Job) -> None:
        """Every frame stored, as the worker stores them; the job not yet marked `rendering`."""
        assert job.lease is not None
        for index in range(FRAMES):
            assert self.ledger.add_frame(job.lease, index, index / 30, [])

    def store_all(self, job: Job) -> None:
        self.store_frames(job)
        assert job.lease is not None and self.ledger.mark_rendering(job.lease, FRAMES, None, None, {})

    def finish(self, job: Job) -> Job:
        """The runner's end of a job (Renders.start), then the loop's reap() until it is done."""
        assert job.lease is not None
        self.renders.start(self.ledger.job(job.job_id), job.lease)
        return self.done(job.job_id)

    def done(self, job_id: str) -> Job:
        return self.reap_until(lambda: (job := self.ledger.job(job_id)) and job.state == "done" and job,
                               "the job done")

    def reap_until(self, predicate, what: str):
        """The loop's reap() each tick until `predicate` holds."""
        def reaped_then_checked():
            self.renders.reap()
            return predicate()
        return wait_for(reaped_then_checked, 60, interval=0.05, what=what)

    def overlay_pid(self, job_id: str) -> int:
        return self.renders.running[job_id].proc.pid


@pytest.fixture
def room(tmp_path):
    built = Room(tmp_path)
    yield built
    built.close()



def has_exited(child: int) -> bool:
    """Every thread of the child has exited (its main thread shows as a zombie before the others do):
    the supervisor's poll() sees it. It is left for the supervisor to reap."""
    return os.waitid(os.P_PID, child, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode()


def decoded_count(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def assert_overlay_whole(job: Job) -> None:
    assert job.overlay_path and decoded_count(job.overlay_path) == FRAMES, job
    assert not job.warning, job.warning


def test_the_standby_started_before_the_job_draws_it_and_a_fresh_one_waits_for_the_next(room):
    """The next standby starts once the job's frames are all stored, before the next job is dispatched:
    started beside the inference, its start-up (a quarter of a CPU-second) was taken from a short job's
    first frames (bench.user_wait)."""
    standby = room.warm_standby()
    assert os.getpriority(os.PRIO_PROCESS, standby) == OVERLAY_NICENESS
    job = room.dispatched()
    assert room.overlay_pid(job.job_id) == standby, "the job's overlay is drawn by the standby"
    room.renders.reap()
    assert room.renders.standby is None, "no standby starts while the job's frames are inferred"
    room.store_all(job)
    room.renders.start(room.ledger.job(job.job_id), job.lease)
    assert room.renders.standby is not None and room.renders.standby.proc.pid != standby, "the next standby"
    assert_overlay_whole(room.done(job.job_id))

    second_standby = room.warm_standby()
    second = room.dispatched()
    assert room.overlay_pid(second.job_id) == second_standby
    room.store_all(second)
    assert_overlay_whole(room.finish(second))
    assert "overlay_standby_lost" not in room.log.events


def scheduling(pid: int) -> set[tuple[str, int]]:
    """The (scheduling class, niceness) of each of the process's threads: the class is a thread's own."""
    classes = {os.SCHED_IDLE: "idle", os.SCHED_OTHER: "normal", os.SCHED_BATCH: "batch"}
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found.add((classes.get(os.sched_getscheduler(int(tid)), "other"), os.getpriority(os.PRIO_PROCESS, int(tid))))
        except ProcessLookupError:
            pass  # a thread that has just ended
    return found


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_the_overlay_gives_way_to_the_worker_in_the_idle_class_until_the_jobs_frames_are_stored(room):
    """A nice +10 overlay still delayed the worker's threads as they woke for each frame (5-7% of a short job's
    frames in bench/RESULTS.md, 2-4% in the idle class); left in the idle class after the frames are stored,
    anything keeping the cores busy would hold the job in `rendering`. Every thread is moved back, not only
    the first: the decoder's threads, made while drawing, do the work. Where Linux would refuse the way back
    (not root, RLIMIT_NICE below 10) the overlay stays in the normal class throughout."""
    waiting = {("idle" if room.renders.idle_class else "normal", OVERLAY_NICENESS)}
    standby = room.warm_standby()
    assert scheduling(standby) == waiting
    job = room.dispatched()
    assert room.overlay_pid(job.job_id) == standby
    room.store_frames(job)
    wait_for(lambda: thread_count(standby) > 1, 30, interval=0.05, what="the overlay drawing, with its threads")
    assert scheduling(standby) == waiting, "while the job's frames are inferred, every thread"
    assert job.lease is not None and room.ledger.mark_rendering(job.lease, FRAMES, None, None, {})
    room.renders.start(room.ledger.job(job.job_id), job.lease)
    assert scheduling(standby) == {("normal", OVERLAY_NICENESS)}, "once they are all stored, every thread"
    assert_overlay_whole(room.done(job.job_id))
    assert "overlay_left_in_idle_class" not in room.log.events


def test_an_overlay_started_for_a_job_whose_frames_are_all_stored_is_not_left_in_the_idle_class(tmp_path):
    """A job taken over from a stopped host, or whose standby died: its overlay process starts with the
    frames already stored, so nothing will lift it later."""
    built = Room(tmp_path, "jobs.overlay_standby=false")
    try:
        job = built.dispatched()
        built.renders.drop(job.job_id)  # no follower: as for a job another host left `rendering`
        built.store_all(job)
        built.renders.start(built.ledger.job(job.job_id), job.lease)
        assert scheduling(built.overlay_pid(job.job_id)) == {("normal", OVERLAY_NICENESS)}
        assert_overlay_whole(built.done(job.job_id))
    finally:
        built.close()


@pytest.mark.parametrize("euid, nice_limit, can", [
    (0, 0, True),            # root
    (1000, 0, False),        # a user's default limit: the idle class is never left, so never entered
    (1000, 9, False),        # down to nice 11 only
    (1000, 10, True),        # LimitNICE=+10, as the system units set it
    (1000, 40, True),
])
def test_the_idle_class_is_used_only_where_the_overlay_can_be_moved_back(euid, nice_limit, can):
    assert idle_class_can_be_left(euid, nice_limit) is can


def test_the_loop_looks_for_the_overlays_end_sooner_while_it_draws_a_jobs_last_frames(room):
    """Once a job's frames are all stored only the overlay process's exit stands between it and `done`:
    the supervisor's tick waits FINISHING_TICK_S for messages then, not a whole tick_s."""
    def tick_wait_s() -> float:
        return Supervisor.tick_wait_s(SimpleNamespace(jobs=SimpleNamespace(renders=room.renders), cfg=room.cfg))

    room.warm_standby()
    assert tick_wait_s() == room.cfg.supervisor.tick_s > FINISHING_TICK_S
    job = room.dispatched()
    assert not room.renders.finishing() and tick_wait_s() == room.cfg.supervisor.tick_s
    room.store_all(job)
    room.renders.start(room.ledger.job(job.job_id), job.lease)
    assert room.renders.finishing() and tick_wait_s() == FINISHING_TICK_S
    assert_overlay_whole(room.done(job.job_id))
    assert not room.renders.finishing() and tick_wait_s() == room.cfg.supervisor.tick_s


def test_the_loop_watches_an_overlays_end_closely_for_a_second_at_most(room):
    """An overlay that lags far behind (or one drawn whole for a job taken over from a stopped host) is
    not waited on at 100 ticks a second: each tick asks the ledger for the next job."""
    room.warm_standby()
    job = room.dispatched()
    room.store_all(job)
    room.renders.start(room.ledger.job(job.job_id), job.lease)
    render = room.renders.running[job.job_id]
    assert render.stored_at is not None and room.renders.finishing()
    render.stored_at -= FINISHING_WINDOW_S
    assert not room.renders.finishing()
    assert_overlay_whole(room.done(job.job_id))
    taken_over = room.dispatched()
    room.store_all(taken_over)
    room.renders.drop(taken_over.job_id)  # its follower gone: the job is drawn whole by a fresh process
    room.renders.start(room.ledger.job(taken_over.job_id), taken_over.lease)
    assert taken_over.job_id in room.renders and not room.renders.finishing()
    assert_overlay_whole(room.done(taken_over.job_id))


def test_a_dead_standby_leaves_the_job_to_an_overlay_process_of_its_own(room):
    standby = room.warm_standby()
    os.kill(standby, signal.SIGKILL)
    wait_for(lambda: has_exited(standby), 10, interval=0.05, what="the standby dead")
    job = room.dispatched()
    drawing = room.overlay_pid(job.job_id)
    assert drawing != standby and "--standby" not in cmdline(drawing), "a cold overlay process"
    room.store_all(job)
    assert_overlay_whole(room.finish(job))
    assert "overlay_standby_lost" in room.log.events


def test_a_standby_that_ends_before_it_takes_the_job_leaves_no_job_without_its_overlay(room):
    """A job handed over whole (taken over from a stopped host): the standby is stopped before it can
    read the job, then killed. Its exit status is not the job's: another process draws it."""
    standby = room.warm_standby()
    room.ledger.accept(room.clip)
    job = room.ledger.claim(OWNER, 60)
    room.store_all(job)
    os.kill(standby, signal.SIGSTOP)
    room.renders.start(room.ledger.job(job.job_id), job.lease)
    assert room.overlay_pid(job.job_id) == standby, "handed to the standby"
    os.kill(standby, signal.SIGKILL)
    assert_overlay_whole(room.done(job.job_id))
    assert "overlay_standby_lost" in room.log.events


def test_a_follower_whose_standby_died_unread_is_replaced_at_once(room):
    standby = room.warm_standby()
    os.kill(standby, signal.SIGSTOP)
    job = room.dispatched()
    assert room.overlay_pid(job.job_id) == standby
    os.kill(standby, signal.SIGKILL)
    room.reap_until(lambda: room.overlay_pid(job.job_id) != standby, "another overlay process following the job")
    room.store_all(job)
    assert_overlay_whole(room.finish(job))


def test_a_cancelled_job_drawn_by_the_standby_leaves_no_partial_file(room):
    standby = room.warm_standby()
    job = room.dispatched()
    assert room.overlay_pid(job.job_id) == standby
    for index in range(FRAMES // 2):
        assert room.ledger.add_frame(job.lease, index, index / 30, [])
    partial = partial_path(room.renders.result_path(job))
    wait_for(lambda: os.path.exists(partial) and os.path.getsize(partial) > 0, 30, interval=0.05,
             what="frames encoded by the standby")
    room.renders.drop(job.job_id)
    assert pid_gone(standby) and not os.path.exists(partial) and job.job_id not in room.renders


def test_a_job_that_fails_under_the_standby_ends_it_with_no_partial_file(room):
    standby = room.warm_standby()
    job = room.dispatched()
    for index in range(FRAMES // 2):
        assert room.ledger.add_frame(job.lease, index, index / 30, [])
    partial = partial_path(room.renders.result_path(job))
    wait_for(lambda: os.path.exists(partial), 30, interval=0.05, what="a partial overlay")
    room.ledger.fail(job.job_id, "gave up after 20 attempts")
    room.reap_until(lambda: job.job_id not in room.renders, "the standby's follower gone")
    assert pid_gone(standby) and not os.path.exists(partial)
    assert "overlay_standby_lost" not in room.log.events, "JOB_GONE is the job's ending, not a lost standby"


def test_a_stop_leaves_no_standby_and_no_overlay_process(room):
    standby = room.warm_standby()
    job = room.dispatched()
    room.store_all(job)
    room.renders.start(room.ledger.job(job.job_id), job.lease)  # the next standby starts here
    waiting = room.renders.standby.proc.pid
    room.renders.stop_all()
    wait_for(lambda: pid_gone(waiting), 10, interval=0.05, what="the waiting standby gone")
    room.renders.running[job.job_id].proc.wait(10)
    assert pid_gone(standby) and room.renders.standby is None


def test_without_the_standby_each_job_gets_an_overlay_process_of_its_own(tmp_path):
    room = Room(tmp_path, "jobs.overlay_standby=false")
    try:
        room.renders.reap()
        assert room.renders.standby is None
        job = room.dispatched()
        assert "--standby" not in cmdline(room.overlay_pid(job.job_id))
        room.store_all(job)
        assert_overlay_whole(room.finish(job))
    finally:
        room.close()
