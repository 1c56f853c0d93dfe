"""The overlay is drawn beside the inference (issue 23): a process that follows the ledger draws
each frame once the worker has stored it, so it ends a few frames after the last inference; a
resumed job's overlay still has every frame once; a failed or cancelled job leaves no partial file.
That process is a standby started before the job (issue 30), and a stop leaves none behind."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import av
import pytest

from pose_common.ledger import Ledger
from pose_common.overlay import (
    DRAWING_NAME,
    STANDBY_NAME,
    JobGone,
    StoredFrames,
    _open_stream,
    as_i420,
    draw_video,
    partial_path,
)
from supervisor.renders import OVERLAY_NICENESS

from support import Stack, make_clip, pid_gone, process_name, wait_for

FRAMES = 24
NOOP = ["engine.name=noop", "probe.enabled=false"]


def decoded_count(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


class Worker:
    """Stores a job's frames one at a time, each time the overlay has to wait for one: the test
    sees exactly when the overlay waited, with no clock involved."""

    def __init__(self, ledger: Ledger, total: int):
        self.ledger, self.total = ledger, total
        self.job = ledger.accept("/clip.mp4")[0]
        self.lease = ledger.claim("host", 60).lease
        self.next, self.waits, self.on_wait = 0, 0, self.store_one

    def store_one(self) -> None:
        if self.next < self.total:
            assert self.ledger.add_frame(self.lease, self.next, self.next / 30, [])
            self.next += 1
        if self.next == self.total:
            self.ledger.mark_rendering(self.lease, self.total, None, None, {})

    def sleep(self, _seconds: float) -> None:
        self.waits += 1
        self.on_wait()


@pytest.fixture
def clip(tmp_path: Path) -> str:
    return str(make_clip(tmp_path / "clip.mp4", frames=FRAMES))


def test_each_frame_is_drawn_as_soon_as_it_is_stored(tmp_path, clip):
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"))
    worker = Worker(ledger, FRAMES)
    out = str(tmp_path / "job.overlay.mp4")
    assert draw_video(clip, StoredFrames(ledger, worker.job.job_id, sleep=worker.sleep), [], out) == FRAMES
    # it waited once per frame: it drew each frame before the next one was stored
    assert worker.waits == FRAMES
    assert decoded_count(out) == FRAMES and not os.path.exists(out + ".tmp.mp4")


def test_a_resumed_job_has_every_frame_once(tmp_path, clip):
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"))
    worker = Worker(ledger, FRAMES)

    def die_at_ten_then_resume() -> None:
        worker.store_one()
        if worker.next == 10:  # the worker dies; its replacement recomputes from frame 7
            ledger.release(worker.lease)
            worker.lease = ledger.claim("host", 60).lease
            for index in range(7, 10):
                assert ledger.add_frame(worker.lease, index, index / 30, []) is False
    worker.on_wait = die_at_ten_then_resume
    out = str(tmp_path / "job.overlay.mp4")
    assert draw_video(clip, StoredFrames(ledger, worker.job.job_id, sleep=worker.sleep), [], out) == FRAMES
    assert decoded_count(out) == FRAMES


@pytest.mark.parametrize("ending", ["cancelled", "gave up after 20 attempts"])
def test_a_job_that_fails_while_drawn_leaves_no_file(tmp_path, clip, ending):
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"))
    worker = Worker(ledger, FRAMES)

    def fail_midway() -> None:
        worker.store_one()
        if worker.next == 12:
            ledger.fail(worker.job.job_id, ending)
    worker.on_wait = fail_midway
    out = str(tmp_path / "job.overlay.mp4")
    with pytest.raises(JobGone):
        draw_video(clip, StoredFrames(ledger, worker.job.job_id, sleep=worker.sleep), [], out)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("job.overlay")]


def test_a_sampled_job_draws_only_its_frames(tmp_path, clip):
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"))
    worker = Worker(ledger, FRAMES)
    chosen = [0, 5, 11, 17]

    def store_chosen() -> None:
        if chosen:
            assert ledger.add_frame(worker.lease, chosen.pop(0), 0.0, [])
        else:
            ledger.mark_rendering(worker.lease, FRAMES, None, None, {})
    worker.on_wait = store_chosen
    out = str(tmp_path / "job.overlay.mp4")
    assert draw_video(clip, StoredFrames(ledger, worker.job.job_id, sleep=worker.sleep), [], out) == 4


# --- in the daemon -------------------------------------------------------------------------------
def overlay_children(supervisor_pid: int) -> list[tuple[int, str, str]]:
    """-> (pid, command line, process name) of each of the supervisor's overlay processes."""
    import psutil

    found = []
    for child in psutil.Process(supervisor_pid).children():
        try:
            command = " ".join(child.cmdline())
            if "pose_common.overlay" in command:
                found.append((child.pid, command, child.name()))
        except psutil.Error:
            pass  # exited already (a zombie until the supervisor reaps it)
    return found


def overlay_processes(supervisor_pid: int) -> list[int]:
    """Those drawing a job: started for it, or a standby that took it (one waiting draws nothing)."""
    return [pid for pid, command, name in overlay_children(supervisor_pid)
            if "--standby" not in command or name == DRAWING_NAME]


def standby_processes(supervisor_pid: int) -> list[int]:
    """Those waiting for a job (or still starting to)."""
    return [pid for pid, command, name in overlay_children(supervisor_pid)
            if "--standby" in command and name != DRAWING_NAME]


def warm_standby(supervisor_pid: int) -> int:
    """-> the one standby, once it waits past its imports."""
    def warm() -> int:
        waiting = standby_processes(supervisor_pid)
        return len(waiting) == 1 and process_name(waiting[0]) == STANDBY_NAME and waiting[0]
    return wait_for(warm, 60, interval=0.05, what="one warm standby overlay process")



def test_the_daemon_draws_the_overlay_while_the_job_runs(tmp_path):
    import psutil

    clip = make_clip(tmp_path / "long.mp4", frames=150)
    stack = Stack(tmp_path, [*NOOP, "+engine.options.frame_delay_s=0.03"])
    try:
        stack.wait_ready(60)
        job_id = stack.submit(clip)
        wait_for(lambda: stack.conn.job(job_id).get("frames_done", 0) >= 60, 60, interval=0.05, what="60 frames")
        sup = stack.procs["supervisor"].pid
        followers = overlay_processes(sup)
        assert len(followers) == 1, "one overlay process follows the running job"
        assert psutil.Process(followers[0]).nice() == OVERLAY_NICENESS
        result_path = str(stack.state_dir / "results" / f"{job_id}.json")
        partial = partial_path(result_path)
        wait_for(lambda: os.path.exists(partial) and os.path.getsize(partial) > 0, 30, interval=0.05,
                 what="frames already encoded while the job runs")
        assert stack.conn.job(job_id)["state"] == "running"
        job = stack.wait_job(job_id, timeout=60)
        assert job["state"] == "done" and decoded_count(job["overlay_path"]) == 150
        assert not os.path.exists(partial) and overlay_processes(sup) == []
    finally:
        stack.stop()


def test_the_daemon_resumes_the_overlay_with_the_job_and_removes_a_cancelled_ones(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", frames=150)
    stack = Stack(tmp_path, [*NOOP, "+engine.options.frame_delay_s=0.03"])
    try:
        stack.wait_ready(60)
        job_id = stack.submit(clip)
        wait_for(lambda: stack.conn.job(job_id).get("frames_done", 0) >= 40, 60, interval=0.05, what="40 frames")
        follower = overlay_processes(stack.procs["supervisor"].pid)
        os.kill(stack.worker_pid(), signal.SIGKILL)
        job = stack.wait_job(job_id, timeout=90)
        assert job["state"] == "done" and job["attempts"] == 2
        assert follower and not os.path.exists(f"/proc/{follower[0]}"), "the same follower drew the resumed job"
        assert decoded_count(job["overlay_path"]) == 150

        cancelled = stack.submit(clip)
        wait_for(lambda: stack.conn.job(cancelled).get("frames_done", 0) >= 40, 60, interval=0.05, what="40 frames")
        partial = partial_path(str(stack.state_dir / "results" / f"{cancelled}.json"))
        wait_for(lambda: os.path.exists(partial), 30, interval=0.05, what="a partial overlay")
        assert stack.conn.request("cancel", job_id=cancelled)[0] in (200, 202)
        wait_for(lambda: not os.path.exists(partial), 10, interval=0.05, what="the partial overlay removed")
        time.sleep(0.5)
        assert not any(name.startswith(cancelled) and "overlay" in name for name in os.listdir(stack.state_dir / "results"))
    finally:
        stack.stop()


def test_a_job_that_fails_under_its_overlay_leaves_no_file_and_the_supervisor_running(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", frames=150)
    stack = Stack(tmp_path, [*NOOP, "+engine.options.frame_delay_s=0.03", "jobs.max_attempts=1"])
    try:
        stack.wait_ready(60)
        supervisor = stack.procs["supervisor"]
        job_id = stack.submit(clip)
        wait_for(lambda: stack.conn.job(job_id).get("frames_done", 0) >= 40, 60, interval=0.05, what="40 frames")
        partial = partial_path(str(stack.state_dir / "results" / f"{job_id}.json"))
        wait_for(lambda: os.path.exists(partial), 30, interval=0.05, what="a partial overlay")
        os.kill(stack.worker_pid(), signal.SIGKILL)  # its one attempt used: the job fails
        assert stack.wait_job(job_id, timeout=30)["state"] == "error"
        wait_for(lambda: not os.path.exists(partial) and not overlay_processes(supervisor.pid), 15, interval=0.05,
                 what="the follower gone with its partial file")
        stack.wait_ready(30)
        assert supervisor.poll() is None and "supervisor_crashed" not in stack.log_text()
    finally:
        stack.stop()


def test_the_daemon_draws_each_job_with_a_standby_started_before_it(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", frames=150)
    stack = Stack(tmp_path, [*NOOP, "+engine.options.frame_delay_s=0.03"])
    try:
        stack.wait_ready(60)
        sup = stack.procs["supervisor"].pid
        drawn_by = []
        for _ in range(2):
            standby = warm_standby(sup)
            job_id = stack.submit(clip)
            wait_for(lambda: stack.conn.job(job_id).get("frames_done", 0) >= 40, 60, interval=0.05, what="40 frames")
            assert overlay_processes(sup) == [standby], "the standby waiting before the job was submitted draws it"
            assert standby_processes(sup) == [], "the next standby waits until the job's frames are inferred"
            job = stack.wait_job(job_id, timeout=60)
            assert job["state"] == "done" and decoded_count(job["overlay_path"]) == 150
            assert len(standby_processes(sup)) == 1, "the next standby"
            drawn_by.append(standby)
        assert drawn_by[0] != drawn_by[1], "each job gets a fresh standby"
        left = standby_processes(sup)
        assert len(left) == 1 and overlay_processes(sup) == []
    finally:
        stack.stop()
    assert pid_gone(left[0]), "a stopped supervisor leaves no standby behind"


def test_a_killed_standby_leaves_the_job_to_an_overlay_process_of_its_own(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=60)
    stack = Stack(tmp_path, [*NOOP, "+engine.options.frame_delay_s=0.03"])
    try:
        stack.wait_ready(60)
        sup = stack.procs["supervisor"].pid
        standby = warm_standby(sup)
        os.kill(standby, signal.SIGKILL)
        job_id = stack.submit(clip)
        job = stack.wait_job(job_id, timeout=60)
        assert job["state"] == "done" and decoded_count(job["overlay_path"]) == 60 and not job.get("warning")
        assert "overlay_standby_lost" in stack.log_text()
        waiting = warm_standby(sup)
        assert waiting != standby, "a standby waits again for the next job"
    finally:
        stack.stop()


def test_a_supervisor_killed_outright_leaves_no_standby_behind(tmp_path):
    stack = Stack(tmp_path, NOOP)
    try:
        stack.wait_ready(60)
        standby = warm_standby(stack.procs["supervisor"].pid)
        stack.procs["supervisor"].kill()
        wait_for(lambda: pid_gone(standby), 10, interval=0.05, what="the standby dead with its supervisor")
    finally:
        stack.stop()


def test_the_overlays_encoder_holds_no_frame_back_for_the_end(tmp_path):
    """Each frame drawn is encoded as it comes (x264 without lookahead or B-frames): nothing is left to
    encode after the last one, where the user waits for `done` (a lookahead of frames flushed at the end
    was most of the overlay's tail on a short job)."""
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(tmp_path / "out.mp4"), "w") as container:
        stream = _open_stream(container, 30.0, 320, 180)
        for index in range(30):
            bgr = rng.integers(0, 255, (180, 320, 3), dtype=np.uint8)
            packets = stream.encode(as_i420(bgr))
            assert len(packets) == 1, f"frame {index}: {len(packets)} packets"
            for packet in packets:
                container.mux(packet)
        assert stream.encode() == []
