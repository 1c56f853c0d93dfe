"""Issue: look, don't read. `pose-service run` writes the overlay next to the result (and says
where both are); the one-page report opens in real headless Chromium with no console errors, a
playable video of the clip's length and a visible page, and its frames-found strip agrees with the
result; the daemon serves the report of a finished job and a JSON 404 for an unknown one."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from support import CLIP, REPO, HeadlessChromium, Stack, http, needs_shared_data, wait_for


def decoded_frames(path) -> int:
    with av.open(str(path)) as video:
        return sum(1 for _ in video.decode(video=0))


def test_run_writes_the_overlay_next_to_the_result_and_says_where(tmp_path):
    out, report = tmp_path / "result.json", tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "pose_service.cli", "run", "--demo", "--out", str(out), "--quiet",
                           "--report", str(report), f"state_dir={tmp_path / 'state'}"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    overlay = tmp_path / "result.overlay.mp4"
    assert str(out) in done.stdout and str(overlay) in done.stdout
    result = json.loads(out.read_text())
    assert len(result["frames"]) == 60 and decoded_frames(overlay) == 60
    assert_leg_angles_only_where_the_legs_are_seen(result, report_data(report))


def report_data(report) -> dict:
    text = report.read_text()
    return json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)[1])


def assert_leg_angles_only_where_the_legs_are_seen(result: dict, data: dict) -> None:
    """The demo is a head-and-shoulders portrait: MediaPipe places legs it cannot see, at low visibility.
    The report plots a knee or hip angle only for a frame whose leg joints (hip, knee, ankle) are all seen
    at the report's threshold; elsewhere the curve has a gap (null)."""
    names, threshold = result["joint_names"], data["min_visibility"]
    unseen_frames = 0
    for n, frame in enumerate(result["frames"]):
        persons = frame["persons"]
        keypoints = max(persons, key=lambda p: p["score"])["keypoints_2d"] if persons else None
        for side in ("left", "right"):
            seen = bool(keypoints) and all(keypoints[names.index(f"{side}_{joint}")][2] >= threshold
                                           for joint in ("hip", "knee", "ankle"))
            unseen_frames += not seen
            for angle in (f"{side}_knee", f"{side}_hip"):
                assert (data["angles"][angle][n] is not None) == seen, (n, angle, data["angles"][angle][n])
    assert unseen_frames >= len(result["frames"])  # the portrait's legs are out of view in most frames
    assert sum(v is not None for v in data["angles"]["spine"]) >= 50  # the upper body is plotted


@needs_shared_data()
def test_report_of_the_shared_clip_in_headless_chromium(tmp_path):
    stack = Stack(tmp_path, ["engine.name=mediapipe", "probe.enabled=false"], gateway=True)
    browser = None
    try:
        stack.wait_ready(60)
        job = stack.wait_job(stack.submit(CLIP), timeout=120)
        assert job["state"] == "done"
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 30, what="the gateway")
        status, page = http("GET", f"{stack.url}/v1/jobs/{job['job_id']}/report", timeout=120)
        assert status == 200 and page.startswith(b"<!DOCTYPE html>")
        fetched = re.findall(rb'(?:src|href)\s*=\s*["\']?(?:https?:)?//|url\(\s*["\']?(?:https?:)?//', page)
        assert fetched == []  # nothing loaded from the network (SVG namespace URIs are not fetches)
        report = tmp_path / "report.html"
        report.write_bytes(page)
        browser = HeadlessChromium(tmp_path)
        facts, png = browser.visit(report.as_uri(), """
            new Promise(done => {
              const video = document.querySelector('video#overlay');
              const answer = () => done({duration: video.duration,
                                          data: JSON.parse(document.getElementById('report-data').textContent)});
              if (video.readyState >= 1) answer(); else video.addEventListener('loadedmetadata', answer);
            })""")
        assert browser.errors == []
        with av.open(str(CLIP)) as clip:
            duration = float(clip.streams.video[0].duration * clip.streams.video[0].time_base)
        assert facts["duration"] == pytest.approx(duration, abs=0.1)
        result = http("GET", f"{stack.url}/v1/jobs/{job['job_id']}/result")[1]
        assert facts["data"]["found"] == [int(bool(f["persons"])) for f in result["frames"]]
        assert facts["data"]["frames_with_person"] == sum(facts["data"]["found"])
        rescued = [f["frame_index"] for f in result["frames"] if f["persons"] and "found_by" in f["persons"][0]]
        assert rescued and facts["data"]["second_pass"] == rescued  # the clip has frames only the second pass finds
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
        assert pixels.std() > 20 and (pixels < 100).mean() > 0.05  # text, plots and video, not a blank page
        status, missing = http("GET", f"{stack.url}/v1/jobs/no-such-job/report")
        assert status == 404 and missing["error"] == "Job not found"
    finally:
        if browser:
            browser.close()
        stack.stop()
