"""Issue: jobs people can live with. Live progress as server-sent events (resumable without repeats),
results streamed from the ledger while the job runs, the overlay served with range requests, a job
list, bounded disk (410 for a removed job, 507 before an upload that would not fit), and a full queue
that says when to come back (429 + Retry-After) without losing an accepted job."""
from __future__ import annotations

import json
import os
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import av

from support import CLIP, Stack, http, make_clip, needs_shared_data, wait_for

NOOP = ["engine.name=noop", "probe.enabled=false"]


def sse_events(url: str, last_event_id: int = 0, timeout: float = 120) -> list[dict]:
    """Read a whole event stream (it ends with the job's terminal state)."""
    request = urllib.request.Request(url, headers={"Last-Event-ID": str(last_event_id)} if last_event_id else {})
    events, current = [], {}
    with urllib.request.urlopen(request, timeout=timeout) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else int(value) if field == "id" else value
    return events


@needs_shared_data()
def test_progress_events_of_the_shared_clip_and_a_reconnect_without_repeats(tmp_path):
    stack = Stack(tmp_path, ["engine.name=mediapipe", "probe.enabled=false"], gateway=True)
    try:
        stack.wait_ready(60)
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 30, what="gateway")
        job_id = http("POST", stack.url + "/v1/jobs", {"video_path": str(CLIP)})[1]["job_id"]
        events = sse_events(f"{stack.url}/v1/jobs/{job_id}/events")
        kinds = [e["event"] for e in events]
        assert kinds[0] == "queued" and "running" in kinds and kinds[-1] == "done", kinds
        assert events[-1]["data"]["frames"] == 122
        done = [e["data"]["frames_done"] for e in events if e["event"] == "progress"]
        assert done and done == sorted(done) and done[-1] <= 122  # monotone
        assert all(e["data"]["frames_total"] == 122 for e in events if e["event"] == "progress")
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids))
        middle = ids[len(ids) // 2]
        again = sse_events(f"{stack.url}/v1/jobs/{job_id}/events", last_event_id=middle)
        assert [e["id"] for e in again] == [i for i in ids if i > middle]  # no repeats, nothing missed
        assert sse_events(f"{stack.url}/v1/jobs/{job_id}/events", last_event_id=ids[-1]) == []
        status, body = http("GET", stack.url + "/v1/jobs/no-such-job/events")
        assert status == 404 and body["error"] == "Job not found"
    finally:
        stack.stop()


@needs_shared_data()
def test_overlay_is_served_with_range_requests(tmp_path):
    stack = Stack(tmp_path, ["engine.name=mediapipe", "probe.enabled=false"], gateway=True)
    try:
        stack.wait_ready(60)
        job = stack.wait_job(stack.submit(CLIP), timeout=120)
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 30, what="gateway")
        status, video = http("GET", f"{stack.url}/v1/jobs/{job['job_id']}/overlay.mp4")
        assert status == 200 and len(video) == os.path.getsize(job["overlay_path"])
        copy = tmp_path / "overlay.mp4"
        copy.write_bytes(video)
        with av.open(str(copy)) as overlay:
            assert sum(1 for _ in overlay.decode(video=0)) == 122
        status, part = http("GET", f"{stack.url}/v1/jobs/{job['job_id']}/overlay.mp4", headers={"Range": "bytes=100-299"})
        assert status == 206 and part == video[100:300]
    finally:
        stack.stop()


def test_ndjson_streams_frames_while_the_job_runs_and_a_job_list_pages(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=120)
    stack = Stack(tmp_path, [*NOOP, "+engine.options.frame_delay_s=0.03"], gateway=True)
    try:
        stack.wait_ready(30)
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 30, what="gateway")
        job_id = http("POST", stack.url + "/v1/jobs", {"video_path": str(clip)})[1]["job_id"]
        wait_for(lambda: http("GET", f"{stack.url}/v1/jobs/{job_id}")[1].get("frames_done", 0) >= 5, 30,
                 interval=0.05, what="the first frames")
        for route in ("result", "report", "legacy"):  # not finished yet: 409 with the job's own status
            status, body = http("GET", f"{stack.url}/v1/jobs/{job_id}/{route}")
            assert status == 409 and body["code"] == "conflict" and body["status"] == "running", (route, body)
        lines, seen_running = [], None
        with urllib.request.urlopen(f"{stack.url}/v1/jobs/{job_id}/result?format=ndjson", timeout=60) as stream:
            for raw in stream:
                lines.append(json.loads(raw))
                if len(lines) == 2:  # the first frame arrived before the job finished
                    seen_running = http("GET", f"{stack.url}/v1/jobs/{job_id}")[1]["status"]
        assert seen_running == "running"
        assert lines[0]["job_id"] == job_id and lines[-1]["summary"]["frames"] == 120
        assert [line["frame_index"] for line in lines[1:-1]] == list(range(120))
        full = http("GET", f"{stack.url}/v1/jobs/{job_id}/result")[1]
        assert [f["frame_index"] for f in full["frames"]] == list(range(120)) and full["summary"]["frames"] == 120
        short = make_clip(tmp_path / "short.mp4", frames=4)  # the list's paging needs jobs, not frames
        for _ in range(4):
            stack.wait_job(stack.submit(short), timeout=60)
        first = http("GET", f"{stack.url}/v1/jobs?limit=3")[1]
        second = http("GET", f"{stack.url}/v1/jobs?limit=3&before={first['next_before']}")[1]
        listed = [j["job_id"] for j in first["jobs"] + second["jobs"]]
        assert len(listed) == 5 and len(set(listed)) == 5 and second["next_before"] is None
        assert http("GET", f"{stack.url}/v1/jobs?state=done")[1]["jobs"][0]["status"] == "done"
        assert http("GET", f"{stack.url}/v1/jobs?limit=0")[0] == 400
    finally:
        stack.stop()


def test_200_concurrent_submissions_get_202_or_429_and_cancelling_keeps_the_worker(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=30)
    stack = Stack(tmp_path, [*NOOP, "+engine.options.frame_delay_s=0.02", "jobs.queue_max=40"], gateway=True)
    try:
        generation = stack.wait_ready(30)["generation"]
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 30, what="gateway")
        answers: list[tuple[int, dict, str]] = []
        lock = threading.Lock()

        def submit(_: int) -> None:
            request = urllib.request.Request(stack.url + "/v1/jobs", data=json.dumps({"video_path": str(clip)}).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = (response.status, json.loads(response.read()), "")
            except urllib.error.HTTPError as exc:
                answer = (exc.code, json.loads(exc.read()), exc.headers.get("Retry-After", ""))
            with lock:
                answers.append(answer)

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(submit, range(200)))
        statuses = {status for status, _, _ in answers}
        assert statuses <= {202, 429} and 202 in statuses and 429 in statuses, statuses
        assert all(int(wait) >= 1 for status, _, wait in answers if status == 429)
        accepted = [body["job_id"] for status, body, _ in answers if status == 202]
        for job_id in accepted[:5]:
            assert stack.wait_job(job_id, timeout=60)["state"] == "done"
        for job_id in accepted[5:]:
            assert http("DELETE", f"{stack.url}/v1/jobs/{job_id}")[0] == 200
        for job_id in accepted:
            assert stack.wait_job(job_id, timeout=60)["state"] in ("done", "error")
        health = stack.conn.health()
        assert health["generation"] == generation and health["status"] == "ready"  # the engine stayed loaded
    finally:
        stack.stop()


def test_a_removed_job_answers_410_and_a_short_disk_refuses_uploads_with_507(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=10)
    stack = Stack(tmp_path, [*NOOP, "jobs.keep_finished_s=1", "jobs.retention_sweep_s=0.3",
                             "jobs.min_free_mb=100000000"], gateway=True)
    try:
        stack.wait_ready(30)
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 30, what="gateway")
        job = stack.wait_job(stack.submit(clip), timeout=60)
        wait_for(lambda: stack.conn.job(job["job_id"]).get("removed"), 20, what="retention")
        for suffix in ("/result", "/result?format=ndjson", "/overlay.mp4"):
            status, body = http("GET", f"{stack.url}/v1/jobs/{job['job_id']}{suffix}")
            assert status == 410 and body["code"] == "removed" and "keep_finished_s" in body["error"], body
        uploads = stack.state_dir / "uploads"
        before = sorted(os.listdir(uploads)) if uploads.exists() else []
        boundary = "b0undary"
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"c.mp4\"\r\n"
                   f"Content-Type: video/mp4\r\n\r\n").encode() + clip.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        status, body = http("POST", stack.url + "/v1/jobs", raw=payload,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 507 and body["code"] == "insufficient_storage" and body["needed_bytes"] > body["free_bytes"]
        assert (sorted(os.listdir(uploads)) if uploads.exists() else []) == before  # nothing half-written
    finally:
        stack.stop()
