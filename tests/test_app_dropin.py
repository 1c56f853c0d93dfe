"""Issue: drop-in, as the app's own code sees it. The calls below are the ones the user's backend
(backend/src/server.ts, routes #8-#11) and mobile app (VideoAnalysisScreen.tsx, VideoCoachScreen.tsx)
make, with their bodies, fields and polling interval; the assertions are on what those files read.
Also: a client polling every 200 ms through a gateway kill and a whole-service restart on a socket
handed over as systemd does sees every poll answered, none refused or reset."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import av

from support import CLIP, Served, http, needs_shared_data, post_form, wait_for

APP_POLL_S = 5.0  # VideoAnalysisScreen polls job_status every 5 s


def frames_in(path: str) -> int:
    with av.open(path) as video:
        return sum(1 for _ in video.decode(video=0))


@needs_shared_data()
def test_the_mobile_app_flow_sees_a_whole_result_at_the_first_complete(tmp_path):
    served = Served(tmp_path, ["engine.name=mediapipe", "probe.enabled=false"])
    try:
        served.wait_ready()
        # VideoAnalysisScreen: FormData {video: {uri, type: 'video/mp4', name}, max_frames: '15'} to the
        # backend's /api/video/process_async, which forwards the same form to /process_video_async
        status, accepted = post_form(served.url + "/process_video_async", {"max_frames": "15"}, "video",
                                     "v_1767579936667_k0z18lmds.mp4", CLIP.read_bytes())
        assert status == 200 and accepted["status"] == "accepted" and accepted["job_id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the app: poll every 5 s until complete or error
            status, data = http("GET", f"{served.url}/job_status/{accepted['job_id']}", timeout=15)
            assert status == 200 and data["status"] in ("queued", "processing", "complete"), data
            if data["status"] == "complete":
                break
            assert data["status"] == "queued" or isinstance(data["elapsed_time"], (int, float))
            time.sleep(APP_POLL_S)
        result = data["result"]
        # what the screen reads: pose_timeline, processed_frames, processing_time_seconds, fps, resolution,
        # output_size_mb; and the backend's /api/video/output/:id reads output_path from disk at this moment
        timeline = result["pose_timeline"]
        assert len(timeline) == 15 == result["processed_frames"]
        assert [t["frameNumber"] for t in timeline] == list(range(15))
        assert all(isinstance(t["jointAngles"], dict) and isinstance(t["keypoints"], list) for t in timeline)
        assert sum(t["has3D"] for t in timeline) >= 12
        assert result["resolution"] == [640, 360] and abs(result["fps"] - 29.97) < 0.01
        assert isinstance(result["processing_time_seconds"], (int, float))
        output = data["output_path"]
        assert output == result["output_path"] and output.endswith(".mp4")
        assert frames_in(output) == 15  # a playable video with every frame of the result, at the first complete
        assert result["output_size_mb"] == round(os.path.getsize(output) / (1 << 20), 2) > 0
        native = http("GET", f"{served.url}/v1/jobs/{accepted['job_id']}/result")[1]
        assert [f["frame_index"] for f in native["frames"]] == [t["originalFrameNumber"] for t in timeline]
        for item, frame in zip(timeline, native["frames"]):
            assert item["has3D"] == bool(frame["persons"])
            assert len(item["keypoints"]) == (len(frame["persons"][0]["keypoints_2d"]) if frame["persons"] else 0)
    finally:
        served.stop()


@needs_shared_data()
def test_the_backends_synchronous_route_and_max_frames(tmp_path):
    served = Served(tmp_path, ["engine.name=mediapipe", "probe.enabled=false"])
    try:
        served.wait_ready()
        # server.ts /api/video/process_video: multipart video, max_frames '999999', output_format 'file_path'
        status, body = post_form(served.url + "/process_video", {"max_frames": "999999", "output_format": "file_path"},
                                 "video", "original.mp4", CLIP.read_bytes())
        assert status == 200 and body["status"] == "success"
        data = body["data"]
        assert data["total_frames"] == 122 == len(data["frames"]) == len(data["pose_timeline"])
        assert data["output_path"].endswith(".mp4") and frames_in(data["output_path"]) == 122
        # VideoCoachScreen reads output_path, processing_time, total_frames, processed_frames
        assert isinstance(data["processing_time"], (int, float)) and data["processed_frames"] == 122
        # too many frames to inline: no image in any frame, and the answer says where they are
        assert not any("image_base64" in f for f in data["frames"])
        assert data["frame_images"]["included"] is False and "/frame/" in data["frame_images"]["reason"]
        # VideoCoachScreen (max_frames 10): its carousel renders data.frames[i].image_base64 as a JPEG
        status, body = post_form(served.url + "/process_video", {"max_frames": "10"}, "video", "original.mp4",
                                 CLIP.read_bytes())
        assert status == 200 and len(body["data"]["frames"]) == 10 == len(body["data"]["pose_timeline"])
        assert body["data"]["frame_images"] == {"included": True, "format": "image/jpeg", "count": 10}
        assert_carousel_shows_each_frame_with_its_pose(body["data"]["frames"])
    finally:
        served.stop()


def clip_frames_bgr() -> list:
    with av.open(str(CLIP)) as video:
        return [frame.to_ndarray(format="bgr24") for frame in video.decode(video=0)]


def assert_carousel_shows_each_frame_with_its_pose(frames: list[dict]) -> None:
    """Each image is the frame it names (640x360), with the pose drawn where a person was found."""
    import base64

    import cv2
    import numpy as np

    truth = clip_frames_bgr()
    drawn = 0
    for frame in frames:
        jpeg = base64.b64decode(frame["image_base64"], validate=True)
        assert jpeg[:2] == b"\xff\xd8"  # a JPEG, as the app's data:image/jpeg;base64 URI says
        image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (360, 640, 3)
        diff = np.abs(image.astype(int) - truth[frame["originalFrameNumber"]].astype(int))
        assert np.median(diff) < 4  # this very frame, not a neighbour
        if frame["persons"]:
            x0, y0, x1, y1 = (int(v) for v in frame["persons"][0]["bbox"])
            assert diff[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4].max() > 100  # the skeleton is drawn
            drawn += 1
    assert drawn >= 8


def test_the_mobile_async_flow_shows_why_a_video_was_refused(tmp_path):
    """VideoAnalysisScreen uploads a JPEG renamed .mp4 through the backend's /api/video/process_async: the
    service accepts it with a job id (the proxy would turn a 415 into "500 - Request failed with status
    code 415"), and the first poll shows status error with the reason. The native route still answers 415."""
    import cv2
    import numpy as np

    ok, jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), 200, dtype=np.uint8))
    served = Served(tmp_path, ["engine.name=noop", "probe.enabled=false"])
    try:
        served.wait_ready()
        status, accepted = post_form(served.url + "/process_video_async", {"max_frames": "15"}, "video",
                                     "clip.mp4", jpeg.tobytes())
        assert status == 200 and accepted["status"] == "accepted" and accepted["job_id"], accepted
        status, data = http("GET", f"{served.url}/job_status/{accepted['job_id']}", timeout=10)
        assert status == 200 and data["status"] == "error", data
        assert "not a video" in data["error"] and data["code"] == "not_a_video" and data["http_status"] == 415
        status, native = post_form(served.url + "/v1/jobs", {}, "video", "clip.mp4", jpeg.tobytes())
        assert status == 415 and native["code"] == "not_a_video" and native["error"] == data["error"]
    finally:
        served.stop()


def inherited_socket_prefix(fd: int) -> list[str]:
    """Start `serve` the way systemd does socket activation: the socket at fd 3, LISTEN_FDS=1, and
    LISTEN_PID naming the process itself (the shell execs python, so its PID is the service's)."""
    return ["bash", "-c", f'exec 3<&{fd} {fd}<&-; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" "$@"']


def test_a_polling_client_sees_no_refused_or_reset_connection_across_restarts(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port, fd = listener.getsockname()[1], listener.fileno()
    outcomes: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        for _ in range(1500):  # bounded: 200 ms apart, at most 5 minutes
            if stop.is_set():
                return
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as response:
                    outcomes.append(str(response.status))
            except urllib.error.HTTPError as exc:
                outcomes.append(str(exc.code))
            except OSError as exc:  # refused, reset, timed out: what this test forbids
                outcomes.append(type(exc).__name__ + ": " + str(exc))
            time.sleep(0.2)

    first = Served(tmp_path / "first", ["engine.name=noop", "probe.enabled=false"], port=port, pass_fds=(fd,),
                   argv_prefix=inherited_socket_prefix(fd))
    poller = threading.Thread(target=poll, daemon=True)
    second = None
    try:
        first.wait_ready()
        poller.start()
        time.sleep(1.0)
        gateway = first.diagnostics()["gateway_pid"]
        os.kill(gateway, signal.SIGTERM)  # the gateway restarts on the socket its manager holds
        wait_for(lambda: http("GET", first.url + "/v1/diagnostics", timeout=30)[1].get("gateway_pid") not in
                 (None, gateway), 30, what="a new gateway")
        time.sleep(1.0)
        assert first.stop() == 0  # the whole service goes; the socket (systemd's) stays
        second = Served(tmp_path / "second", ["engine.name=noop", "probe.enabled=false"], port=port, pass_fds=(fd,),
                        argv_prefix=inherited_socket_prefix(fd))
        second.wait_ready()
        time.sleep(1.0)
    finally:
        stop.set()
        poller.join(60) if poller.is_alive() else None
        for served in (first, second):
            if served:
                served.stop()
        listener.close()
    failures = [o for o in outcomes if o != "200"]
    assert len(outcomes) >= 15 and failures == [], failures
