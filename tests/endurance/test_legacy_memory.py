"""The legacy routes worn down (tests/test_legacy_routes.py §5.13, 5.24): 200 `/pose/hybrid` frames
then four concurrent streams, `/health` answering throughout and the worker's memory flat. Here
because it is a soak, not an example."""
from __future__ import annotations

import base64
import threading
import time

from test_legacy_routes import clip_jpegs, stack  # noqa: F401  (the fixtures)


# --- §5.13, 5.24 (under /pose/hybrid load) ---------------------------------------------------------------------------
def test_many_frames_then_concurrent_streams_memory_flat(stack, clip_jpegs):  # noqa: F811  (fixtures imported above)
    frames = [base64.b64encode(data).decode() for data in clip_jpegs]
    pid = stack.diagnostics()["worker"]["pid"]
    rss_after_20 = None
    with_person = 0
    for i in range(200):
        reply = stack.post("/pose/hybrid", {"image_base64": frames[i % len(frames)], "frame_number": i})
        assert reply.status == 200, (i, reply.data[:300])
        body = reply.json
        assert body["frame_number"] == i and body["keypoint_count"] == len(body["keypoints"])
        with_person += bool(body["keypoints"])
        if i == 19:
            time.sleep(1.1)  # let a heartbeat carry the RSS after 20 frames
            rss_after_20 = stack.diagnostics()["worker"]["rss"]
    assert with_person >= 150, with_person

    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def stream(n: int) -> None:
        try:
            for k in range(25):
                index = (n * 25 + k) % len(frames)
                reply = stack.post("/pose/hybrid", {"image_base64": frames[index], "frame_number": index})
                results.append((reply.status, reply.json["frame_number"] if reply.status == 200 else -1))
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = []
    for n in range(4):
        threads.append(threading.Thread(target=stream, args=(n,), daemon=True))
        threads[-1].start()
        time.sleep(0.05)
    health_times = []
    while any(t.is_alive() for t in threads) and len(health_times) < 200:
        reply = stack.get("/health", timeout=5)
        assert reply.status == 200
        health_times.append(reply.seconds)
        time.sleep(0.1)
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 100 and all(status == 200 for status, _ in results), results[:10]
    assert health_times and max(health_times) < 5, max(health_times)

    time.sleep(1.1)
    worker = stack.diagnostics()["worker"]
    assert worker["pid"] == pid, "the worker restarted during the run"
    assert worker["rss"] <= 1.3 * rss_after_20, (rss_after_20, worker["rss"])
