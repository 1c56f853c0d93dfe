"""Issue: staged loading, the isolated detector probe, the fallback ladder and `diagnose`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO, Stack, make_clip, wait_for

FAST = ["supervisor.heartbeat_s=0.2", "supervisor.liveness_misses=15", "supervisor.abort_grace_s=1",
        "supervisor.backoff_initial_s=0.1", "deadlines.stage_default_s=20"]
LADDER = "ladder=[{engine:noop,device:cpu,options:{detector:vitdet}},{engine:mediapipe,device:cpu}]"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", frames=20)


def test_detector_segfault_in_probe_steps_down_and_worker_never_tries_it(tmp_path, clip):
    stack = Stack(tmp_path, [*FAST, LADDER, "fault.kind=segfault", "fault.at=stage:detector", "fault.times=1",
                             "supervisor.step_up_after_s=0"])
    try:
        job = stack.wait_job(stack.submit(clip), timeout=60)
        assert job["state"] == "done", job
        diag = stack.conn.diagnostics()
        crash = diag["crashes"][-1]
        assert (crash["process"], crash["stage"], crash["cause"]) == ("probe", "detector", "segfault")
        assert crash["rung"] == "noop@cpu(vitdet)" and crash["remedy"]
        assert all(boot["rung"] == "mediapipe@cpu" for boot in diag["boots"])  # never loaded in the worker
        health = diag["health"]
        assert health["status"] == "degraded" and "detector probe segfault" in health["reason"]
        assert stack.result(job)["engine"]["name"] == "mediapipe"
    finally:
        stack.stop()


def test_repeated_gpu_failures_step_down_then_probe_steps_back_up(tmp_path, clip):
    """cuda_oom here; the sticky error in tests/endurance/test_ladder_sticky.py (each spawn imports torch)."""
    steps_down_and_back_up(tmp_path, clip, "cuda_oom")


def steps_down_and_back_up(tmp_path, clip, kind: str) -> None:
    stack = Stack(tmp_path, [*FAST, LADDER, "probe.enabled=false", f"fault.kind={kind}", "fault.at=stage:model",
                             "fault.times=3", "supervisor.intensity=3", "supervisor.step_up_after_s=2"])
    try:
        job = stack.wait_job(stack.submit(clip), timeout=90)
        assert job["state"] == "done"
        assert stack.result(job)["engine"]["name"] == "mediapipe"
        causes = [c["cause"] for c in stack.crashes()]
        assert causes == [kind] * 3
        health = wait_for(lambda: (h := stack.conn.health()).get("rung_index") == 0 and h.get("status") == "ready"
                          and h, 60, what="step back up")
        assert health["rung"] == "noop@cpu(vitdet)"
        job2 = stack.wait_job(stack.submit(clip), timeout=60)
        assert stack.result(job2)["engine"]["name"] == "noop"
    finally:
        stack.stop()


def test_a_step_up_waits_for_the_running_job_to_finish(tmp_path, clip):
    """The rung above probes fine while a job runs on the rung below: the job is not stopped for it
    (it would end with frames from two engines); the step-up happens between jobs."""
    slow_cpu = "{engine:noop,device:cpu,options:{frame_delay_s:0.25}}"
    stack = Stack(tmp_path, [*FAST, f"ladder=[{{engine:noop,device:cpu,options:{{detector:vitdet}}}},{slow_cpu}]",
                             "probe.enabled=false", "fault.kind=raise", "fault.at=stage:model", "fault.times=1",
                             "supervisor.intensity=1", "supervisor.step_up_after_s=0.5"])
    try:
        job = stack.wait_job(stack.submit(clip), timeout=90)
        assert job["state"] == "done", job
        log = stack.log_text()
        assert log.count("job_dispatched") == 1, "the running job was stopped for the step-up"
        assert stack.result(job)["engine"].get("detector") is None  # all of it from the rung below
        wait_for(lambda: stack.conn.health().get("rung_index") == 0, 30, what="step up after the job")
    finally:
        stack.stop()


def diagnose(tmp_path, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "diagnose", "--json",
                           f"state_dir={tmp_path / 'state'}", *extra], capture_output=True, cwd=REPO, timeout=300)
    return proc.returncode, json.loads(proc.stdout)


def test_diagnose_json_passes_every_mediapipe_stage(tmp_path):
    code, out = diagnose(tmp_path, "engine.name=mediapipe")
    assert code == 0, out
    assert [s["stage"] for s in out["stages"]] == ["runtime", "weights", "model", "detector"]
    assert all(s["result"] == "ok" and s["duration_s"] is not None for s in out["stages"])
    assert out["packages"]["mediapipe"] == "0.10.21"


def test_diagnose_names_the_failing_stage_and_exits_non_zero(tmp_path):
    code, out = diagnose(tmp_path, "engine.name=mediapipe", "fault.kind=abort", "fault.at=stage:model")
    assert code != 0
    assert out["failed_stage"] == "model"
    failed = out["stages"][-1]
    assert failed["cause"] == "abort" and failed["remedy"]


def test_models_verify_reports_missing_hmr2_files_with_sources(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "models", "verify", "--engine", "hmr2_phalp",
                           "--json"], capture_output=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 1
    files = json.loads(proc.stdout)["files"]
    assert files and all(f["status"] == "missing" and f["source"] for f in files)
    assert any("SMPL" in f["name"] or "smpl" in f["path"].lower() for f in files)


def test_models_verify_checks_every_hmr2_rung_and_neural_renderer(tmp_path):
    """Before: only the first hmr2_phalp rung's files (ViTDet's), never RegNetY's, and nothing about
    the texture sampler's compiled renderer."""
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "--config-name", "gpu", "models", "verify",
                           "--json"], capture_output=True, cwd=REPO, env=env, timeout=60)
    files = {f["name"]: f for f in json.loads(proc.stdout)["files"]}
    assert {"vitdet_h_weights", "regnety_weights"} <= set(files)
    renderer = files["neural_renderer"]
    assert renderer["optional"] and "appearance=hmar" in renderer["source"]
    assert len({f["path"] for f in files.values()}) == len(files)  # each file once
