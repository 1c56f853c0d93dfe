"""A job's life has one table (pose_common/job_states.py), and the ledger's SQL is held to it: every
write, in any order, from any state, moves a job only along the table's edges; every edge is
reachable through the ledger; and every vocabulary the outside reads is derived from the table."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pose_common import job_states as JS
from pose_common.job_states import JobState, Move
from pose_common.ledger import Lease, Ledger

ROOT = Path(__file__).resolve().parents[1]
J = JobState


# --- the table itself -------------------------------------------------------------------------------
def test_every_state_is_reached_and_every_live_state_has_a_way_out():
    reached = {dst for _, dst in JS.edges()}
    assert reached == set(JobState)
    for state in set(JobState) - JS.TERMINAL:
        assert any(src == state and dst in JS.TERMINAL for src, dst in JS.edges()), state
    assert not [edge for edge in JS.edges() if edge[0] in JS.TERMINAL], "a finished job never moves again"


def test_a_move_outside_the_table_raises():
    JS.check(None, "queued")
    JS.check("rendering", "done")
    for src, dst in [("done", "queued"), ("error", "running"), ("queued", "rendering"), ("rendering", "queued"),
                     (None, "running")]:
        with pytest.raises(JS.IllegalJobMove):
            JS.check(src, dst)
    with pytest.raises(JS.IllegalJobMove):
        JS.sources_sql(Move.ACCEPT)


def test_the_outside_words_are_the_tables():
    from gateway.legacy_shapes import STATE_WORDS
    from gateway.native import JOB_STATES
    assert set(STATE_WORDS) == {s.value for s in JobState}
    assert set(JOB_STATES) == {s.value for s in JobState}
    assert JS.STATUSES == ("queued", "running", "done", "error")
    assert JS.states_shown_as("running") == {J.RUNNING, J.RENDERING}
    assert JS.states_shown_as("rendering") == {J.RENDERING}


def test_the_ledger_writes_no_state_of_its_own():
    """Every state the ledger writes or selects on comes from the table, not from a literal in SQL."""
    source = (ROOT / "pose_common" / "ledger.py").read_text()
    literal = re.compile(r"state\s*(=|IN)\s*\(?\s*'")
    assert not literal.findall(source), "a state literal in the ledger's SQL: build it from job_states"
    assert literal.findall("UPDATE jobs SET state='queued'"), "the check above can fail"


# --- the ledger held to the table --------------------------------------------------------------------
def walk_every_edge(ledger: Ledger) -> set[tuple]:
    """Drive the ledger through each move the table has; -> the (from, to) pairs seen."""
    seen: set[tuple] = set()

    def observe(job_id: str, before, act):
        act()
        after = ledger.job(job_id).state
        seen.add((None if before is None else JobState(before), JobState(after)))
        return after

    job, _ = ledger.accept("/a.mp4")
    seen.add((None, JobState(job.state)))
    a = ledger.claim("host-a", -1)  # expired at once: host-b may take it over
    seen.add((J.QUEUED, J.RUNNING))
    observe(job.job_id, "running", lambda: ledger.claim("host-b", 60))
    b = ledger.job(job.job_id).lease
    assert not ledger.release(a.lease)
    observe(job.job_id, "running", lambda: ledger.release(b))
    ledger.claim("host-a", 60)
    observe(job.job_id, "running", ledger.requeue_running)
    c = ledger.claim("host-a", 60).lease
    observe(job.job_id, "running", lambda: ledger.mark_rendering(c, 1, None, None, {}))
    ledger.requeue_running()  # on boot, a render's lease is free to take
    observe(job.job_id, "rendering", lambda: ledger.claim_render("host-b", 60))
    observe(job.job_id, "rendering", lambda: ledger.finish(ledger.job(job.job_id).lease))

    for reach in ("queued", "running", "rendering"):
        other, _ = ledger.accept("/b.mp4")
        if reach != "queued":
            lease = ledger.claim("host-a", 60).lease
            if reach == "rendering":
                ledger.mark_rendering(lease, 1, None, None, {})
        observe(other.job_id, reach, lambda: ledger.fail(other.job_id, "cancelled"))
    last, _ = ledger.accept("/c.mp4")
    lease = ledger.claim("host-a", 60).lease
    observe(last.job_id, "running", lambda: ledger.finish(lease))
    return seen


def test_every_edge_of_the_table_is_a_ledger_write(tmp_path):
    seen = walk_every_edge(Ledger(str(tmp_path / "l.sqlite3")))
    stayed = {(src, dst) for src, dst in seen if src == dst}
    assert seen - stayed == {(src, dst) for src, dst in JS.edges() if src != dst}
    assert stayed == {(J.RUNNING, J.RUNNING), (J.RENDERING, J.RENDERING)}


class LedgerMoves(RuleBasedStateMachine):
    """Any interleaving of the ledger's writes from two hosts over a few jobs: each write moves a
    job along an edge of the table or leaves it, terminal states never change, and the events a
    job has tell the same story as its rows."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.ledger = Ledger(str(Path(self.dir.name) / "l.sqlite3"))
        self.jobs: list[str] = []
        self.leases: list[Lease] = []
        self.states: dict[str, str] = {}

    def teardown(self):
        self.ledger.close()
        self.dir.cleanup()

    def moved(self) -> None:
        for job_id in self.jobs:
            now = self.ledger.job(job_id).state
            JS.check(self.states.get(job_id), now)
            self.states[job_id] = now

    @rule()
    def accept(self):
        job, _ = self.ledger.accept(f"/v{len(self.jobs)}.mp4")
        self.jobs.append(job.job_id)
        self.moved()

    @rule(owner=st.sampled_from(["host-a", "host-b"]), expired=st.booleans())
    def claim(self, owner, expired):
        job = self.ledger.claim(owner, -1 if expired else 60)
        if job:
            self.leases.append(job.lease)
        self.moved()

    @rule(owner=st.sampled_from(["host-a", "host-b"]), expired=st.booleans())
    def claim_render(self, owner, expired):
        job = self.ledger.claim_render(owner, -1 if expired else 60)
        if job:
            self.leases.append(job.lease)
        self.moved()

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), charge=st.booleans())
    def release(self, data, charge):
        self.ledger.release(data.draw(st.sampled_from(self.leases)), charge_attempt=charge)
        self.moved()

    @rule()
    def requeue_on_boot(self):
        self.ledger.requeue_running()
        self.moved()

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def mark_rendering(self, data):
        self.ledger.mark_rendering(data.draw(st.sampled_from(self.leases)), 1, None, None, {})
        self.moved()

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def finish(self, data):
        self.ledger.finish(data.draw(st.sampled_from(self.leases)))
        self.moved()

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), fenced=st.booleans())
    def fail(self, data, fenced):
        lease = data.draw(st.sampled_from(self.leases))
        self.ledger.fail(lease.job_id, "failed", lease if fenced else None)
        self.moved()

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def store_a_frame(self, data):
        lease = data.draw(st.sampled_from(self.leases))
        self.ledger.add_frame(lease, 0, 0.0, [])
        self.moved()

    @invariant()
    def the_events_tell_the_rows_story(self):
        for job_id in self.jobs:
            state_events = [e["type"] for e in self.ledger.events_since(job_id, limit=10_000)
                            if e["type"] in {s.value for s in JobState}]
            job = self.ledger.job(job_id)
            assert state_events[0] == "queued"
            terminal = [t for t in state_events if t in JS.TERMINAL]
            assert len(terminal) == (1 if job.state in JS.TERMINAL else 0)
            if terminal:
                assert state_events[-1] == job.state
            if job.state in JS.TERMINAL:
                assert job.owner is None and job.lease_until is None


TestLedgerMoves = LedgerMoves.TestCase
TestLedgerMoves.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
