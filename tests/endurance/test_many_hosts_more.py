"""More of outgrowing one machine (tests/test_many_hosts.py): three daemons share one PostgreSQL
ledger and any gateway answers for any job; the database restarted mid-job loses nothing. Here
because each starts several daemons and a server: the core suite keeps the dead-host takeover and
the fencing."""
from __future__ import annotations

import time

from test_many_hosts import daemon, dispatched_by, frames_of, pg  # noqa: F401  (pg: the fixture)

from support import http, make_clip, wait_for


def test_three_daemons_share_one_ledger_and_any_gateway_answers_for_any_job(tmp_path, pg):  # noqa: F811  (fixtures imported above)
    clip = make_clip(tmp_path / "clip.mp4", frames=40)
    hosts = [daemon(tmp_path, name, pg, "+engine.options.frame_delay_s=0.02") for name in "abc"]
    try:
        for host in hosts:
            host.wait_ready()
        jobs = []
        for i in range(12):
            status, body = http("POST", hosts[i % 3].url + "/v1/jobs", {"video_path": str(clip)})
            assert status == 202, body
            jobs.append(body["job_id"])
        for i, job_id in enumerate(jobs):
            assert hosts[(i + 1) % 3].wait_job(job_id, timeout=120)["status"] == "done"
        for job_id in jobs:
            results = [http("GET", f"{host.url}/v1/jobs/{job_id}/result", timeout=30)[1] for host in hosts]
            assert [f["frame_index"] for f in results[0]["frames"]] == list(range(40))
            assert results[0] == results[1] == results[2]
        workers = [dispatched_by(host) for host in hosts]
        assert sum(bool(w) for w in workers) >= 2, workers  # the work really was shared
        assert set().union(*workers) == set(jobs)
    finally:
        for host in hosts:
            host.stop()


def test_postgresql_restarted_mid_job_loses_nothing(tmp_path, pg):  # noqa: F811  (fixtures imported above)
    clip = make_clip(tmp_path / "clip.mp4", frames=120)
    host = daemon(tmp_path, "a", pg, "+engine.options.frame_delay_s=0.02")
    try:
        host.wait_ready()
        jobs = [http("POST", host.url + "/v1/jobs", {"video_path": str(clip)})[1]["job_id"] for _ in range(3)]
        wait_for(lambda: host.job(jobs[0]).get("frames_done", 0) >= 40, 30, interval=0.05, what="40 frames")
        pg.stop("fast")
        health = wait_for(lambda: (r := http("GET", host.url + "/v1/health", timeout=5))[1].get("ledger", "ok") != "ok"
                          and r[1], 20, what="health to notice the ledger is gone")
        assert health["status"] == "degraded" and "ledger" in health["reason"]
        assert health["worker"] in ("ready", "busy")  # the worker stays loaded
        time.sleep(2)
        pg.start()
        for job_id in jobs:
            job = host.wait_job(job_id, timeout=90)
            assert job["status"] == "done", job
            assert frames_of(host.url, job_id) == list(range(120))
        assert http("GET", host.url + "/v1/health")[1]["ledger"] == "ok"
    finally:
        host.stop()


def test_one_host_going_fatal_fails_nothing_of_the_others(tmp_path, pg):  # noqa: F811  (fixtures imported above)
    """Issue 28: a host whose weights are missing (a load failure no restart fixes) went fatal and
    failed every job in the shared queue, the other host's running one included. Now it hands back
    only what it held, and the healthy host finishes every job."""
    clip = make_clip(tmp_path / "clip.mp4", frames=60)
    healthy = daemon(tmp_path, "a", pg, "+engine.options.frame_delay_s=0.03")
    broken = None
    try:
        healthy.wait_ready()
        jobs = [http("POST", healthy.url + "/v1/jobs", {"video_path": str(clip)})[1]["job_id"] for _ in range(4)]
        wait_for(lambda: healthy.job(jobs[0]).get("frames_done", 0) >= 10, 30, interval=0.05, what="10 frames")
        broken = daemon(tmp_path, "b", pg, "fault.kind=load_failure", "fault.at=stage:weights",
                        "supervisor.fatal_retry_s=0")
        wait_for(lambda: http("GET", broken.url + "/v1/health", timeout=5)[1].get("status") == "fatal", 60,
                 what="the host without weights to go fatal")
        assert "jobs_failed_by_fatal" in broken.log_text()  # it went through giving up, not around it
        for job_id in jobs:
            job = healthy.wait_job(job_id, timeout=120)
            assert job["status"] == "done", job
            assert frames_of(healthy.url, job_id) == list(range(60))
        assert dispatched_by(broken) == set()
    finally:
        healthy.stop()
        if broken is not None:
            broken.stop()
