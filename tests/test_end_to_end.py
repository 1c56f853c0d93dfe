"""End to end over HTTP with real processes (gateway -> ZeroMQ ->
supervisor -> spawned MediaPipe worker) on the real snowboarding clip."""
from __future__ import annotations

import os
import signal

import pytest
import zmq

from gpu_worker.engines.person_detection import installed

from support import CLIP, SHARED_DATA, Stack, http, make_clip, needs_shared_data, wait_for


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("foundation")
    inputs = tmp / "inputs"
    inputs.mkdir()
    roots = f"jobs.allowed_roots=[{inputs},{SHARED_DATA.resolve()}]"
    s = Stack(tmp, [roots, "engine.name=mediapipe", "supervisor.heartbeat_s=0.5"], gateway=True)
    s.inputs = inputs
    try:
        s.wait_ready(90)
        wait_for(lambda: http("GET", s.url + "/v1/health")[0] == 200, 30, what="gateway")
        yield s
    finally:
        s.stop()


def submit_http(stack, path) -> tuple[int, dict]:
    return http("POST", stack.url + "/v1/jobs", {"video_path": str(path)})


def wait_http_job(stack, job_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (j := http("GET", f"{stack.url}/v1/jobs/{job_id}")[1]).get("status") in ("done", "error")
                    and j, timeout, interval=0.25, what="job end")


@needs_shared_data()
def test_shared_clip_over_http_yields_every_frame_with_poses(stack):
    status, job = submit_http(stack, CLIP)
    assert status == 202, job
    done = wait_http_job(stack, job["job_id"])
    assert done["status"] == "done", done
    status, result = http("GET", f"{stack.url}/v1/jobs/{job['job_id']}/result")
    assert status == 200
    frames = result["frames"]
    assert [f["frame_index"] for f in frames] == list(range(122))
    assert sum(1 for f in frames if f["persons"]) >= 110
    assert result["video"]["frame_count"] == 122 and result["video"]["width"] == 640
    assert abs(result["video"]["fps"] - 29.97) < 0.01
    assert result["engine"]["name"] == "mediapipe" and result["engine"]["device"] == "cpu"
    # the worker runs the venv's Python: the person detector `make install` put there is the one it loads, and
    # the result says whether its search ran with it
    assert result["engine"]["person_detector"].startswith("on" if installed() else "absent")
    assert len(result["joint_names"]) == 33
    pts = [f["pts_s"] for f in frames]
    assert pts == sorted(pts) and abs(pts[-1] - 121 / 29.97) < 0.05
    person = next(f for f in frames if f["persons"])["persons"][0]
    assert len(person["keypoints_2d"]) == 33 and len(person["keypoints_3d"]) == 33
    xs = [p[0] for p in person["keypoints_2d"]]
    assert 0 <= min(xs) and max(xs) <= 640 * 1.5  # pixels, not normalised
    # world coordinates are metres around the hips
    assert max(abs(c) for p in person["keypoints_3d"] for c in p) < 2.5


@needs_shared_data()
def test_worker_sigkilled_mid_job_resumes_and_stores_each_frame_once(stack):
    status, job = submit_http(stack, CLIP)
    job_id = job["job_id"]
    wait_for(lambda: http("GET", f"{stack.url}/v1/jobs/{job_id}")[1].get("frames_done", 0) >= 30, 60,
             interval=0.05, what="30 frames")
    diag = http("GET", stack.url + "/v1/diagnostics")[1]
    pid, generation = diag["worker"]["pid"], diag["worker"]["generation"]
    os.kill(pid, signal.SIGKILL)
    done = wait_http_job(stack, job_id)
    assert done["status"] == "done" and done["attempts"] >= 2
    result = http("GET", f"{stack.url}/v1/jobs/{job_id}/result")[1]
    indices = [f["frame_index"] for f in result["frames"]]
    assert indices == list(range(122))  # every frame exactly once
    after = http("GET", stack.url + "/v1/diagnostics")[1]
    assert after["worker"]["generation"] > generation
    crash = next(c for c in after["crashes"] if c["generation"] == generation)
    assert crash["cause"] == "oom_killed" and crash["signal"] == "SIGKILL"


def bad_inputs(stack) -> dict[str, object]:
    inputs = stack.inputs
    (inputs / "notes.mp4").write_text("this is not a video\n" * 20)
    (inputs / "empty.mp4").write_bytes(b"")
    if CLIP.exists():
        (inputs / "truncated.mp4").write_bytes(CLIP.read_bytes()[:20000])
    else:
        make_clip(inputs / "full.mp4")
        (inputs / "truncated.mp4").write_bytes((inputs / "full.mp4").read_bytes()[:3000])
    outside = inputs.parent / "outside.mp4"
    make_clip(outside, frames=5)
    link = inputs / "escape.mp4"
    if not link.exists():
        link.symlink_to(outside)
    return {
        "missing": inputs / "nope.mp4",
        "outside": outside,
        "dotdot": f"{inputs}/../outside.mp4",
        "symlink_escape": link,
        "text_named_mp4": inputs / "notes.mp4",
        "zero_bytes": inputs / "empty.mp4",
        "truncated": inputs / "truncated.mp4",
    }


def test_bad_inputs_get_clear_errors_and_service_keeps_serving(stack):
    for name, path in bad_inputs(stack).items():
        status, body = submit_http(stack, path)
        assert isinstance(body, dict) and body.get("error") or status == 202, (name, status, body)
        if status == 202:  # accepted: must end in error with a reason, never hang
            done = wait_http_job(stack, body["job_id"], 60)
            assert done["status"] in ("error", "done"), (name, done)
            if done["status"] == "error":
                assert done["error"]
        else:
            assert 400 <= status < 500, (name, status, body)
    status, body = http("POST", stack.url + "/v1/jobs", raw=b'{"video_path": ', headers={"Content-Type": "application/json"})
    assert status == 400 and "malformed JSON" in body["error"]
    status, body = http("POST", stack.url + "/v1/jobs", raw=b"video_path=x", headers={"Content-Type": "text/plain"})
    assert status == 415 and body["error"]
    status, body = http("GET", stack.url + "/v1/jobs/doesnotexist")
    assert status == 404 and body["error"] == "Job not found"
    good = make_clip(stack.inputs / "good.mp4", frames=12)
    status, job = submit_http(stack, good)
    assert status == 202
    assert wait_http_job(stack, job["job_id"])["status"] == "done"


def test_outside_roots_is_forbidden_with_reason(stack):
    status, body = submit_http(stack, "/etc/passwd")
    assert status == 403 and "outside the allowed roots" in body["error"]


def test_multipart_upload_runs_a_job(stack):
    clip = make_clip(stack.inputs / "upload.mp4", frames=10)
    boundary = "----posetest"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"clip.mp4\"\r\n"
               f"Content-Type: video/mp4\r\n\r\n").encode() + clip.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, job = http("POST", stack.url + "/v1/jobs", raw=payload,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 202, job
    done = wait_http_job(stack, job["job_id"])
    assert done["status"] == "done" and done["frames_done"] == 10


def test_idempotency_key_returns_the_same_job(stack):
    clip = make_clip(stack.inputs / "idem.mp4", frames=6)
    headers = {"Idempotency-Key": "abc-123"}
    first = http("POST", stack.url + "/v1/jobs", {"video_path": str(clip)}, headers=headers)
    second = http("POST", stack.url + "/v1/jobs", {"video_path": str(clip)}, headers=headers)
    assert first[0] == 202 and second[0] == 200
    assert first[1]["job_id"] == second[1]["job_id"]


def test_garbage_on_the_supervisor_socket_is_dropped_not_fatal(stack):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{stack.state_dir}/run/supervisor.sock")
    garbage = [[b"\x00\xff" * 50], [b"\xc1"], [os.urandom(4096)], [b"\x81\xa1v\x01"], [b"x"] * 20,
               [__import__("msgpack").packb({"v": 1, "type": "submit", "body": {"video_path": 5}})]]
    for parts in garbage:
        sock.send_multipart(parts)
    ctx2_sock = ctx.socket(zmq.DEALER)
    ctx2_sock.setsockopt(zmq.LINGER, 0)
    ctx2_sock.connect(f"ipc://{stack.state_dir}/run/worker.sock")
    ctx2_sock.send_multipart([os.urandom(100)])
    # every piece of garbage is counted as dropped, the worker socket's too: seen, not slept past
    wait_for(lambda: http("GET", stack.url + "/v1/diagnostics")[1]["messages"]["dropped"] >= len(garbage) + 1, 10,
             what="each garbage message counted as dropped")
    sock.close()
    ctx2_sock.close()
    ctx.term()
    assert stack.procs["supervisor"].poll() is None
    status, health = http("GET", stack.url + "/v1/health")
    assert status == 200 and health["status"] == "ready"


def test_metrics_in_prometheus_format(stack):
    status, body = http("GET", stack.url + "/metrics")
    text = body.decode()
    assert status == 200
    assert 'pose_status{status="ready"} 1.0' in text and "pose_supervisor_up 1.0" in text
    assert "pose_queue_depth" in text and "pose_jobs{" in text


@needs_shared_data()
def test_overlay_video_has_every_frame_with_the_pose_drawn(stack):
    import av
    import numpy as np

    status, job = submit_http(stack, CLIP)
    job_id = job["job_id"]
    wait_http_job(stack, job_id)
    done = wait_for(lambda: (j := http("GET", f"{stack.url}/v1/jobs/{job_id}")[1]).get("overlay_path") and j, 60,
                    interval=0.25, what="overlay video")
    with av.open(done["overlay_path"]) as overlay, av.open(str(CLIP)) as source:
        drawn = [f.to_ndarray(format="rgb24") for f in overlay.decode(video=0)]
        plain = [f.to_ndarray(format="rgb24") for f in source.decode(video=0)]
    assert len(drawn) == 122 and drawn[0].shape == (360, 640, 3)
    result = http("GET", f"{stack.url}/v1/jobs/{job_id}/result")[1]
    with_person = next(f["frame_index"] for f in result["frames"] if f["persons"])
    # the skeleton changes pixels where a person is; a frame is not just re-encoded
    diff = np.abs(drawn[with_person].astype(int) - plain[with_person].astype(int)).max(axis=2)
    assert (diff > 100).sum() > 200
