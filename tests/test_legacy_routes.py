"""The backend's legacy routes (gateway/legacy.py) against a real running `pose-service serve` started
here (gateway + supervisor + spawned MediaPipe worker), with the real clip and photo from
../shared/data. Numbers refer to the drop-in tests of the client contract (§5).

Covered here (MediaPipe engine): 1-4, 6-11, 12, 13 (scaled: 200 sequential /pose/hybrid frames,
then 4 concurrent streams started 50 ms apart; worker RSS flat), 14 (worker SIGKILLed mid-request),
15-24.

Apply only to the hmr2_phalp engine (GPU machine), so not asserted here:
  5   mesh_vertices_data 6890x3 / mesh_faces_data 13776x3: MediaPipe has no mesh, and the service
      never fakes one (the fields are absent; this file asserts that they are absent).
  1,15 models.hmr2/vitdet === 'loaded': with MediaPipe they truthfully report 'not_loaded'
      (status is still 'ready', which is what the backend's health check reads).
  6,7 (partly) camera_translation is null with MediaPipe (no camera model); the visualisation is a
      skeleton, not a rendered mesh (mesh_rendered false).
  19  (vertices part) 6890 vertices / 13776 faces per person need SMPL; the frame count, contiguity,
      fps, duration and output_path parts are asserted here.
  25  "models load once per daemon" is about HMR2/ViTDet's ~80 s setup on a GPU; MediaPipe loads in
      about a second (the second job here still reuses the same worker process).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import av
import numpy as np
import pytest

from support import free_port, multipart
from support import wait_for as wait_until

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLIP = DATA / "snowboard_k0z18lmds.mp4"
PHOTO = DATA / "person_standing.jpg"
CLIP_FRAMES = 122



def need_data() -> None:
    if not (CLIP.is_file() and PHOTO.is_file()):
        pytest.skip(f"test data not found ({CLIP.name}, {PHOTO.name} in {DATA}); a clone without "
                    "../shared/data cannot run the legacy end-to-end tests")


# --- HTTP helpers ---------------------------------------------------------------------------------
class Reply:
    def __init__(self, status: int, headers: dict, data: bytes, seconds: float):
        self.status, self.headers, self.data, self.seconds = status, headers, data, seconds

    @property
    def json(self) -> Any:
        return strict_json(self.data)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0]


def _reject_constant(name: str):
    raise AssertionError(f"non-JSON number {name} in a response")


def strict_json(data: bytes) -> Any:
    return json.loads(data, parse_constant=_reject_constant)


def http(base: str, method: str, path: str, body: Optional[bytes] = None, ctype: Optional[str] = None,
         timeout: float = 30.0) -> Reply:
    headers = {"Content-Type": ctype} if ctype else {}
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Reply(resp.status, dict(resp.headers), resp.read(), time.monotonic() - started)
    except urllib.error.HTTPError as err:
        return Reply(err.code, dict(err.headers), err.read(), time.monotonic() - started)


def post_json(base: str, path: str, obj: Any, timeout: float = 30.0) -> Reply:
    return http(base, "POST", path, json.dumps(obj).encode(), "application/json", timeout)


# --- the stack ---------------------------------------------------------------------------------------
class Stack:
    def __init__(self, base: str, root: Path, videos: Path):
        self.base, self.root, self.videos = base, root, videos

    def get(self, path: str, timeout: float = 30.0) -> Reply:
        return http(self.base, "GET", path, timeout=timeout)

    def post(self, path: str, obj: Any, timeout: float = 30.0) -> Reply:
        return post_json(self.base, path, obj, timeout)

    def upload(self, path: str, name: str, data: bytes, fields: Optional[dict] = None, timeout: float = 60.0) -> Reply:
        body, ctype = multipart({"video": (name, data, "video/mp4")}, fields or {"max_frames": "999999"})
        return http(self.base, "POST", path, body, ctype, timeout)

    def diagnostics(self) -> dict:
        reply = self.get("/v1/diagnostics", timeout=15)
        assert reply.status == 200, reply.data[:300]
        return reply.json

    def ready(self) -> bool:
        try:
            reply = self.get("/health", timeout=5)
        except OSError:
            return False
        return reply.status == 200 and reply.json.get("ready") is True

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(self.ready, timeout, what="/health ready")

    def job_status(self, job_id: str, route: str = "/job_status/") -> dict:
        reply = self.get(route + job_id, timeout=10)
        assert reply.status == 200, reply.data[:300]
        return reply.json

    def wait_job(self, job_id: str, timeout: float = 90.0, seen: Optional[list] = None) -> dict:
        def final():
            status = self.job_status(job_id)
            if seen is not None:
                seen.append(status)
            return status if status["status"] in ("complete", "error") else None
        return wait_until(final, timeout, interval=0.2, what=f"job {job_id} to finish")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_data()
    root = tmp_path_factory.mktemp("legacy")
    videos = root / "videos"
    videos.mkdir()
    port = free_port()
    overrides = [f"state_dir={root / 'state'}", f"gateway.port={port}",
                 f"jobs.allowed_roots=[{DATA.resolve()},{videos}]", "engine.name=mediapipe",
                 "supervisor.heartbeat_s=0.5"]
    log = open(root / "serve.log", "wb")  # the daemon exactly as systemd runs it
    procs = [subprocess.Popen([sys.executable, "-m", "pose_service.cli", "serve", *overrides], cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)]
    log.close()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[3]} exited with {proc.returncode}; see {root}")
        try:
            return http(base, "GET", "/v1/health", timeout=3).status == 200
        except OSError:
            return False

    try:
        wait_until(up, 90, what="/v1/health 200")
        yield Stack(base, root, videos)
    finally:
        for proc in procs:  # serve stops the gateway, then the supervisor, which stops its worker
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --- test inputs ------------------------------------------------------------------------------------------
def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    import cv2
    ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    import cv2
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable image"
    return image


def clip_rgb_frames(limit: Optional[int] = None) -> list[np.ndarray]:
    out = []
    with av.open(str(CLIP)) as container:
        for frame in container.decode(container.streams.video[0]):
            out.append(frame.to_ndarray(format="rgb24"))
            if limit and len(out) >= limit:
                break
    return out


@pytest.fixture(scope="module")
def clip_jpegs() -> list[bytes]:
    need_data()
    return [jpeg(rgb) for rgb in clip_rgb_frames()]


@pytest.fixture(scope="module")
def photo_b64() -> str:
    need_data()
    return base64.b64encode(PHOTO.read_bytes()).decode()


def hybrid(stack: Stack, image: bytes, frame_number: int = 0, **extra) -> Reply:
    return stack.post("/pose/hybrid", {"image_base64": base64.b64encode(image).decode(),
                                       "frame_number": frame_number, **extra})


def assert_no_mesh(body: dict) -> None:
    for key in ("mesh_vertices_data", "mesh_faces_data"):
        assert key not in body, f"{key} must not be faked for a keypoint engine"


# --- pure mappings (no stack): the hmr2_phalp shapes, which this machine cannot produce for real ---------------
def hmr2_like_person(with_vertices: bool) -> dict:
    person = {"track_id": 3, "score": 0.87, "bbox_xyxy": [10.0, 20.0, 110.0, 220.0],
              "keypoints_2d": [[50.0 + i, 60.0 + i, 1.0] for i in range(45)],
              "keypoints_3d": [[0.01 * i, -0.02 * i, 0.03 * i] for i in range(45)],
              "smpl": {"global_orient": [[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]], "body_pose": [], "betas": [0.0] * 10},
              "camera": {"tx": 0.1, "ty": 0.2, "tz": 25.0, "focal_length": 12500.0, "cx": 320.0, "cy": 180.0},
              "camera_bbox": [0.9, 0.01, 0.02]}
    if with_vertices:
        person["vertices"] = [[0.0, 0.0, 0.0]] * 6890
    return person


def test_pure_hybrid_response_mesh_only_when_the_engine_has_one():
    from gateway.legacy_shapes import hybrid_response
    from gpu_worker.engines.hmr2_phalp import JOINT_NAMES

    reply = {"persons": [hmr2_like_person(True)], "width": 640, "height": 360, "ms": 5.0, "joint_names": JOINT_NAMES,
             "engine": {"name": "hmr2_phalp", "version": "detector=vitdet", "device": "cuda"}}
    body = hybrid_response(reply, 9, 12.0)
    assert body["camera_translation"] == [0.1, 0.2, 25.0] and body["camera_params"]["type"] == "weak_perspective"
    assert len(body["mesh_vertices_data"]) == 6890 and body["keypoint_count"] == 45
    assert "mesh_faces_data" not in body  # the image reply carries no faces: never invented
    assert body["keypoints"][13]["name"] == "left_knee" and isinstance(body["joint_angles_3d"]["left_knee"], float)
    reply["persons"] = [hmr2_like_person(False)]
    assert "mesh_vertices_data" not in hybrid_response(reply, 9, 12.0)
    reply["persons"] = []
    empty = hybrid_response(reply, 9, 12.0)
    assert empty["keypoints"] == [] and empty["has_3d"] is False and empty["error"] == "No person detected"


def test_pure_legacy_result_shape():
    from gateway.legacy_shapes import legacy_result

    native = {"job_id": "j1", "video_path": "v.mp4", "joint_names": ["nose"] * 45,
              "video": {"fps": 29.97, "width": 640, "height": 360, "duration_s": 0.1},
              "engine": {"name": "hmr2_phalp", "version": "x", "device": "cuda"}, "mesh_faces": [[0, 1, 2]],
              "frames": [{"frame_index": 0, "pts_s": 0.0, "persons": [hmr2_like_person(True)]},
                         {"frame_index": 1, "pts_s": 0.0334, "persons": []},
                         {"frame_index": 3, "pts_s": 0.1001, "persons": [hmr2_like_person(False)]}]}
    out = legacy_result(native, 2.5, "/x/result.json")
    frames = out["frames"]
    assert [f["frameNumber"] for f in frames] == [0, 1, 2, 3] and frames[2]["persons"] == []
    assert frames[3]["timestamp"] == 0.1001 and out["total_frames"] == out["metadata"]["frameCount"] == 4
    first = frames[0]["persons"][0]
    assert first["personId"] == 3 and first["tracked"] is True
    assert first["camera"] == {"tx": 0.1, "ty": 0.2, "tz": 25.0, "focalLength": 12500.0}
    assert set(first["smpl"]) == {"globalOrient", "bodyPose", "betas"}
    assert len(first["meshVertices"]) == 6890 and first["meshFaces"] == [[0, 1, 2]]
    assert "meshVertices" not in frames[3]["persons"][0] and "meshFaces" not in frames[3]["persons"][0]
    assert out["fps"] == 29.97 and out["video_duration"] == 0.1 and out["resolution"] == [640, 360]
    assert out["processing_time"] == 2.5 and out["output_path"] == "/x/result.json"


# --- §5.1, 5.3: health without traffic ------------------------------------------------------------------------
def test_health_ready_without_traffic(stack):
    reply = stack.get("/health", timeout=5)
    assert reply.status == 200 and reply.seconds < 5
    body = reply.json
    assert body["status"] == "ready" and body["ready"] is True, body
    assert body["service"] == "pose-service" and body["engine"] == "mediapipe"
    assert body["models"] == {"hmr2": "not_loaded", "vitdet": "not_loaded", "phalp": "not_loaded",
                              "mediapipe": "loaded"}
    assert body["device"] == "cpu" and body["worker"] == "ready"
    assert abs(body["timestamp"] - time.time()) < 60
    # §5.3: nothing but /v1/health has been asked; the worker loaded at startup, not lazily
    boot = stack.diagnostics()["boots"][-1]
    assert boot["result"] == "ready" and [s["name"] for s in boot["stages"]][-1] == "detector"


# --- §5.4, 5.6, 5.7 ------------------------------------------------------------------------------------------------
def test_pose_hybrid_finds_the_person(stack, photo_b64):
    reply = stack.post("/pose/hybrid", {"image_base64": photo_b64, "frame_number": 7})
    assert reply.status == 200, reply.data[:300]
    body = reply.json  # strict: NaN/Infinity anywhere fails here
    assert body["frame_number"] == 7 and body["has_3d"] is True and body["error"] is None
    keypoints = body["keypoints"]
    assert keypoints and body["keypoint_count"] == len(keypoints) == 33
    for kp in keypoints:
        assert isinstance(kp["name"], str)
        for key in ("x", "y", "z", "confidence", "x_3d", "y_3d", "z_3d"):
            assert isinstance(kp[key], (int, float)) and not isinstance(kp[key], bool), (key, kp)
    assert sum(kp["confidence"] > 0.5 for kp in keypoints) >= 20
    names = [kp["name"] for kp in keypoints]
    assert {"left_knee", "right_ankle", "nose"} <= set(names)
    assert (body["frame_width"], body["frame_height"]) == (1068, 1600)
    inside = [kp for kp in keypoints if 0 <= kp["x"] <= 1068 and 0 <= kp["y"] <= 1600]
    assert len(inside) >= 30  # pixels, not metres
    assert isinstance(body["processing_time_ms"], (int, float)) and body["processing_time_ms"] > 0
    assert isinstance(body["model_version"], str) and body["model_version"].startswith("mediapipe-")
    assert 0 < body["tracking_confidence"] <= 1
    assert len(body["joints_3d_raw"]) == 33 and all(len(p) == 3 for p in body["joints_3d_raw"])
    angles = body["joint_angles_3d"]
    for key in ("left_knee", "right_knee", "left_hip", "right_hip", "left_elbow", "right_elbow",
                "left_shoulder", "right_shoulder", "spine"):
        assert isinstance(angles[key], (int, float)) and 0 <= angles[key] <= 180, (key, angles)
    assert angles["left_knee"] < 150  # the photo is a lunge: the front knee is clearly bent
    assert body["camera_translation"] is None  # MediaPipe has no camera model (documented)
    assert_no_mesh(body)
    assert "visualization" not in body


def test_visualize_draws_a_png(stack, photo_b64):
    reply = stack.post("/pose/hybrid", {"image_base64": "data:image/jpeg;base64," + photo_b64, "frame_number": 1,
                                        "visualize": True}, timeout=60)
    assert reply.status == 200, reply.data[:300]
    body = reply.json
    assert body["visualization"].startswith("data:image/png;base64,")
    png = base64.b64decode(body["visualization"].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = decode_image(png)
    assert drawn.shape[:2] == (1600, 1068)
    original = decode_image(PHOTO.read_bytes())
    changed = np.any(np.abs(drawn.astype(int) - original.astype(int)) > 60, axis=2)
    assert changed.sum() > 2000  # the skeleton is drawn on the photo


# --- §5.8, 5.9, 5.10, 5.11 -----------------------------------------------------------------------------------------
def test_bad_requests_are_json_4xx(stack, photo_b64):
    reply = stack.post("/pose/hybrid", {"frame_number": 1})
    assert reply.status == 400 and reply.json == {"error": "Missing image_base64", "code": "missing_image"}
    reply = http(stack.base, "POST", "/pose/hybrid", b"hello", "text/plain")
    assert 400 <= reply.status < 500 and isinstance(reply.json["error"], str)
    reply = http(stack.base, "POST", "/pose/hybrid", b"{not json", "application/json")
    assert reply.status == 400 and isinstance(reply.json["error"], str)
    reply = http(stack.base, "POST", "/pose/hybrid", b"")
    assert 400 <= reply.status < 500 and isinstance(reply.json["error"], str)
    body, ctype = multipart({}, {"frameNumber": "3"})
    reply = http(stack.base, "POST", "/pose/hybrid", body, ctype)
    assert reply.status == 400 and isinstance(reply.json["error"], str)
    for corrupt in ("%%%not-base64%%%", base64.b64encode(os.urandom(3000)).decode(), "data:image/png;base64,AAAA"):
        reply = stack.post("/pose/hybrid", {"image_base64": corrupt, "frame_number": 2})
        assert reply.status == 400, reply.data[:200]
        assert reply.json["error"].startswith("Failed to decode image"), reply.json
    # the next valid request succeeds
    reply = stack.post("/pose/hybrid", {"image_base64": photo_b64, "frame_number": 3})
    assert reply.status == 200 and reply.json["keypoint_count"] == 33


def test_multipart_frame_like_the_mobile_proxy(stack):
    body, ctype = multipart({"frame": ("frame.jpg", PHOTO.read_bytes(), "image/jpeg")}, {"frameNumber": "12"})
    reply = http(stack.base, "POST", "/pose/hybrid", body, ctype)
    assert reply.status == 200, reply.data[:300]
    assert reply.json["frame_number"] == 12 and reply.json["keypoint_count"] == 33


def test_no_person_is_200_with_an_error_string(stack):
    rng = np.random.default_rng(0)
    blank = np.full((360, 640, 3), 120, dtype=np.uint8) + rng.integers(0, 8, (360, 640, 3), dtype=np.uint8)
    reply = hybrid(stack, jpeg(blank), frame_number=4)
    assert reply.status == 200, reply.data[:300]
    body = reply.json
    assert body["keypoints"] == [] and body["keypoint_count"] == 0 and body["has_3d"] is False
    assert body["error"] == "No person detected" and body["frame_number"] == 4
    assert (body["frame_width"], body["frame_height"]) == (640, 360)


# --- §5.14 -------------------------------------------------------------------------------------------------
def test_worker_killed_mid_request_gives_json_5xx_then_recovers(stack, clip_jpegs):
    frame = base64.b64encode(clip_jpegs[40]).decode()
    old_pid = stack.diagnostics()["worker"]["pid"]
    statuses: list[tuple[int, Any]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def stream() -> None:
        try:
            for i in range(400):
                if stop.is_set():
                    return
                reply = stack.post("/pose/hybrid", {"image_base64": frame, "frame_number": i}, timeout=60)
                statuses.append((reply.status, reply.json))  # always JSON, whatever the status
        except BaseException as exc:  # noqa: BLE001 - a reset connection lands here
            errors.append(exc)

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: len(statuses) >= 4, 30, what="requests flowing")
    os.kill(old_pid, signal.SIGKILL)
    killed_at = len(statuses)
    wait_until(lambda: any(s >= 500 for s, _ in statuses[killed_at:]), 20, interval=0.05, what="a 5xx after the kill")
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for status, body in statuses:
        assert status == 200 or status in (503, 504), (status, body)
        if status != 200:
            assert isinstance(body["error"], str) and body["error"]
    stack.wait_ready(60)
    assert stack.diagnostics()["worker"]["pid"] != old_pid
    reply = hybrid(stack, clip_jpegs[40], frame_number=1)
    assert reply.status == 200 and reply.json["keypoint_count"] == 33


# --- §5.15, 5.16, 5.2, 5.12 ----------------------------------------------------------------------------------------------
def test_warmup_reports_load_times(stack):
    reply = stack.get("/warmup", timeout=120)
    assert reply.status == 200 and reply.seconds < 120, reply.data[:300]
    body = reply.json
    assert body["status"] == "ready"
    assert body["mediapipe"]["status"] == "loaded" and body["mediapipe"]["load_time_seconds"] > 0
    assert body["hmr2"]["status"] == "not_loaded" and body["vitdet"]["status"] == "not_loaded"
    again = stack.get("/warmup", timeout=120)
    assert again.status == 200 and again.seconds < 2


def test_reload_then_warming_up_then_ready(stack, photo_b64):
    reply = stack.post("/reload", {}, timeout=10)
    assert reply.status == 200 and reply.seconds < 10
    body = reply.json
    assert body["status"] == "reloaded" and set(body["models"]) >= {"hmr2", "vitdet"}
    seen_loading, cold = [], None
    for _ in range(200):  # bounded: about 20 s
        health = stack.get("/health", timeout=5)
        assert health.status == 200 and health.seconds < 5
        h = health.json
        if h["ready"]:
            break
        assert h["status"] == "warming_up" and h["ready"] is False, h
        seen_loading.append(h["worker"])
        if cold is None:  # §5.12: a cold worker answers 503 fast (or a real answer)
            cold = stack.post("/pose/hybrid", {"image_base64": photo_b64, "frame_number": 5}, timeout=120)
            assert cold.seconds < 5 or cold.status == 200
            assert cold.status in (200, 503), cold.data[:200]
            if cold.status == 503:
                assert isinstance(cold.json["error"], str)
        time.sleep(0.1)
    assert seen_loading, "never saw warming_up after /reload"
    warm = stack.get("/warmup", timeout=120)
    assert warm.status == 200 and warm.json["status"] == "ready"
    assert stack.get("/health", timeout=5).json["status"] == "ready"


# --- §5.17-5.19, 5.22-5.24 on the real clip ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_job(stack):
    stack.wait_ready(60)
    reply = stack.upload("/process_video_async", "original.mp4", CLIP.read_bytes(), timeout=30)
    assert reply.status == 200 and reply.seconds < 30, reply.data[:300]
    body = reply.json
    assert body["status"] == "accepted" and isinstance(body["job_id"], str) and body["message"]
    seen: list[dict] = []
    health_times = []

    def done():
        status = stack.job_status(body["job_id"])
        seen.append(status)
        health_times.append(stack.get("/health", timeout=5).seconds)
        return status if status["status"] in ("complete", "error") else None

    final = wait_until(done, 90, interval=0.2, what="the clip job")
    return {"job_id": body["job_id"], "final": final, "seen": seen, "health_times": health_times}


def test_job_status_moves_to_complete(stack, clip_job):
    words = [s["status"] for s in clip_job["seen"]]
    assert set(words) <= {"queued", "processing", "complete"}, words
    assert words[-1] == "complete"
    for status in clip_job["seen"]:
        if status["status"] == "processing":
            assert isinstance(status["elapsed_time"], (int, float)) and status["elapsed_time"] >= 0
            assert 0 <= status["progress"]["frames_done"] <= CLIP_FRAMES
    assert "processing" in words or "queued" in words
    assert max(clip_job["health_times"]) < 5  # §5.24 during a video job
    final = clip_job["final"]
    assert isinstance(final["processing_time"], (int, float)) and final["processing_time"] > 0
    assert final["output_path"] and os.path.isfile(final["output_path"])
    reply = stack.get("/job_status/no-such-job")
    assert reply.status == 404 and reply.json == {"error": "Job not found", "code": "not_found"}
    reply = stack.get("/pose/video/status/no-such-job")
    assert reply.status == 404 and reply.json == {"error": "Job not found", "code": "not_found"}
    assert stack.job_status(clip_job["job_id"], "/pose/video/status/")["status"] == "complete"


def test_clip_result_has_every_frame(stack, clip_job):
    result = clip_job["final"]["result"]
    frames = result["frames"]
    assert len(frames) == CLIP_FRAMES == result["total_frames"] == result["frame_count"]
    assert [f["frameNumber"] for f in frames] == list(range(CLIP_FRAMES))
    with_person = [f for f in frames if f["persons"]]
    assert len(with_person) >= 110, len(with_person)
    assert abs(result["fps"] - 29.97) < 0.01 and abs(result["video_duration"] - 4.07) < 0.02
    assert result["resolution"] == [640, 360]
    assert result["metadata"]["frameCount"] == CLIP_FRAMES and result["metadata"]["engine"]["name"] == "mediapipe"
    stamps = [f["timestamp"] for f in frames]
    assert stamps[0] == pytest.approx(0.0, abs=1e-3)
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    assert stamps[-1] == pytest.approx(121 / 29.97, abs=0.01)
    person = with_person[0]["persons"][0]
    assert person["tracked"] is True and 0 < person["confidence"] <= 1 and person["personId"] == 1
    assert len(person["keypoints"]) == 33 and set(person["keypoints"][0]) == {"name", "x", "y", "z", "confidence"}
    assert person["camera"] is None and person["smpl"] is None
    assert "meshVertices" not in person and "meshFaces" not in person
    assert result["output_path"] == clip_job["final"]["output_path"]
    native = stack.get(f"/v1/jobs/{clip_job['job_id']}/legacy")
    assert native.status == 200 and native.json["frames"] == frames


def test_frame_route(stack, clip_job):
    job_id = clip_job["job_id"]
    reply = stack.get(f"/frame/{job_id}/60")
    assert reply.status == 200 and reply.content_type == "image/jpeg"
    drawn = decode_image(reply.data)
    assert drawn.shape == (360, 640, 3)
    bare = stack.get(f"/frame/{job_id}/60?overlay=0")
    assert bare.status == 200
    bare_img = decode_image(bare.data).astype(int)
    truth = clip_rgb_frames(61)
    exact = np.abs(bare_img - truth[60][:, :, ::-1].astype(int)).mean()
    other = np.abs(bare_img - truth[45][:, :, ::-1].astype(int)).mean()
    assert exact < 4 and exact < other / 2, (exact, other)  # the seek landed on frame 60 itself
    assert np.abs(drawn.astype(int) - bare_img).max() > 100  # the pose is drawn
    for bad in ("122", "-1", "abc", "1.5"):
        reply = stack.get(f"/frame/{job_id}/{bad}")
        assert reply.status == 400 and isinstance(reply.json["error"], str), (bad, reply.data[:200])
    reply = stack.get("/frame/no-such-job/0")
    assert reply.status == 404 and reply.json == {"error": "Job not found", "code": "not_found"}


# --- §5.20 corrupt input, §5.23 job not complete ---------------------------------------------------------------------------
def test_bad_videos_are_refused_up_front_and_a_cut_one_says_so(stack):
    """Nothing is silently partial: not a video -> 415, undecodable -> 422 up front on the synchronous and
    native routes (never 500); the async route the mobile screens use accepts it with a job id whose first
    poll is status error with the same reason and code (the backend's proxy would hide a 4xx's reason).
    A video cut after its first frames completes with a warning giving the counts."""
    bad = {"undecodable_video": ("broken.mp4", b"this is not a video\n" * 500, 422),
           "not_a_video": ("photo.mp4", PHOTO.read_bytes(), 415)}  # a still image in a video's clothes
    for code, (name, data, status) in bad.items():
        reply = stack.upload("/process_video", name, data, timeout=30)
        assert reply.status == status and reply.json["code"] == code and reply.json["error"], name
        body, ctype = multipart({"video": (name, data, "video/mp4")}, {})
        native = http(stack.base, "POST", "/v1/jobs", body, ctype, 30)
        assert native.status == status and native.json["code"] == code, native.data[:300]
        reply = stack.upload("/process_video_async", name, data, {"max_frames": "15"}, timeout=30)
        assert reply.status == 200 and reply.json["status"] == "accepted" and reply.json["job_id"], reply.data[:300]
        first = stack.job_status(reply.json["job_id"])  # the first poll already says why
        assert first["status"] == "error" and first["error"] == native.json["error"], first
        assert first["code"] == code and first["http_status"] == status
        assert stack.job_status(reply.json["job_id"], "/pose/video/status/")["status"] == "error"
        frame = stack.get(f"/frame/{reply.json['job_id']}/0")
        assert frame.status == 400 and "not complete" in frame.json["error"]
    assert stack.get("/job_status/refused-0123456789abcdef0123456789abcdef").status == 404
    reply = stack.upload("/process_video", "broken.mp4", b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000), timeout=60)
    assert 400 <= reply.status < 500 and reply.json["error"]
    reply = stack.upload("/process_video_async", "cut.mp4", CLIP.read_bytes()[:200_000], timeout=30)
    assert reply.status == 200 and reply.json["status"] == "accepted"
    final = stack.wait_job(reply.json["job_id"], timeout=60)
    assert final["status"] == "complete", final
    result = final["result"]
    assert result["truncated"] is True and result["frames_expected"] == 122
    assert result["frames_decoded"] == len(result["frames"]) < 122
    assert "truncated" in final["warning"] and f"decoded {len(result['frames'])} of the 122" in final["warning"]
    assert stack.ready()


def test_frame_of_an_unfinished_job_is_refused(stack):
    stack.wait_ready(60)
    reply = stack.upload("/process_video_async", "clip.mp4", CLIP.read_bytes(), timeout=30)
    job_id = reply.json["job_id"]
    first = stack.get(f"/frame/{job_id}/0")
    if first.status != 200:  # it may already be done on a fast machine
        assert first.status == 400 and "not complete" in first.json["error"]
    stack.wait_job(job_id, timeout=60)


# --- §5.21 /pose/video -----------------------------------------------------------------------------------------------------
def test_pose_video_paths_and_queue(stack):
    stack.wait_ready(60)
    for payload in ({}, {"video_path": ""}, {"video_path": str(stack.videos / "missing.mp4")},
                    {"video_path": "C:\\Users\\benja\\Videos\\v_1766895135670_2.mov"}):
        reply = stack.post("/pose/video", payload)
        assert reply.status == 400 and isinstance(reply.json["error"], str), (payload, reply.data[:200])
    reply = http(stack.base, "POST", "/pose/video", b"video_path=x", "application/x-www-form-urlencoded")
    assert 400 <= reply.status < 500 and reply.json["error"]

    copy = stack.videos / "second.mp4"
    shutil.copyfile(CLIP, copy)
    first = stack.post("/pose/video", {"video_path": str(CLIP)})
    second = stack.post("/pose/video", {"video_path": str(copy)})
    assert first.status == 202 and second.status == 202, (first.data[:200], second.data[:200])
    assert first.json["status"] in ("processing", "queued")
    assert second.json["status"] == "queued" and second.json["queue_position"] >= 1, second.json
    for reply in (first, second):
        final = stack.wait_job(reply.json["job_id"], timeout=60)
        assert final["status"] == "complete", final.get("error")
        assert len(final["result"]["frames"]) == CLIP_FRAMES


# --- §5.22 every frame, empty ones included; synchronous /process_video ---------------------------------------------------------
def test_process_video_sync_keeps_frames_without_person(stack):
    stack.wait_ready(60)
    path = stack.root / "person_then_black.mp4"
    people = clip_rgb_frames(12)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for rgb in people + [np.zeros((360, 640, 3), dtype=np.uint8)] * 12:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    reply = stack.upload("/process_video", "mixed.mp4", path.read_bytes(),
                         {"max_frames": "999999", "output_format": "file_path"}, timeout=120)  # what the backend sends
    assert reply.status == 200, reply.data[:300]
    body = reply.json
    assert body["status"] == "success"
    frames = body["data"]["frames"]
    assert [f["frameNumber"] for f in frames] == list(range(24))  # frames without a person are kept
    assert sum(bool(f["persons"]) for f in frames[:12]) >= 8
    assert sum(not f["persons"] for f in frames[12:]) >= 10
    assert body["data"]["fps"] == pytest.approx(30.0, abs=0.01)
    assert body["data"]["output_path"].endswith(".mp4")
    sampled = stack.upload("/process_video", "mixed.mp4", path.read_bytes(), {"max_frames": "5"}, timeout=120).json
    timeline = sampled["data"]["pose_timeline"]
    assert [t["frameNumber"] for t in timeline] == list(range(5))
    assert [t["originalFrameNumber"] for t in timeline] == [0, 4, 9, 14, 19]  # spread evenly, as the app's service did
