"""/metrics is Prometheus text that prometheus-client's own parser reads, and its counters move:
frames after a job, deaths by cause and stage load times after an injected crash."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from support import Stack, http, make_clip, wait_for


def scrape(url: str) -> dict[tuple, float]:
    status, body = http("GET", url + "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else body
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def stage_loads(samples: dict) -> float:
    return sum(v for (name, _), v in samples.items() if name == "pose_stage_load_seconds_count")


def test_metrics_parse_and_move_after_a_job_and_a_crash(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=30)
    stack = Stack(tmp_path, ["engine.name=noop", "probe.enabled=false", "+engine.options.frame_delay_s=0.02"],
                  gateway=True)
    try:
        stack.wait_ready(30)
        wait_for(lambda: http("GET", stack.url + "/v1/health")[0] == 200, 30, what="gateway")
        before = scrape(stack.url)
        assert value(before, "pose_supervisor_up") == 1 and value(before, "pose_status", status="ready") == 1
        assert stage_loads(before) >= 4  # runtime, weights, model, detector of the first boot
        job = stack.wait_job(stack.submit(clip), timeout=60)
        assert job["state"] == "done"
        after_job = scrape(stack.url)
        assert value(after_job, "pose_frames_processed_total") - value(before, "pose_frames_processed_total") == 30
        assert value(after_job, "pose_jobs", state="done") == 1
        assert http("POST", stack.url + "/v1/drill", {"kind": "segfault", "at": "frame:5"})[0] == 200
        job = stack.wait_job(stack.submit(clip), timeout=60)
        assert job["state"] == "done" and job["attempts"] == 2
        after_crash = scrape(stack.url)
        assert value(after_crash, "pose_worker_deaths_total", cause="segfault") == 1
        assert stage_loads(after_crash) >= stage_loads(after_job) + 4  # the replacement loaded its stages
        assert value(after_crash, "pose_worker_generation") == 2
        assert value(after_crash, "pose_frames_processed_total") - value(after_job, "pose_frames_processed_total") == 30
    finally:
        stack.stop()
