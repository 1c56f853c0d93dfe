"""The daemon as it was attacked from outside: reloads and drills fired at random moments of the
worker's life while jobs run, and a machine starved of CPU. Every loop is bounded in count and time;
the hog processes are this test's own children and are always stopped."""
from __future__ import annotations

import base64
import multiprocessing
import os
import random
import time
from contextlib import contextmanager

from pose_common.ledger import Ledger

from support import CLIP, PHOTO, Served, Stack, http, make_clip, needs_shared_data, wait_for

STATES_HIT = {"probing", "spawning", "loading"}  # the shots must land in each of these


def test_200_reloads_and_drills_at_random_moments_lose_no_job_and_no_frame(tmp_path):
    rng = random.Random(1818)
    clips = [make_clip(tmp_path / f"clip{i}.mp4", frames=60) for i in range(3)]
    stack = Stack(tmp_path, ["engine.name=noop", "+engine.options.frame_delay_s=0.01",
                             "+engine.options.stage_delay_s=0.1", "supervisor.heartbeat_s=0.2",
                             "supervisor.liveness_misses=15", "supervisor.backoff_initial_s=0.05",
                             "supervisor.fatal_retry_s=2", "supervisor.abort_grace_s=1"])
    seen_states: set[str] = set()
    jobs: list[str] = []
    try:
        stack.wait_ready(60)
        started = time.monotonic()
        for shot in range(200):
            if time.monotonic() - started > 360:
                break
            if shot % 10 == 0:
                jobs.append(stack.submit(clips[shot // 10 % 3]))
            if shot % 5 == 0:  # the states the attack reached: the slot's own record of its moves
                transitions = stack.conn.diagnostics().get("worker", {}).get("transitions", [])
                seen_states.update(t["dst"] for t in transitions)
            fire_at_random(stack, rng)
            time.sleep(rng.uniform(0.0, 0.8))
        assert shot == 199, f"only {shot + 1} shots in the time allowed"
        assert STATES_HIT <= seen_states, seen_states
        wait_for(lambda: stack.conn.health().get("status") == "ready", 90, what="ready after the attack")
        assert stack.procs["supervisor"].poll() is None, "the supervisor itself fell under the attack"
        ledger = Ledger(str(stack.state_dir / "ledger.sqlite3"), readonly=True)
        for job_id in jobs:
            job = stack.wait_job(job_id, timeout=120)
            assert job["state"] == "done", job
            frames = stack.result(job)["frames"]
            assert [f["frame_index"] for f in frames] == list(range(60)), job_id
            # reloads give the attempt back: only the deaths the job lived through are charged
            deaths = [e for e in ledger.events_since(job_id, limit=10_000) if e["type"] == "restart"]
            assert job["attempts"] == 1 + len(deaths), (job_id, job["attempts"], deaths)
    finally:
        stack.stop()


def fire_at_random(stack: Stack, rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.6:
        assert stack.conn.request("reload")[0] == 200
    elif roll < 0.9:
        kind, at = rng.choice([("segfault", "start"), ("raise", "stage:model"), ("kill", "stage:runtime"),
                               ("abort", "start")])
        assert stack.conn.request("drill", fault=kind, at=at)[0] in (200, 409)
    else:  # a frame fault needs a serving worker; 409 otherwise
        assert stack.conn.request("drill", fault="raise", at=f"frame:{rng.randrange(5, 50)}")[0] in (200, 409, 503)


# --- a machine starved of CPU --------------------------------------------------------------------------------
HOG_NICE = -10  # as root (CI): the hogs outrank the service, as a build or a browser tab can


def spin(deadline: float) -> None:
    try:
        os.nice(HOG_NICE)
    except PermissionError:
        pass  # not root: plain hogs, still 4 per core
    while time.monotonic() < deadline:
        pass


@contextmanager
def cpu_hog(per_core: int, seconds: float):
    deadline = time.monotonic() + seconds
    hogs = [multiprocessing.get_context("spawn").Process(target=spin, args=(deadline,), daemon=True)
            for _ in range(per_core * (os.cpu_count() or 1))]
    for hog in hogs:
        hog.start()
    try:
        yield deadline
    finally:
        for hog in hogs:
            hog.kill()
            hog.join(5)


def hybrid(served: Served, image: bytes) -> tuple[int, dict]:
    return http("POST", served.url + "/pose/hybrid",
                {"image_base64": base64.b64encode(image).decode(), "frame_number": 0}, timeout=120)


@needs_shared_data()
def test_a_cpu_hog_kills_no_healthy_worker_and_a_real_hang_is_still_caught_after_it(tmp_path):
    """The hog starts while a job runs at the pace it learned on an idle machine (the case that
    fooled wall-clock deadlines), and stays for 2 minutes of jobs on the real clip (second pass
    included) and /pose/hybrid stills."""
    served = Served(tmp_path / "served", ["engine.name=mediapipe", "probe.enabled=false"])
    photo = PHOTO.read_bytes()
    try:
        served.wait_ready(120)
        jobs = [submit(served, CLIP)]
        wait_for(lambda: served.job(jobs[0]).get("frames_done", 0) >= 20, 60, interval=0.05, what="a warm job")
        with cpu_hog(per_core=4, seconds=120) as deadline:
            while time.monotonic() < deadline - 5:
                status, body = hybrid(served, photo)
                assert status == 200 and body.get("keypoints"), body
                if served.job(jobs[-1]).get("status") in ("done", "error"):
                    jobs.append(submit(served, CLIP))
                time.sleep(1.0)
        for job_id in jobs:
            assert served.wait_job(job_id, timeout=300)["status"] == "done", served.job(job_id)
        deaths = served.diagnostics()["restarts_by_cause"]
        assert "hang" not in deaths, deaths
        caught_in = drilled_hang_caught_in(served, CLIP)
        assert caught_in < 10.0, f"a real hang took {caught_in:.1f}s to catch and resume"
    finally:
        served.stop()


def submit(served: Served, clip) -> str:
    status, body = http("POST", served.url + "/v1/jobs", {"video_path": str(clip)}, timeout=30)
    assert status == 202, body
    return body["job_id"]


def drilled_hang_caught_in(served: Served, clip) -> float:
    """A hang armed at a frame of a running job: seconds from the job stopping to progress again."""
    job_id = submit(served, clip)
    wait_for(lambda: served.job(job_id).get("frames_done", 0) >= 10, 60, interval=0.05, what="a warm job")
    at = served.job(job_id)["frames_done"] + 15
    status, body = http("POST", served.url + "/v1/drill", {"kind": "hang", "at": f"frame:{at}"}, timeout=10)
    assert status == 200, body
    wait_for(lambda: served.job(job_id).get("frames_done", 0) >= at, 60, interval=0.02, what="the hung frame")
    stuck_at = time.monotonic()
    wait_for(lambda: served.job(job_id).get("frames_done", 0) > at + 1, 60, interval=0.05, what="the job resumed")
    resumed_in = time.monotonic() - stuck_at
    assert served.wait_job(job_id, 60)["status"] == "done"
    assert served.diagnostics()["restarts_by_cause"].get("hang") == 1
    return resumed_in
