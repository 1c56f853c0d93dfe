"""Issue: supervision. Every way the worker dies, at every point of its life, with real crashes,
real signals and real hangs (the fault engine), on real processes. Heartbeats and deadlines are
short here so the whole matrix stays fast; the noop engine keeps frames cheap."""
from __future__ import annotations

import os
import signal

import pytest

from support import Stack, http, make_clip, pid_gone, wait_for

FAST = ["supervisor.heartbeat_s=0.2", "supervisor.liveness_misses=15", "supervisor.abort_grace_s=1",
        "supervisor.backoff_initial_s=0.1", "deadlines.stage_default_s=3", "deadlines.frame_s=2",
        "deadlines.probe_s=4", "deadlines.hello_s=20", "deadlines.stages.runtime=3"]
NOOP = ["engine.name=noop"]

KINDS = {  # fault kind -> the cause the supervisor must record
    "segfault": "segfault",
    "abort": "abort",
    "kill": "oom_killed",
    "exit": "wsl_vm_exit",
    "raise": "python_exception",
    "cuda_oom": "cuda_oom",
    "cuda_sticky": "cuda_sticky",
    "hang": "hang",
}
POINTS = {  # where -> (fault.at, probe on?, expected stage, expected frame)
    "worker_start": ("start", False, "start", None),
    "first_load_stage": ("stage:runtime", False, "runtime", None),
    "detector_stage": ("stage:detector", True, "detector", None),
    "first_frame": ("frame:0", False, "frame", 0),
    "frame_40": ("frame:40", False, "frame", 40),
}


# The core suite runs every kind at one point and every point with one kind, plus the cells with a
# path of their own (a hang before the worker says hello, in-process CUDA OOM recovery on the first
# frame, a sticky CUDA error in the probe); tests/endurance/test_fault_matrix.py runs the rest of the
# 8 x 5 matrix, so CI runs every cell once.
CORE_CASES = sorted({(kind, "frame_40") for kind in KINDS} | {("segfault", point) for point in POINTS}
                    | {("hang", "worker_start"), ("cuda_oom", "first_frame"), ("cuda_sticky", "detector_stage")})
OTHER_CASES = sorted({(kind, point) for kind in KINDS for point in POINTS} - set(CORE_CASES))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clips") / "clip48.mp4", frames=48)


@pytest.mark.parametrize("kind,point", CORE_CASES)
def test_fault_matrix(tmp_path, clip, kind, point):
    run_fault_case(tmp_path, clip, kind, point)


def run_fault_case(tmp_path, clip, kind: str, point: str) -> None:
    """One cell of the matrix: the job completes with every frame once, and the one crash is named."""
    at, probe, stage, frame = POINTS[point]
    stack = Stack(tmp_path, [*FAST, *NOOP, f"fault.kind={kind}", f"fault.at={at}", "fault.times=1",
                             f"probe.enabled={str(probe).lower()}", "fault.hang_s=60"])
    try:
        job_id = stack.submit(clip)
        job = stack.wait_job(job_id, timeout=40)
        assert stack.procs["supervisor"].poll() is None, "the daemon must stay up"
        assert job["state"] == "done", job
        result = stack.result(job)
        assert [f["frame_index"] for f in result["frames"]] == list(range(48))
        crashes = stack.crashes()
        assert len(crashes) == 1, crashes
        crash = crashes[0]
        assert crash["cause"] == KINDS[kind], crash
        assert crash["stage"] == stage, crash
        assert crash["remedy"]
        if frame is not None:
            assert crash["frame_index"] == frame and crash["job_id"] == job_id
        if point == "detector_stage":
            assert crash["process"] == "probe"  # the long-lived worker never tried it
        recovered_in_process = kind == "cuda_oom" and frame is not None
        assert job["attempts"] == (1 if recovered_in_process or frame is None else 2), job
        if kind == "hang":
            assert "Thread" in crash["stderr_tail"] or "File" in crash["stderr_tail"]  # faulthandler dump
    finally:
        stack.stop()


def test_poison_frame_is_recorded_and_skipped(tmp_path, clip):
    stack = Stack(tmp_path, [*FAST, *NOOP, "fault.kind=segfault", "fault.at=frame:10", "fault.times=2",
                             "probe.enabled=false"])
    try:
        job = stack.wait_job(stack.submit(clip), timeout=40)
        assert job["state"] == "done", job
        frames = stack.result(job)["frames"]
        assert [f["frame_index"] for f in frames] == list(range(48))
        assert "killed the worker 2 times" in frames[10]["error"] and frames[10]["persons"] == []
        assert all("error" not in f for i, f in enumerate(frames) if i != 10)
        assert [c["frame_index"] for c in stack.crashes()] == [10, 10]
    finally:
        stack.stop()


def test_crash_loop_stops_within_intensity_says_fatal_and_keeps_the_job_for_the_revival(tmp_path, clip):
    stack = Stack(tmp_path, [*FAST, *NOOP, "fault.kind=segfault", "fault.at=stage:model", "fault.times=3",
                             "probe.enabled=false", "supervisor.intensity=3", "supervisor.period_s=60",
                             "supervisor.fatal_retry_s=0"])
    try:
        job_id = stack.submit(clip)
        health = wait_for(lambda: (h := stack.conn.health()).get("status") == "fatal" and h, 30, what="fatal")
        assert "3 deaths" in health["reason"] and "segfault" in health["reason"]
        assert len(stack.crashes()) == 3  # and no more: it stopped restarting
        assert stack.conn.job(job_id)["state"] == "queued", "an accepted job outlives the crash loop"
        status, body = stack.conn.request("submit", video_path=str(clip))
        assert status == 503 and "fatal" in body["error"]
        assert stack.conn.request("reload")[0] == 200
        job = stack.wait_job(job_id, timeout=30)
        assert job["state"] == "done" and job["frames_done"] == 48, job
    finally:
        stack.stop()


def test_load_failure_is_not_retried_like_a_crash(tmp_path, clip):
    stack = Stack(tmp_path, [*FAST, *NOOP, "fault.kind=load_failure", "fault.at=stage:weights",
                             "probe.enabled=false", "supervisor.fatal_retry_s=0"])
    try:
        health = wait_for(lambda: (h := stack.conn.health()).get("status") == "fatal" and h, 30, what="fatal")
        crashes = stack.crashes()
        assert len(crashes) == 1 and crashes[0]["cause"] == "load_failure" and crashes[0]["stage"] == "weights"
        assert "models verify" in crashes[0]["remedy"]
        assert "load_failure" in health["reason"]
    finally:
        stack.stop()


def test_hang_in_a_load_stage_is_killed_at_the_stage_deadline(tmp_path, clip):
    stack = Stack(tmp_path, [*FAST, *NOOP, "fault.kind=hang", "fault.at=stage:model", "fault.times=1",
                             "probe.enabled=false", "+deadlines.stages.model=1.5"])
    try:
        stack.wait_ready(30)
        crash = stack.crashes()[0]
        assert crash["cause"] == "hang" and crash["stage"] == "model"
        assert "stage model exceeded 1.5s" in crash["summary"]
        assert crash["signal"] in ("SIGABRT", "SIGKILL")
    finally:
        stack.stop()


@pytest.fixture
def served(tmp_path):
    """The whole daemon as systemd runs it: `pose-service serve`."""
    import subprocess
    import sys

    from support import REPO, free_port
    port = free_port()
    clip = make_clip(tmp_path / "long.mp4", frames=150)
    args = [sys.executable, "-m", "pose_service.cli", "serve", f"state_dir={tmp_path / 'state'}",
            f"gateway.port={port}", f"jobs.allowed_roots=[{tmp_path}]", *NOOP,
            "+engine.options.frame_delay_s=0.03", "supervisor.heartbeat_s=0.3"]
    log = open(tmp_path / "serve.log", "ab")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http("GET", url + "/v1/health", timeout=2)[0] == 200, 60, what="serve ready")
        yield url, clip, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def frames_done(url: str, job_id: str) -> int:
    status, body = http("GET", f"{url}/v1/jobs/{job_id}", timeout=2)
    return body.get("frames_done", 0) if status == 200 else 0


def test_supervisor_killed_mid_job(served):
    url, clip, _ = served
    job_id = http("POST", url + "/v1/jobs", {"video_path": str(clip)})[1]["job_id"]
    wait_for(lambda: frames_done(url, job_id) >= 20, 30, interval=0.05, what="20 frames")
    diag = http("GET", url + "/v1/diagnostics")[1]
    sup_pid, worker_pid = diag["supervisor"]["pid"], diag["worker"]["pid"]
    os.kill(sup_pid, signal.SIGKILL)
    status, body = http("GET", f"{url}/v1/jobs/{job_id}", timeout=2)  # read from the ledger: no supervisor needed
    assert status == 200 and body["status"] in ("queued", "running") and body["frames_done"] >= 20
    status, body = http("GET", url + "/v1/health", timeout=2)
    assert status == 503 and body["status"] in ("unavailable", "loading")  # the replacement may already answer
    wait_for(lambda: pid_gone(worker_pid), 10, what="orphaned worker to die")
    wait_for(lambda: http("GET", f"{url}/v1/jobs/{job_id}", timeout=2)[1].get("status") == "done", 60,
             interval=0.25, what="job resumed by the restarted supervisor")
    result = http("GET", f"{url}/v1/jobs/{job_id}/result")[1]
    assert [f["frame_index"] for f in result["frames"]] == list(range(150))
    assert http("GET", url + "/v1/diagnostics")[1]["supervisor"]["pid"] != sup_pid


def test_gateway_killed_jobs_keep_running(served):
    url, clip, proc = served
    job_id = http("POST", url + "/v1/jobs", {"video_path": str(clip)})[1]["job_id"]
    wait_for(lambda: frames_done(url, job_id) >= 10, 30, interval=0.05, what="10 frames")
    gateway = http("GET", url + "/v1/diagnostics")[1]["gateway_pid"]
    before = frames_done(url, job_id)
    os.kill(gateway, signal.SIGKILL)
    wait_for(lambda: frames_done(url, job_id) > before + 20, 60, interval=0.2, what="restarted gateway, job progressed")
    wait_for(lambda: http("GET", f"{url}/v1/jobs/{job_id}", timeout=2)[1].get("status") == "done", 60,
             interval=0.25, what="job done")
    result = http("GET", f"{url}/v1/jobs/{job_id}/result")[1]
    assert [f["frame_index"] for f in result["frames"]] == list(range(150))
    assert result["summary"]["attempts"] == 1  # the worker never noticed


def test_drill_prints_what_the_supervisor_concluded(served):
    import subprocess
    import sys

    from support import REPO
    url, _, _ = served
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "drill", "segfault", "--at", "frame:5",
                           "--url", url, "--timeout", "60"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"cause": "segfault"' in proc.stdout and '"frame_index": 5' in proc.stdout
    assert '"stage": "frame"' in proc.stdout and "remedy" in proc.stdout


def test_fatal_service_revives_on_the_periodic_retry(tmp_path, clip):
    stack = Stack(tmp_path, [*FAST, *NOOP, "fault.kind=abort", "fault.at=stage:model", "fault.times=3",
                             "probe.enabled=false", "supervisor.fatal_retry_s=2"])
    try:
        wait_for(lambda: stack.conn.health().get("status") == "fatal", 30, what="fatal")
        wait_for(lambda: stack.conn.health().get("status") == "ready", 30, what="revived after the retry period")
        job = stack.wait_job(stack.submit(clip), timeout=30)
        assert job["state"] == "done"
    finally:
        stack.stop()


def test_worker_is_the_preferred_oom_victim(tmp_path):
    stack = Stack(tmp_path, [*FAST, *NOOP, "probe.enabled=false"])
    try:
        stack.wait_ready(30)
        pid = stack.worker_pid()
        with open(f"/proc/{pid}/oom_score_adj") as fh:
            worker_score = int(fh.read())
        with open(f"/proc/{stack.procs['supervisor'].pid}/oom_score_adj") as fh:
            assert worker_score > int(fh.read())
    finally:
        stack.stop()


def test_malformed_request_gets_an_answer_not_silence(tmp_path):
    stack = Stack(tmp_path, [*FAST, *NOOP, "probe.enabled=false"])
    try:
        status, body = wait_for(lambda: (r := stack.conn.request("status"))[0] and r, 20, what="answer")
        assert status == 400 and "malformed status request" in body["error"]
        assert stack.procs["supervisor"].poll() is None
    finally:
        stack.stop()


def test_frozen_worker_is_caught_by_missing_heartbeats(tmp_path):
    """SIGSTOP freezes every thread, the heartbeat too: liveness (not a progress deadline) must see it."""
    clip = make_clip(tmp_path / "c.mp4", frames=60)
    stack = Stack(tmp_path, ["supervisor.heartbeat_s=0.2", "supervisor.liveness_misses=5", "supervisor.abort_grace_s=1",
                             "deadlines.frame_s=60", *NOOP, "+engine.options.frame_delay_s=0.02", "probe.enabled=false"])
    try:
        job_id = stack.submit(clip)
        wait_for(lambda: stack.conn.job(job_id).get("frames_done", 0) >= 10, 30, interval=0.02, what="10 frames")
        os.kill(stack.worker_pid(), signal.SIGSTOP)
        job = stack.wait_job(job_id, timeout=40)
        assert job["state"] == "done" and job["attempts"] == 2
        crash = stack.crashes()[0]
        assert crash["cause"] == "hang" and "no heartbeat" in crash["summary"]
        assert [f["frame_index"] for f in stack.result(job)["frames"]] == list(range(60))
    finally:
        stack.stop()


def test_a_job_outlives_three_sigkills_in_a_minute_and_completes_after_the_revival(tmp_path):
    """Three deaths inside the intensity window make the service fatal; the job is not failed: it
    waits in the queue with its frames and finishes, every frame once, when the retry revives it."""
    clip = make_clip(tmp_path / "long.mp4", frames=150)
    stack = Stack(tmp_path, [*FAST, *NOOP, "probe.enabled=false", "+engine.options.frame_delay_s=0.04",
                             "supervisor.intensity=3", "supervisor.period_s=60", "supervisor.fatal_retry_s=3"])
    try:
        stack.wait_ready(30)
        job_id = stack.submit(clip)
        last = 0
        for _ in range(3):
            last = wait_for(lambda: (n := stack.conn.job(job_id).get("frames_done", 0)) > last + 5 and n, 30,
                            interval=0.05, what="the job running again")
            os.kill(stack.worker_pid(), signal.SIGKILL)
            wait_for(lambda: stack.conn.health().get("worker") != "busy", 10, interval=0.02, what="the death seen")
        health = wait_for(lambda: (h := stack.conn.health()).get("status") == "fatal" and h, 20, what="fatal")
        assert "3 deaths" in health["reason"], health
        waiting = stack.conn.job(job_id)
        assert waiting["state"] == "queued" and waiting["frames_done"] >= last, waiting
        job = stack.wait_job(job_id, timeout=60)
        assert job["state"] == "done" and job["frames_done"] == 150, job
        frames = stack.result(job)["frames"]
        assert [f["frame_index"] for f in frames] == list(range(150))
        assert job["attempts"] == 4, job  # three deaths and the run that finished it
    finally:
        stack.stop()
