"""Issue 28: a full disk (or a lock, or failing I/O) under the SQLite ledger is an outage the
supervisor rides out, not a crash. Errors are classified by SQLite's result code, a ROLLBACK that
fails after SQLite rolled back on its own never hides why, the keeper's probe writes (a read answers
on a full disk), and the real daemon on a full 16 MB tmpfs stays up, says why, refuses new jobs with
507 and finishes the paused job once space returns. A host that goes fatal on one machine fails its
queue (nobody else will serve it)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import structlog

from pose_common.ledger import Ledger, LedgerUnavailable
from supervisor.outage import LedgerKeeper

from support import Served, http, make_clip, wait_for

NOOP = ["engine.name=noop", "probe.enabled=false", "supervisor.heartbeat_s=0.3"]
BIG_PERSON = [{"track_id": 1, "blob": "x" * 200_000}]  # a frame bigger than the pages left


@pytest.fixture
def small_disk(tmp_path):
    """-> a function mounting a real 16 MB tmpfs at a path (root only); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(at: Path) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (the page-limit tests cover the classification)")
        at.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(at)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(at)
        return at

    yield mount
    for at in mounted:
        subprocess.run(["umount", "-l", str(at)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says it is full. -> the file (remove it to give space back)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * (1 << 16))
    except OSError as exc:
        assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)
    return filler


def at_page_limit(ledger: Ledger) -> None:
    """SQLite's own "database or disk is full" without a full disk (PRAGMA max_page_count)."""
    pages = ledger.db.execute("PRAGMA page_count").fetchone()[0]
    ledger.db.execute(f"PRAGMA max_page_count={pages}")


def room_again(ledger: Ledger) -> None:
    ledger.db.execute("PRAGMA max_page_count=1073741823")


def running_job(tmp_path: Path):
    ledger = Ledger(str(tmp_path / "ledger.sqlite3"))
    job, _ = ledger.accept("/v.mp4")
    return ledger, ledger.claim("host-a", 60).lease


# --- classification ---------------------------------------------------------------------------------
def test_a_full_ledger_is_an_outage_that_names_the_disk_and_the_job_resumes_where_it_stopped(tmp_path):
    ledger, lease = running_job(tmp_path)
    assert ledger.add_frame(lease, 0, 0.0, [])
    at_page_limit(ledger)
    with pytest.raises(LedgerUnavailable) as raised:
        ledger.add_frame(lease, 1, 0.03, BIG_PERSON)
    assert raised.value.disk_full and raised.value.http_status == 507 and raised.value.code == "ledger_disk_full"
    assert "disk" in str(raised.value) and "ledger" in str(raised.value) and "SQLITE_FULL" in str(raised.value)
    assert not ledger.db.in_transaction
    assert ledger.next_frame(lease.job_id) == 1  # reads still answer; frame 1 was not half stored
    room_again(ledger)
    assert ledger.add_frame(lease, 1, 0.03, BIG_PERSON) is True


def test_a_lock_held_past_the_busy_timeout_is_an_outage_not_a_crash(tmp_path):
    ledger, _ = running_job(tmp_path)
    ledger.db.execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(ledger.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerUnavailable) as raised:
            ledger.accept("/w.mp4")
        assert not raised.value.disk_full and raised.value.http_status == 503
        assert "SQLITE_BUSY" in str(raised.value)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ledger.accept("/w.mp4")[1]


def test_a_wrong_statement_stays_an_error_of_its_own(tmp_path):
    ledger, _ = running_job(tmp_path)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        ledger.one("SELECT * FROM no_such_table")


@pytest.mark.parametrize("message, disk_full", [("database or disk is full", True), ("database is locked", False),
                                                ("disk I/O error", False), ("unable to open database file", False)])
def test_without_a_result_code_the_message_tells_the_outage(message, disk_full):
    """Python before 3.11 gives no sqlite_errorcode (an exception made here has none either)."""
    from pose_common.ledger import sqlite_outage
    outage = sqlite_outage(sqlite3.OperationalError(message))
    assert outage is not None and outage.disk_full is disk_full


def test_a_failed_rollback_does_not_hide_why_the_commit_failed(tmp_path, small_disk):
    """Before: `cannot rollback - no transaction is active`, raised over `database or disk is full`
    (SQLite had already rolled the transaction back when the COMMIT found no room for the WAL)."""
    disk = small_disk(tmp_path / "disk")
    ledger = Ledger(str(disk / "ledger.sqlite3"))
    try:
        ledger.accept("/v.mp4")
        lease = ledger.claim("host-a", 60).lease
        filler = fill(disk)
        with pytest.raises(LedgerUnavailable) as raised:
            for index in range(2000):
                ledger.add_frame(lease, index, 0.0, [{"track_id": 1, "note": "y" * 300}])
        assert raised.value.disk_full and "database or disk is full" in str(raised.value)
        stopped_at = ledger.next_frame(lease.job_id)
        os.unlink(filler)
        ledger.ping()
        assert ledger.add_frame(lease, stopped_at, 0.0, []) is True
    finally:
        ledger.close()


# --- the keeper's probe -----------------------------------------------------------------------------
def test_the_probe_writes_because_a_full_ledger_still_answers_reads(tmp_path):
    ledger, _ = running_job(tmp_path)
    at_page_limit(ledger)
    ledger.one("SELECT 1")  # what a read-only probe would have taken for "back"
    with pytest.raises(LedgerUnavailable):
        ledger.ping()
    room_again(ledger)
    ledger.ping()


def test_the_keeper_stays_in_the_outage_until_writes_work_and_knows_the_disk_is_full(tmp_path):
    ledger, lease = running_job(tmp_path)
    lost: list[str] = []
    keeper = LedgerKeeper(ledger, structlog.get_logger(), lost.append)
    at_page_limit(ledger)
    with keeper.guard():
        ledger.add_frame(lease, 0, 0.0, BIG_PERSON)
    outage = keeper.outage
    assert outage is not None and outage.disk_full and outage.cause.http_status == 507 and lost
    assert "no room for new jobs" in outage.refusal()
    keeper.try_again(time.monotonic() + 2)
    assert keeper.outage is outage, "a read answered, but writes still fail: the outage goes on"
    room_again(ledger)
    keeper.try_again(time.monotonic() + 60)
    assert keeper.outage is None
    assert ledger.add_frame(lease, 0, 0.0, BIG_PERSON) is True


# --- a host that no restart can fix ------------------------------------------------------------------
def test_one_machine_going_fatal_fails_its_queue(tmp_path):
    ledger, lease = running_job(tmp_path)
    queued, _ = ledger.accept("/w.mp4")
    assert sorted(ledger.give_up_host("host-a", "service fatal: weights missing")) == \
        sorted([lease.job_id, queued.job_id])
    assert {ledger.job(j).state for j in (lease.job_id, queued.job_id)} == {"error"}


# --- the real daemon on a full disk ---------------------------------------------------------------------
def test_a_full_disk_under_the_ledger_pauses_the_job_and_it_finishes_once_space_returns(tmp_path, small_disk):
    """Before: the supervisor died on the frame's COMMIT, then again in boot on every restart; health
    said `supervisor is not running`."""
    frames = 200
    clip = make_clip(tmp_path / "clip.mp4", frames=frames)
    state = small_disk(tmp_path / "host" / "state")
    host = Served(tmp_path / "host", [*NOOP, "+engine.options.frame_delay_s=0.03",
                                      f"storage_dir={tmp_path / 'storage'}"])
    try:
        host.wait_ready()
        supervisor_pid = host.diagnostics()["supervisor"]["pid"]
        job_id = http("POST", host.url + "/v1/jobs", {"video_path": str(clip)})[1]["job_id"]
        wait_for(lambda: host.job(job_id).get("frames_done", 0) >= 30, 30, interval=0.05, what="30 frames")
        filler = fill(state)

        health = wait_for(lambda: (r := http("GET", host.url + "/v1/health", timeout=5))[1].get("ledger", "ok") != "ok"
                          and r, 30, what="health to notice the full disk")
        assert health[0] == 200 and health[1]["status"] == "degraded", health
        assert "disk" in health[1]["reason"] and "ledger" in health[1]["reason"], health
        refused = wait_for(lambda: (r := http("POST", host.url + "/v1/jobs", {"video_path": str(clip)}))[0] == 507
                           and r, 10, what="a new job to be refused with 507")
        assert refused[1]["code"] == "ledger_disk_full" and "disk" in refused[1]["error"], refused
        paused_at = host.job(job_id)["frames_done"]
        time.sleep(2)
        assert host.job(job_id)["frames_done"] == paused_at < frames  # paused, not failed
        assert host.job(job_id)["status"] in ("queued", "running")
        assert host.diagnostics()["supervisor"]["pid"] == supervisor_pid, "the supervisor was restarted"

        os.unlink(filler)
        job = host.wait_job(job_id, timeout=120)
        assert job["status"] == "done", job
        status, result = http("GET", f"{host.url}/v1/jobs/{job_id}/result", timeout=30)
        assert status == 200 and [f["frame_index"] for f in result["frames"]] == list(range(frames))
        assert http("GET", host.url + "/v1/health")[1]["ledger"] == "ok"
        assert http("POST", host.url + "/v1/jobs", {"video_path": str(clip)})[0] == 202
        assert host.diagnostics()["supervisor"]["pid"] == supervisor_pid
    finally:
        host.stop()
