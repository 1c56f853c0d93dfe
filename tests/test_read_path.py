"""One read path: every read of a job (status, result, legacy shapes, frames) comes from the ledger,
and ZeroMQ carries commands only, so a finished job stays readable while the supervisor does not
answer at all."""
from __future__ import annotations

import os
import signal

from support import Served, http, make_clip


def test_a_finished_job_is_read_from_the_ledger_while_the_supervisor_is_stopped(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=12)
    served = Served(tmp_path / "served", ["engine.name=noop", "probe.enabled=false"])
    try:
        served.wait_ready(60)
        status, body = http("POST", served.url + "/v1/jobs", {"video_path": str(clip)}, timeout=30)
        assert status == 202, body
        job_id = body["job_id"]
        assert served.wait_job(job_id, 60)["status"] == "done"
        supervisor = served.diagnostics()["supervisor"]["pid"]
        os.kill(supervisor, signal.SIGSTOP)  # its loop stops turning; it answers nothing
        try:
            assert http("GET", served.url + "/health", timeout=10)[1].get("status") != "ready", \
                "the stop did not take: health still reads the supervisor"
            answers = {path: http("GET", served.url + path, timeout=10) for path in (
                f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", f"/job_status/{job_id}",
                f"/frame/{job_id}/3", f"/v1/jobs/{job_id}/legacy")}
        finally:
            os.kill(supervisor, signal.SIGCONT)
        for path, (status, body) in answers.items():
            assert status == 200, (path, status, body)
        assert answers[f"/v1/jobs/{job_id}"][1]["frames_done"] == 12
        assert [f["frame_index"] for f in answers[f"/v1/jobs/{job_id}/result"][1]["frames"]] == list(range(12))
        assert answers[f"/job_status/{job_id}"][1]["status"] == "complete"
    finally:
        served.stop()
