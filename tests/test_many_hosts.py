"""Issue: outgrow one machine. Several whole daemons (`pose-service serve`, each with its own state
dir and port) share one PostgreSQL ledger (a real server from Debian's packages, started by the
test on a unix socket) and one storage dir: jobs spread over them, every frame is stored exactly
once, any gateway answers for any job, a dead host's job is finished elsewhere after its lease
expires, a fenced-out supervisor cannot write, and the database going away loses nothing."""
from __future__ import annotations

import re
import time

import pytest

from pose_common.ledger_pg import PgLedger

from support import PostgresServer, Served, http, make_clip, wait_for

NOOP = ["engine.name=noop", "probe.enabled=false", "supervisor.heartbeat_s=0.3"]


@pytest.fixture
def pg():
    server = PostgresServer()
    yield server
    server.destroy()


def daemon(tmp_path, name: str, pg: PostgresServer, *extra: str) -> Served:
    return Served(tmp_path / name, [*NOOP, f"ledger.url='{pg.url}'", f"storage_dir={tmp_path / 'shared'}",
                                    "ledger.lease_s=2", *extra])


def frames_of(url: str, job_id: str) -> list[int]:
    status, result = http("GET", f"{url}/v1/jobs/{job_id}/result", timeout=30)
    assert status == 200, result
    return [f["frame_index"] for f in result["frames"]]


def dispatched_by(served: Served, since: int = 0) -> set[str]:
    """Jobs this daemon's supervisor put on its worker (from `since` characters into its log)."""
    return set(re.findall(r'"job_id": "(\w+)", "generation": \d+, "start_frame"', served.log_text()[since:]))


def test_a_dead_hosts_job_is_finished_elsewhere_and_its_restart_does_not_redo_it(tmp_path, pg):
    clip = make_clip(tmp_path / "clip.mp4", frames=150)
    a, b = daemon(tmp_path, "a", pg, "+engine.options.frame_delay_s=0.03"), \
        daemon(tmp_path, "b", pg, "+engine.options.frame_delay_s=0.03")
    try:
        a.wait_ready()
        b.wait_ready()
        job_id = http("POST", a.url + "/v1/jobs", {"video_path": str(clip)})[1]["job_id"]
        owner = wait_for(lambda: next((h for h in (a, b) if h.diagnostics().get("running_job") == job_id), None),
                         30, interval=0.05, what="a host running the job")
        other = b if owner is a else a
        wait_for(lambda: other.job(job_id).get("frames_done", 0) >= 30, 30, interval=0.05, what="30 frames")
        owner.proc.kill()  # the whole daemon: service manager, supervisor, gateway, worker
        job = other.wait_job(job_id, timeout=60)
        assert job["status"] == "done" and job["attempts"] == 2, job
        assert frames_of(other.url, job_id) == list(range(150))
        assert job_id in dispatched_by(other)
        log_before = len(owner.log_text())
        revived = Served(owner.tmp, owner.overrides[3:], port=owner.port)  # the same host starts again
        try:
            revived.wait_ready()
            time.sleep(3)  # longer than a lease: anything it might wrongly claim, it would have
            again = revived.job(job_id)
            assert again["status"] == "done" and again["attempts"] == 2 and again["frames_done"] == 150
            assert job_id not in dispatched_by(revived, since=log_before)
        finally:
            revived.stop()
    finally:
        a.stop()
        b.stop()


def test_a_supervisor_whose_lease_was_taken_over_cannot_store_frames(pg):
    one, two = PgLedger(pg.url), PgLedger(pg.url)
    try:
        job, _ = one.accept("/v.mp4")
        held = one.claim("host-a", lease_s=0.2).lease
        assert one.add_frame(held, 0, 0.0, []) is True
        time.sleep(0.3)  # host-a stalls (a partition, a pause) past its lease
        taken = two.claim("host-b", lease_s=60).lease
        assert taken.job_id == job.job_id and taken.gen == held.gen + 1
        assert one.add_frame(held, 1, 0.03, [{"late": True}]) is None
        assert not one.renew(held, 60) and not one.set_video_meta(held, {"frame_count": 9})
        assert not one.mark_rendering(held, 1, "/r.json", None, {}) and not one.finish(held)
        assert two.add_frame(taken, 1, 0.03, []) is True
        assert [f["persons"] for f in two.iter_frames(job.job_id)] == [[], []]
    finally:
        one.close()
        two.close()




class SkewedClock:
    """What `time` is to the ledger module on a host whose clock is `offset_s` off."""

    def __init__(self, offset_s: float):
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s


def test_leases_expire_by_the_database_clock_not_a_skewed_hosts(pg, monkeypatch):
    """Before: claim, claim_render and renew read each host's time.time(): a host a minute ahead
    took over a job whose lease had most of its 30 s to run, and one a minute behind renewed its
    lease into the past."""
    import pose_common.ledger as ledger_module

    one, two = PgLedger(pg.url), PgLedger(pg.url)
    try:
        running, _ = one.accept("/v.mp4")
        held = one.claim("host-a", lease_s=30).lease
        monkeypatch.setattr(ledger_module, "time", SkewedClock(+60))  # host-b runs a minute ahead
        assert two.claim("host-b", lease_s=30) is None
        assert one.mark_rendering(held, 0, "/r.json", None, {})
        assert two.claim_render("host-b", lease_s=30) is None
        monkeypatch.setattr(ledger_module, "time", SkewedClock(-60))  # host-a, renewing, a minute behind
        assert one.renew(held, 30)
        monkeypatch.undo()
        assert two.claim_render("host-b", lease_s=30) is None
        assert one.job(running.job_id).owner == "host-a"
    finally:
        one.close()
        two.close()


def test_a_host_giving_up_on_a_shared_database_hands_back_its_jobs_and_fails_nobodys(pg):
    one, two = PgLedger(pg.url), PgLedger(pg.url)
    try:
        first, second, third = (one.accept(f"/{name}.mp4")[0] for name in "abc")
        assert one.claim("host-a", 60).job_id == first.job_id
        assert two.claim("host-b", 60).job_id == second.job_id
        assert two.give_up_host("host-b", "service fatal: weights missing") == [second.job_id]
        assert [(j.state, j.owner) for j in map(one.job, (first.job_id, second.job_id, third.job_id))] == \
            [("running", "host-a"), ("queued", None), ("queued", None)]
        assert one.claim("host-c", 60).job_id == second.job_id  # taken over at once, no lease to wait out
    finally:
        one.close()
        two.close()
