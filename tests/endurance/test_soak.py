"""Worn down, not just used: hundreds of worker generations in one supervisor's life (reloads,
SIGKILLs, injected crashes, spaced so the restart-intensity ladder is not what is tested), then a
forced fatal that the periodic retry must revive. Every loop is bounded in count and time."""
from __future__ import annotations

import os
import signal
import time

from support import Stack, make_clip, wait_for

GENERATIONS = 200
BASE = ["engine.name=noop", "probe.enabled=false", "supervisor.heartbeat_s=0.2", "supervisor.liveness_misses=15",
        "supervisor.backoff_initial_s=0.05", "supervisor.abort_grace_s=1"]


def ready_after(stack: Stack, generation: int, timeout: float = 30) -> int:
    health = wait_for(lambda: (h := stack.conn.health()).get("status") == "ready" and h["generation"] > generation
                      and h, timeout, interval=0.02, what=f"a ready worker after generation {generation}")
    return health["generation"]


def test_200_worker_generations_leave_the_service_ready_and_the_runtime_dir_bounded(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=30)
    stack = Stack(tmp_path, [*BASE, "supervisor.intensity=3", "supervisor.period_s=1"])
    runtime = stack.state_dir / "run"
    try:
        generation = stack.wait_ready(60)["generation"]
        actions = ("reload", "sigkill", "reload", "crash")
        started = time.monotonic()
        for step in range(2 * GENERATIONS):
            if generation >= GENERATIONS or time.monotonic() - started > 420:
                break
            action = actions[step % len(actions)]
            if action == "reload":
                assert stack.conn.request("reload")[0] == 200
            elif action == "sigkill":
                os.kill(stack.worker_pid(), signal.SIGKILL)
            else:  # a real segfault in the next worker's start: two generations
                assert stack.conn.request("drill", fault="segfault", at="start")[0] == 200
            generation = ready_after(stack, generation)
            time.sleep(0.35 if action != "reload" else 0)  # keep crashes sparser than 3 per second
        assert generation >= GENERATIONS, f"only {generation} generations in the time allowed"
        health = stack.conn.health()
        assert health["status"] == "ready", health
        files = os.listdir(runtime)
        keep = 20  # supervisor.keep_generations
        assert len([f for f in files if f.startswith("gen-")]) <= 2 * keep, sorted(files)
        assert len(files) <= 2 * keep + 12, sorted(files)
        causes = stack.conn.diagnostics()["restarts_by_cause"]
        assert causes.get("segfault", 0) >= 30 and causes.get("oom_killed", 0) >= 30, causes
        job = stack.wait_job(stack.submit(clip), timeout=60)
        assert job["state"] == "done" and job["frames_done"] == 30, job
        assert stack.procs["supervisor"].poll() is None
    finally:
        stack.stop()


def test_a_forced_fatal_after_many_generations_is_revived_by_the_periodic_retry(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=20)
    stack = Stack(tmp_path, [*BASE, "supervisor.intensity=3", "supervisor.period_s=60",
                             "supervisor.fatal_retry_s=3"])
    try:
        generation = stack.wait_ready(60)["generation"]
        for _ in range(60):
            stack.conn.request("reload")
            generation = ready_after(stack, generation)
        for _ in range(3):  # three deaths inside the intensity window: nothing left to step down to
            os.kill(stack.worker_pid(), signal.SIGKILL)
            wait_for(lambda: stack.conn.health().get("worker") != "ready", 10, interval=0.01, what="the death seen")
            if stack.conn.health().get("status") != "fatal":
                generation = ready_after(stack, generation)
        health = wait_for(lambda: (h := stack.conn.health()).get("status") == "fatal" and h, 20, what="fatal")
        assert "3 deaths" in health["reason"], health
        revived = wait_for(lambda: (h := stack.conn.health()).get("status") == "ready" and h, 30,
                           what="the periodic retry to revive the service")
        assert revived["generation"] > generation
        job = stack.wait_job(stack.submit(clip), timeout=60)
        assert job["state"] == "done", job
    finally:
        stack.stop()
