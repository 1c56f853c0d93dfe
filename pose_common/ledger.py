"""The durable job ledger: SQLite (WAL) on one machine, PostgreSQL (`ledger.url`) shared by many.

The supervisors are its writers; gateways and render processes open it read-only. A job is
accepted once its row is committed. A supervisor claims a job with a lease (owner, expiry, and a
generation that grows with every claim) and renews it from its loop; every write it makes for the
job is fenced by that lease, so a supervisor that lost its lease (a partition, a long pause) can no
longer store anything for the job, and two hosts never both own it. Frames are keyed by
(job, frame_index), so a resumed job never stores a frame twice. The schema is versioned and
migrated forward when the ledger opens."""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Sequence

import msgpack

from pose_common.job_states import (
    IN_QUEUE,
    LEASED,
    MOVES,
    SHOWN,
    TERMINAL,
    JobState,
    Move,
    in_sql,
    sources_sql,
    states_shown_as,
    target_sql,
)
from pose_common.ledger_schema import migrations
from pose_common.sampling import sampled_indices


class LedgerUnavailable(RuntimeError):
    """The database cannot be reached or written right now; what was accepted before is safe in it.
    `disk_full`: it answers reads but has no room for writes (new jobs are refused with 507)."""

    def __init__(self, reason: str, disk_full: bool = False):
        super().__init__(reason)
        self.disk_full = disk_full

    @property
    def http_status(self) -> int:
        return 507 if self.disk_full else 503

    @property
    def code(self) -> str:
        return "ledger_disk_full" if self.disk_full else "ledger_unavailable"


@dataclass
class Job:
    job_id: str
    idempotency_key: Optional[str]
    video_path: str
    source: str
    kind: str
    state: str
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    attempts: int
    frames_total: Optional[int]
    frames_decoded: Optional[int]
    error: Optional[str]
    warning: Optional[str]
    video_meta: Optional[str]
    engine_meta: Optional[str]
    result_path: Optional[str]
    max_frames: Optional[int] = None
    overlay_path: Optional[str] = None
    removed_at: Optional[float] = None
    removed_reason: Optional[str] = None
    run_facts: Optional[str] = None
    owner: Optional[str] = None
    lease_until: Optional[float] = None
    lease_gen: int = 0

    def meta(self) -> dict:
        return json.loads(self.video_meta) if self.video_meta else {}

    def engine(self) -> dict:
        return json.loads(self.engine_meta) if self.engine_meta else {}

    def facts(self) -> dict:
        return json.loads(self.run_facts) if self.run_facts else {}

    def selected_frames(self) -> Optional[list[int]]:
        """The frames a job with max_frames processes, once the container's count is known."""
        if not self.max_frames:
            return None
        count = int(self.meta().get("frame_count") or 0)
        return sampled_indices(count, self.max_frames) if count else None

    @property
    def lease(self) -> "Lease":
        return Lease(self.job_id, self.owner or "", self.lease_gen)


@dataclass(frozen=True)
class Lease:
    """Proof of ownership of a job: every write for the job carries it."""
    job_id: str
    owner: str
    gen: int


JOB_COLUMNS = tuple(f.name for f in fields(Job))
SELECT_JOB = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"
FENCE = "EXISTS (SELECT 1 FROM jobs WHERE job_id=? AND owner=? AND lease_gen=?)"


class SqlLedger:
    """Everything both dialects share; subclasses connect, run statements and migrate."""

    path: str = ""
    skip_locked = ""  # PostgreSQL: concurrent claimers pass over rows another one is taking
    # leases expire by the database's clock (PostgreSQL: the server's, whatever each host's clock says)
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    # --- the dialect's part -------------------------------------------------------------------
    def exec(self, sql: str, args: Sequence = ()) -> int:
        raise NotImplementedError

    def one(self, sql: str, args: Sequence = ()) -> Optional[tuple]:
        raise NotImplementedError

    def all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        raise NotImplementedError

    def transaction(self, durable: bool = False) -> AbstractContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def ping(self) -> None:
        self.one("SELECT 1")

    def one_row(self, sql: str, args: Sequence = ()) -> tuple:
        """A query that always answers a row (an aggregate, or a row this transaction just wrote)."""
        row = self.one(sql, args)
        if row is None:
            raise LookupError(f"no row for {sql!r}")
        return row

    # --- jobs -----------------------------------------------------------------------------------
    def accept(self, video_path: str, source: str = "path", idempotency_key: Optional[str] = None,
               max_frames: Optional[int] = None) -> tuple[Job, bool]:
        """Commit a new job (durably) or return the existing one for this idempotency key."""
        if idempotency_key and (existing := self.job_by_key(idempotency_key)):
            return existing, False
        job_id = uuid.uuid4().hex[:16]
        with self.transaction(durable=True):
            self.exec("INSERT INTO jobs (job_id, idempotency_key, video_path, source, state, created_at, max_frames)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                      (job_id, idempotency_key, video_path, source, MOVES[Move.ACCEPT].target.value, time.time(),
                       max_frames))
            self.add_state_event(job_id, JobState.QUEUED)
        job = self.job_by_key(idempotency_key) if idempotency_key else self.job(job_id)
        if job is None:  # committed above: it is there
            raise LookupError(f"job {job_id} was accepted but cannot be read back")
        return job, True

    def job(self, job_id: str) -> Optional[Job]:
        row = self.one(f"{SELECT_JOB} WHERE job_id=?", (job_id,))
        return Job(*row) if row else None

    def job_by_key(self, key: str) -> Optional[Job]:
        row = self.one(f"{SELECT_JOB} WHERE idempotency_key=?", (key,))
        return Job(*row) if row else None

    def claim(self, owner: str, lease_s: float) -> Optional[Job]:
        """Take the oldest job nobody holds: queued, or running under an expired lease (a job left
        rendering is taken over by claim_render). A job this owner still holds (it lost the ledger
        for a while and let the job go) comes back to it first. Counts an attempt."""
        now = time.time()
        with self.transaction():
            row = self.one(
                f"SELECT job_id FROM jobs WHERE (state=? OR (state=? AND (owner=? OR lease_until<{self.now_sql})))"
                f" ORDER BY CASE WHEN owner=? THEN 0 ELSE 1 END, created_at LIMIT 1{self.skip_locked}",
                (JobState.QUEUED.value, JobState.RUNNING.value, owner, owner))
            if row is None:
                return None
            self.exec(f"UPDATE jobs SET {target_sql(Move.CLAIM)}, owner=?, lease_until={self.now_sql}+?,"
                      f" lease_gen=lease_gen+1,"
                      f" attempts=attempts+1, started_at=COALESCE(started_at, ?) WHERE job_id=?"
                      f" AND {sources_sql(Move.CLAIM)}",
                      (owner, lease_s, now, row[0]))
        return self.job(row[0])

    def claim_render(self, owner: str, lease_s: float) -> Optional[Job]:
        """A job whose frames are all stored but whose artifacts were left unwritten by a supervisor
        that stopped (its lease expired): taken over to finish them."""
        with self.transaction():
            row = self.one(f"SELECT job_id FROM jobs WHERE {sources_sql(Move.TAKE_OVER_RENDERING)}"
                           f" AND COALESCE(lease_until, 0)<{self.now_sql}"
                           f" ORDER BY created_at LIMIT 1{self.skip_locked}")
            if row is None:
                return None
            self.exec(f"UPDATE jobs SET {target_sql(Move.TAKE_OVER_RENDERING)}, owner=?,"
                      f" lease_until={self.now_sql}+?, lease_gen=lease_gen+1 WHERE job_id=?"
                      f" AND {sources_sql(Move.TAKE_OVER_RENDERING)}", (owner, lease_s, row[0]))
        return self.job(row[0])

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """-> False when the lease is gone (taken over, cancelled, finished): stop writing for the job."""
        return self.exec(f"UPDATE jobs SET lease_until={self.now_sql}+? WHERE job_id=? AND owner=? AND lease_gen=?"
                         f" AND {in_sql(LEASED)}",
                         (lease_s, lease.job_id, lease.owner, lease.gen)) == 1

    def release(self, lease: Lease, charge_attempt: bool = True) -> bool:
        """Back to the queue (it resumes at the first unstored frame), for anyone to claim. A job we
        stopped on purpose (reload, drill, shutdown) gets its attempt back: only deaths use them up."""
        refund = "" if charge_attempt else ", attempts=CASE WHEN attempts>0 THEN attempts-1 ELSE 0 END"
        return self.exec(f"UPDATE jobs SET {target_sql(Move.RELEASE)}, owner=NULL, lease_until=NULL{refund}"
                         f" WHERE job_id=? AND owner=? AND lease_gen=? AND {sources_sql(Move.RELEASE)}",
                         (lease.job_id, lease.owner, lease.gen)) == 1

    def attempt_causes(self, job_id: str) -> list[str]:
        """Why each of the job's failed attempts ended, oldest first (the worker deaths under it)."""
        return [event["data"].get("cause") or "unknown" for event in self.events_since(job_id, limit=10_000)
                if event["type"] == "restart"]

    def queue(self) -> list[str]:
        return [r[0] for r in self.all(f"SELECT job_id FROM jobs WHERE {in_sql(IN_QUEUE)} ORDER BY created_at")]

    def queue_position(self, job_id: str) -> int:
        queue = self.queue()
        return queue.index(job_id) if job_id in queue else -1

    def count_by_state(self) -> dict[str, int]:
        return dict(self.all("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    def list_jobs(self, state: Optional[str] = None, limit: int = 50, before: Optional[float] = None) -> list[Job]:
        """Newest first; page with `before` = the created_at of the last job of the previous page.
        `state` is a status as the answers show it (running includes rendering) or a state's name."""
        where: list[str] = []
        args: list[Any] = []
        if state:
            where.append(in_sql(states_shown_as(state)))
        if before is not None:
            where.append("created_at<?")
            args.append(before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return [Job(*row) for row in self.all(f"{SELECT_JOB}{clause} ORDER BY created_at DESC LIMIT ?",
                                              (*args, limit))]

    def requeue_running(self) -> int:
        """One machine, on boot: what its dead supervisor was running goes back to the queue, and the
        artifacts it was writing are free to be taken over."""
        with self.transaction():
            self.exec(f"UPDATE jobs SET lease_until=NULL WHERE {sources_sql(Move.TAKE_OVER_RENDERING)}")
            return self.exec(f"UPDATE jobs SET {target_sql(Move.REQUEUE_ON_BOOT)}, owner=NULL, lease_until=NULL"
                             f" WHERE {sources_sql(Move.REQUEUE_ON_BOOT)}")

    def set_video_meta(self, lease: Lease, meta: dict) -> bool:
        return self.exec(f"UPDATE jobs SET video_meta=?, frames_total=? WHERE job_id=? AND {FENCE}",
                         (json.dumps(meta), meta.get("frame_count") or None, lease.job_id, *fence(lease))) == 1

    def set_engine_meta(self, lease: Lease, engine: dict) -> bool:
        return self.exec(f"UPDATE jobs SET engine_meta=? WHERE job_id=? AND {FENCE}",
                         (json.dumps(engine), lease.job_id, *fence(lease))) == 1

    def mark_rendering(self, lease: Lease, frames_decoded: int, result_path: Optional[str],
                       warning: Optional[str], run_facts: dict) -> bool:
        with self.transaction():
            changed = self.exec(f"UPDATE jobs SET {target_sql(Move.MARK_RENDERING)}, frames_decoded=?,"
                                f" result_path=?, warning=?, run_facts=? WHERE job_id=?"
                                f" AND {sources_sql(Move.MARK_RENDERING)} AND {FENCE}",
                                (frames_decoded, result_path, warning, json.dumps(run_facts), lease.job_id,
                                 *fence(lease)))
            if changed:
                self.add_state_event(lease.job_id, JobState.RENDERING)
        return changed == 1

    def finish(self, lease: Lease, overlay_path: Optional[str] = None, warning: Optional[str] = None) -> bool:
        """Every artifact the job's answer names exists: it is done."""
        with self.transaction():
            changed = self.exec(f"UPDATE jobs SET {target_sql(Move.FINISH)}, finished_at=?, overlay_path=?,"
                                f" warning=COALESCE(?, warning), owner=NULL, lease_until=NULL WHERE job_id=?"
                                f" AND {sources_sql(Move.FINISH)} AND {FENCE}",
                                (time.time(), overlay_path, warning, lease.job_id, *fence(lease)))
            if changed:
                frames = self.one_row("SELECT frames_decoded, warning FROM jobs WHERE job_id=?", (lease.job_id,))
                self.add_state_event(lease.job_id, JobState.DONE, frames=frames[0], warning=frames[1])
        return changed == 1

    def fail(self, job_id: str, reason: str, lease: Optional[Lease] = None) -> bool:
        """A worker's verdict is fenced by its lease; an operator's cancel or a fatal service is not."""
        fenced, args = (f" AND {FENCE}", fence(lease)) if lease else ("", ())
        with self.transaction():
            changed = self.exec(f"UPDATE jobs SET {target_sql(Move.FAIL)}, finished_at=?, error=?, owner=NULL,"
                                f" lease_until=NULL WHERE job_id=? AND {sources_sql(Move.FAIL)}{fenced}",
                                (time.time(), reason, job_id, *args))
            if changed:
                self.add_state_event(job_id, JobState.ERROR, error=reason)
        return changed == 1

    def fail_all_active(self, reason: str) -> list[str]:
        ids = self.queue()
        for job_id in ids:
            self.fail(job_id, reason)
        return ids

    def give_up_host(self, owner: str, reason: str) -> list[str]:
        """A host no restart can fix (its weights missing) stops serving. On a database that hosts
        share it hands back the jobs it was running, for others to resume at once, and fails nothing:
        what it cannot serve waits for hosts that can. (One machine fails its queue: see Ledger.)
        -> the jobs handed back."""
        with self.transaction():
            ids = [r[0] for r in self.all(f"SELECT job_id FROM jobs WHERE owner=? AND {sources_sql(Move.RELEASE)}",
                                          (owner,))]
            self.exec(f"UPDATE jobs SET {target_sql(Move.RELEASE)}, owner=NULL, lease_until=NULL"
                      f" WHERE owner=? AND {sources_sql(Move.RELEASE)}", (owner,))
        return ids

    # --- retention ---------------------------------------------------------------------------------
    def finished_jobs(self, finished_before: Optional[float] = None) -> list[Job]:
        """Finished jobs whose files have not been removed, oldest first."""
        where = f"{in_sql(TERMINAL)} AND removed_at IS NULL"
        args: tuple[Any, ...] = ()
        if finished_before is not None:
            where, args = where + " AND finished_at<?", (finished_before,)
        return [Job(*row) for row in self.all(f"{SELECT_JOB} WHERE {where} ORDER BY finished_at", args)]

    def mark_removed(self, job_id: str, reason: str) -> None:
        """A tombstone: the row stays (so the job answers 410 with the reason), its data goes."""
        with self.transaction():
            self.exec("UPDATE jobs SET removed_at=?, removed_reason=? WHERE job_id=?", (time.time(), reason, job_id))
            for table in ("frames", "frame_meshes", "frame_deaths"):
                self.exec(f"DELETE FROM {table} WHERE job_id=?", (job_id,))

    # --- frames -----------------------------------------------------------------------------------
    def add_frame(self, lease: Lease, index: int, pts_s: Optional[float], persons: list,
                  error: Optional[str] = None, meshes: Optional[dict[int, bytes]] = None) -> Optional[bool]:
        """Store a frame once. -> True stored, False a repeat (recomputed after a crash, ignored),
        None refused: the lease is no longer this writer's."""
        with self.transaction():
            stored = self.exec(f"INSERT INTO frames (job_id, frame_index, pts_s, persons, error)"
                               f" SELECT ?, ?, ?, ?, ? WHERE {FENCE} ON CONFLICT DO NOTHING",
                               (lease.job_id, index, pts_s, msgpack.packb(persons, use_bin_type=True), error,
                                *fence(lease)))
            if not stored:
                return False if self.one(f"SELECT 1 WHERE {FENCE}", fence(lease)) else None
            for track, blob in (meshes or {}).items():
                self.exec("INSERT INTO frame_meshes (job_id, frame_index, track_id, vertices) VALUES (?, ?, ?, ?)"
                          " ON CONFLICT DO NOTHING", (lease.job_id, index, track, blob))
        return True

    def frames_done(self, job_id: str) -> int:
        return self.one_row("SELECT COUNT(*) FROM frames WHERE job_id=?", (job_id,))[0]

    def stored_indices(self, job_id: str) -> set[int]:
        return {r[0] for r in self.all("SELECT frame_index FROM frames WHERE job_id=?", (job_id,))}

    def next_frame(self, job_id: str, selected: Optional[Sequence[int]] = None) -> int:
        """The first frame not yet stored (where a resumed job starts); for a job that processes
        only `selected` frames, the first of those not stored."""
        if selected is not None:
            stored = self.stored_indices(job_id)
            return next((i for i in selected if i not in stored), (selected[-1] + 1) if selected else 0)
        if not self.one("SELECT 1 FROM frames WHERE job_id=? AND frame_index=0", (job_id,)):
            return 0
        row = self.one_row("SELECT MIN(f.frame_index + 1) FROM frames f WHERE f.job_id=? AND NOT EXISTS"
                       " (SELECT 1 FROM frames g WHERE g.job_id=f.job_id AND g.frame_index=f.frame_index+1)",
                       (job_id,))
        return int(row[0] or 0)

    def iter_frames(self, job_id: str, after: int = -1, with_vertices: bool = False,
                    batch: int = 256) -> Iterator[dict]:
        """Frames in order, fetched in batches: memory stays flat however long the video."""
        while True:
            rows = self.all("SELECT frame_index, pts_s, persons, error FROM frames WHERE job_id=? AND frame_index>?"
                            " ORDER BY frame_index LIMIT ?", (job_id, after, batch))
            if not rows:
                return
            meshes = self._meshes(job_id, rows[0][0], rows[-1][0]) if with_vertices else {}
            for index, pts, persons, error in rows:
                entry = {"frame_index": index, "pts_s": pts, "persons": msgpack.unpackb(bytes(persons), raw=False)}
                for person in entry["persons"]:
                    blob = meshes.get((index, person.get("track_id")))
                    if blob is not None:
                        person["vertices"] = blob
                if error:
                    entry["error"] = error
                yield entry
            after = rows[-1][0]

    def _meshes(self, job_id: str, first: int, last: int) -> dict[tuple[int, int], bytes]:
        return {(f, t): bytes(v) for f, t, v in self.all(
            "SELECT frame_index, track_id, vertices FROM frame_meshes WHERE job_id=? AND frame_index BETWEEN ? AND ?",
            (job_id, first, last))}

    # --- job events (server-sent events read these) ---------------------------------------------------
    def add_state_event(self, job_id: str, state: JobState, **data: Any) -> None:
        """The event a move writes: typed by the state reached, with the status (and phase) clients see."""
        how = SHOWN[state]
        self.add_event(job_id, state.value, {"status": how.status, **({"phase": how.phase} if how.phase else {}),
                                             **data})

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        self.exec("INSERT INTO job_events (job_id, at, type, data) VALUES (?, ?, ?, ?)",
                  (job_id, time.time(), kind, json.dumps(data)))

    def last_event(self, job_id: str) -> Optional[dict]:
        row = self.one("SELECT id, at, type, data FROM job_events WHERE job_id=? ORDER BY id DESC LIMIT 1",
                       (job_id,))
        return None if row is None else {"id": row[0], "at": row[1], "type": row[2], "data": json.loads(row[3])}

    def events_since(self, job_id: str, event_id: int = 0, limit: int = 500) -> list[dict]:
        return [{"id": i, "at": at, "type": kind, "data": json.loads(data)} for i, at, kind, data in self.all(
            "SELECT id, at, type, data FROM job_events WHERE job_id=? AND id>? ORDER BY id LIMIT ?",
            (job_id, event_id, limit))]

    def terminal_event_id(self, job_id: str) -> Optional[int]:
        """The id of the job's done or error event (a state never left); None while it has none."""
        kinds = sorted(state.value for state in TERMINAL)
        marks = ", ".join("?" * len(kinds))
        return self.one_row(f"SELECT MAX(id) FROM job_events WHERE job_id=? AND type IN ({marks})", (job_id, *kinds))[0]

    # --- poison frames ------------------------------------------------------------------------------
    def record_frame_death(self, job_id: str, index: int, cause: str) -> int:
        self.exec("INSERT INTO frame_deaths (job_id, frame_index, deaths, last_cause) VALUES (?, ?, 1, ?)"
                  " ON CONFLICT(job_id, frame_index) DO UPDATE SET deaths=frame_deaths.deaths+1,"
                  " last_cause=excluded.last_cause", (job_id, index, cause))
        return self.one_row("SELECT deaths FROM frame_deaths WHERE job_id=? AND frame_index=?", (job_id, index))[0]

    def poison_frames(self, job_id: str, threshold: int) -> dict[int, str]:
        return {i: f"frame killed the worker {d} times (last cause: {c}); skipped" for i, d, c in self.all(
            "SELECT frame_index, deaths, last_cause FROM frame_deaths WHERE job_id=? AND deaths>=?",
            (job_id, threshold))}

    # --- crash reports --------------------------------------------------------------------------------
    CRASH_COLUMNS = ("at", "generation", "process", "rung", "stage", "job_id", "frame_index", "cause", "summary",
                     "exit_code", "signal", "remedy", "stderr_tail", "worker_rss", "system_memory", "gpu_memory",
                     "detail")

    def add_crash(self, report: dict[str, Any]) -> None:
        columns = [c for c in self.CRASH_COLUMNS if c in report]
        values = [json.dumps(report[c]) if isinstance(report[c], (dict, list)) else report[c] for c in columns]
        self.exec(f"INSERT INTO crashes ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values)

    def crashes(self, limit: int = 50, job_id: Optional[str] = None) -> list[dict]:
        where, args = ("WHERE job_id=? ", (job_id,)) if job_id else ("", ())
        columns = ("id", *self.CRASH_COLUMNS)
        rows = self.all(f"SELECT {', '.join(columns)} FROM crashes {where}ORDER BY id DESC LIMIT ?", (*args, limit))
        return [_decode_json_fields(dict(zip(columns, row))) for row in rows]

    def crash_counts(self) -> dict[str, int]:
        return dict(self.all("SELECT cause, COUNT(*) FROM crashes GROUP BY cause"))

    # --- meta ----------------------------------------------------------------------------------------
    def put_blob(self, key: str, value: Any) -> None:
        self.exec("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                  (key, msgpack.packb(value, use_bin_type=True)))

    def get_blob(self, key: str) -> Any:
        row = self.one("SELECT value FROM meta WHERE key=?", (key,))
        return msgpack.unpackb(bytes(row[0]), raw=False) if row and row[0] is not None else None

    def next_generation(self) -> int:
        with self.transaction():
            row = self.one("SELECT value FROM meta WHERE key='generation'")
            value = row[0] if row else 0
            generation = int(value if isinstance(value, (str, int)) else msgpack.unpackb(bytes(value))) + 1
            self.put_blob("generation", generation)
        return generation


def fence(lease: Lease) -> tuple[str, str, int]:
    return lease.job_id, lease.owner, lease.gen


class Ledger(SqlLedger):
    """SQLite in WAL mode: the embedded default for one machine. An error that is an outage rather
    than a fault in a statement (a full disk, a lock held past busy_timeout, failing I/O) raises
    LedgerUnavailable, as PostgreSQL's lost connection does: the supervisor rides it out."""

    def __init__(self, path: str, readonly: bool = False):
        self.path, self.readonly = path, readonly
        if not readonly:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with outages():
            if readonly:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                          check_same_thread=False)
            else:
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode survives any process crash; accepting a job commits with FULL
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.migrate()
            self.db.execute("PRAGMA busy_timeout=5000")

    def migrate(self) -> int:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and self.db.execute("SELECT 1 FROM sqlite_master WHERE name='jobs'").fetchone():
            version = 1  # written before versioning: it has the first schema
        steps = migrations("BLOB", "REAL", "INTEGER")
        for number, script in enumerate(steps[version:], start=version + 1):
            self.db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        return self.schema_version()

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def exec(self, sql: str, args: Sequence = ()) -> int:
        with outages():
            return self.db.execute(sql, tuple(args)).rowcount

    def one(self, sql: str, args: Sequence = ()) -> Optional[tuple]:
        with outages():
            return self.db.execute(sql, tuple(args)).fetchone()

    def all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with outages():
            return self.db.execute(sql, tuple(args)).fetchall()

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[None]:
        if self.db.in_transaction:  # nested: the outer transaction commits
            yield
            return
        if durable:
            self.exec("PRAGMA synchronous=FULL")
        try:
            self.exec("BEGIN IMMEDIATE")
            try:
                yield
                self.exec("COMMIT")
            except BaseException:
                self.roll_back()
                raise
        finally:
            if durable:
                self.quietly("PRAGMA synchronous=NORMAL")

    def roll_back(self) -> None:
        """Never hides why the transaction failed: SQLite has often rolled it back already (a full
        disk, an I/O error), and a ROLLBACK that fails as well adds nothing."""
        if self.db.in_transaction:
            self.quietly("ROLLBACK")

    def quietly(self, sql: str) -> None:
        try:
            self.db.execute(sql)
        except sqlite3.Error:
            pass

    def ping(self) -> None:
        """A read answers on a full disk too: only a committed write shows that writes work again.
        It writes room for a few frames and frees it at once, so the file keeps that room for them."""
        if self.readonly:
            return super().ping()
        with self.transaction():
            self.exec("INSERT INTO meta (key, value) VALUES ('write_probe', zeroblob(?))"
                      " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (WRITE_PROBE_BYTES,))
        with self.transaction():
            self.exec("DELETE FROM meta WHERE key='write_probe'")

    def give_up_host(self, owner: str, reason: str) -> list[str]:
        """One machine: no other host will serve its jobs, so they fail with the reason."""
        return self.fail_all_active(reason)

    def close(self) -> None:
        self.db.close()


# SQLite's primary result codes that mean the ledger cannot be used now, not that a statement is wrong
SQLITE_FULL = 13
OUTAGE_CODES = {5: "SQLITE_BUSY", 6: "SQLITE_LOCKED", 8: "SQLITE_READONLY", 10: "SQLITE_IOERR",
                SQLITE_FULL: "SQLITE_FULL", 14: "SQLITE_CANTOPEN", 15: "SQLITE_PROTOCOL"}
# Python before 3.11 gives only the message: its words for those codes
OUTAGE_WORDS = {"database or disk is full": SQLITE_FULL, "database is locked": 5, "database table is locked": 6,
                "readonly database": 8, "disk I/O error": 10, "unable to open database": 14, "locking protocol": 15}
WRITE_PROBE_BYTES = 1 << 20


@contextmanager
def outages() -> Iterator[None]:
    """SQLite errors that are outages leave as LedgerUnavailable; the rest (a wrong statement) as they are."""
    try:
        yield
    except sqlite3.Error as exc:
        outage = sqlite_outage(exc)
        if outage is None:
            raise
        raise outage from exc


def sqlite_outage(exc: sqlite3.Error) -> Optional[LedgerUnavailable]:
    code = primary_code(exc)
    if code is None or code not in OUTAGE_CODES:
        return None
    if code == SQLITE_FULL:
        return LedgerUnavailable(f"the disk under the job ledger is full (SQLITE_FULL: {exc})", disk_full=True)
    return LedgerUnavailable(f"the job ledger cannot be used ({OUTAGE_CODES[code]}: {exc})")


def primary_code(exc: sqlite3.Error) -> Optional[int]:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF  # an extended code (SQLITE_IOERR_WRITE, ...) holds its primary one in the low byte
    text = str(exc)
    return next((number for words, number in OUTAGE_WORDS.items() if words in text), None)


def _decode_json_fields(row: dict) -> dict:
    for key in ("system_memory", "gpu_memory", "detail"):
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except ValueError:
                pass
    return row
