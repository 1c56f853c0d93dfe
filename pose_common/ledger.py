"""The durable job ledger (SQLite, WAL). The supervisor is its only writer; gateways open it
read-only to stream results and events without loading them whole.

A job is accepted once its row is committed; frames are appended as they arrive, keyed by
(job, frame_index), so a resumed job can never store a frame twice. The schema is versioned
(PRAGMA user_version) and migrated forward when the ledger opens."""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Sequence

import msgpack

from pose_common.sampling import sampled_indices

ACTIVE_STATES = ("queued", "running")
FINISHED_STATES = ("done", "error")
TERMINAL_EVENT_TYPES = ("done", "error")

MIGRATIONS: list[str] = [
    # 1: jobs, frames, poison frames, crash reports, meta
    """
    CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY,
        idempotency_key TEXT UNIQUE,
        video_path TEXT NOT NULL,
        source TEXT NOT NULL DEFAULT 'path',
        kind TEXT NOT NULL DEFAULT 'video',
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        frames_total INTEGER,
        frames_decoded INTEGER,
        error TEXT,
        warning TEXT,
        video_meta TEXT,
        engine_meta TEXT,
        result_path TEXT
    );
    CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
    CREATE TABLE IF NOT EXISTS frames (
        job_id TEXT NOT NULL,
        frame_index INTEGER NOT NULL,
        pts_s REAL,
        persons BLOB NOT NULL,
        error TEXT,
        PRIMARY KEY (job_id, frame_index)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS frame_deaths (
        job_id TEXT NOT NULL,
        frame_index INTEGER NOT NULL,
        deaths INTEGER NOT NULL,
        last_cause TEXT,
        PRIMARY KEY (job_id, frame_index)
    );
    CREATE TABLE IF NOT EXISTS crashes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        generation INTEGER,
        process TEXT NOT NULL,
        rung TEXT,
        stage TEXT,
        job_id TEXT,
        frame_index INTEGER,
        cause TEXT NOT NULL,
        summary TEXT,
        exit_code INTEGER,
        signal TEXT,
        remedy TEXT,
        stderr_tail TEXT,
        worker_rss INTEGER,
        system_memory TEXT,
        gpu_memory TEXT,
        detail TEXT
    );
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
    """,
    # 2: sampling (max_frames), the rendering phase, tombstones, job events, compact meshes
    """
    ALTER TABLE jobs ADD COLUMN max_frames INTEGER;
    ALTER TABLE jobs ADD COLUMN overlay_path TEXT;
    ALTER TABLE jobs ADD COLUMN removed_at REAL;
    ALTER TABLE jobs ADD COLUMN removed_reason TEXT;
    ALTER TABLE jobs ADD COLUMN run_facts TEXT;
    CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
    CREATE TABLE IF NOT EXISTS job_events (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at REAL NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS frame_meshes (
        job_id TEXT NOT NULL,
        frame_index INTEGER NOT NULL,
        track_id INTEGER NOT NULL,
        vertices BLOB NOT NULL,
        PRIMARY KEY (job_id, frame_index, track_id)
    ) WITHOUT ROWID;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


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


JOB_COLUMNS = tuple(f.name for f in fields(Job))
SELECT_JOB = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"


class Ledger:
    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                      check_same_thread=False)
        else:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives any process crash; acceptance commits use FULL (see accept)
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.migrate()
        self.db.execute("PRAGMA busy_timeout=5000")

    def migrate(self) -> int:
        """Apply every migration newer than the file's version, each in its own transaction."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and self.db.execute("SELECT 1 FROM sqlite_master WHERE name='jobs'").fetchone():
            version = 1  # a ledger written before versioning: it has the first schema
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        return self.schema_version()

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    # --- jobs -----------------------------------------------------------------------------------
    def accept(self, video_path: str, source: str = "path", idempotency_key: Optional[str] = None,
               max_frames: Optional[int] = None) -> tuple[Job, bool]:
        """Commit a new job (durably) or return the existing one for this idempotency key."""
        if idempotency_key:
            existing = self.job_by_key(idempotency_key)
            if existing:
                return existing, False
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        self.db.execute("PRAGMA synchronous=FULL")
        try:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO jobs (job_id, idempotency_key, video_path, source, state, created_at, max_frames)"
                " VALUES (?, ?, ?, ?, 'queued', ?, ?) ON CONFLICT DO NOTHING",
                (job_id, idempotency_key, video_path, source, now, max_frames))
            self._event(job_id, "queued", {"status": "queued"})
            self.db.execute("COMMIT")
        finally:
            self.db.execute("PRAGMA synchronous=NORMAL")
        if idempotency_key:
            return self.job_by_key(idempotency_key), True
        return self.job(job_id), True

    def job(self, job_id: str) -> Optional[Job]:
        row = self.db.execute(f"{SELECT_JOB} WHERE job_id=?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def job_by_key(self, key: str) -> Optional[Job]:
        row = self.db.execute(f"{SELECT_JOB} WHERE idempotency_key=?", (key,)).fetchone()
        return Job(*row) if row else None

    def next_job(self) -> Optional[Job]:
        row = self.db.execute(f"{SELECT_JOB} WHERE state IN ('queued', 'running') ORDER BY created_at LIMIT 1"
                              ).fetchone()
        return Job(*row) if row else None

    def queue(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT job_id FROM jobs WHERE state IN ('queued','running') ORDER BY created_at")]

    def queue_position(self, job_id: str) -> int:
        queue = self.queue()
        return queue.index(job_id) if job_id in queue else -1

    def count_by_state(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    def list_jobs(self, state: Optional[str] = None, limit: int = 50, before: Optional[float] = None) -> list[Job]:
        """Newest first; page with `before` = the created_at of the last job of the previous page."""
        where, args = [], []
        if state:
            where.append("state=?")
            args.append(state)
        if before is not None:
            where.append("created_at<?")
            args.append(before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(f"{SELECT_JOB}{clause} ORDER BY created_at DESC LIMIT ?", (*args, limit))
        return [Job(*row) for row in rows]

    def requeue_running(self) -> int:
        """On boot: every job that was running when the supervisor died goes back to the queue."""
        return self.db.execute("UPDATE jobs SET state='queued' WHERE state='running'").rowcount

    def rendering(self) -> list[Job]:
        """Jobs whose frames are all stored and whose artifacts were being written (resumed on boot)."""
        return [Job(*row) for row in self.db.execute(f"{SELECT_JOB} WHERE state='rendering'")]

    def mark_running(self, job_id: str, generation: Optional[int] = None) -> None:
        self.db.execute("UPDATE jobs SET state='running', attempts=attempts+1,"
                        " started_at=COALESCE(started_at, ?) WHERE job_id=?", (time.time(), job_id))
        job = self.job(job_id)
        self.add_event(job_id, "running", {"status": "running", "attempt": job.attempts if job else None,
                                           "worker_generation": generation})

    def mark_queued(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET state='queued' WHERE job_id=? AND state='running'", (job_id,))

    def set_video_meta(self, job_id: str, meta: dict) -> None:
        self.db.execute("UPDATE jobs SET video_meta=?, frames_total=? WHERE job_id=?",
                        (json.dumps(meta), meta.get("frame_count") or None, job_id))

    def set_engine_meta(self, job_id: str, engine: dict) -> None:
        self.db.execute("UPDATE jobs SET engine_meta=? WHERE job_id=?", (json.dumps(engine), job_id))

    def mark_rendering(self, job_id: str, frames_decoded: int, result_path: Optional[str],
                       warning: Optional[str], run_facts: dict) -> None:
        self.db.execute("UPDATE jobs SET state='rendering', frames_decoded=?, result_path=?, warning=?, run_facts=?"
                        " WHERE job_id=? AND state='running'",
                        (frames_decoded, result_path, warning, json.dumps(run_facts), job_id))
        self.add_event(job_id, "rendering", {"status": "running", "phase": "rendering"})

    def finish(self, job_id: str, overlay_path: Optional[str] = None, warning: Optional[str] = None) -> None:
        """Every artifact the job's answer names exists: it is done."""
        self.db.execute("UPDATE jobs SET state='done', finished_at=?, overlay_path=?,"
                        " warning=COALESCE(?, warning) WHERE job_id=? AND state IN ('running', 'rendering')",
                        (time.time(), overlay_path, warning, job_id))
        job = self.job(job_id)
        self.add_event(job_id, "done", {"status": "done", "frames": job.frames_decoded if job else None,
                                        "warning": job.warning if job else None})

    def fail(self, job_id: str, reason: str) -> bool:
        changed = self.db.execute("UPDATE jobs SET state='error', finished_at=?, error=? WHERE job_id=?"
                                  " AND state IN ('queued','running','rendering')",
                                  (time.time(), reason, job_id)).rowcount
        if changed:
            self.add_event(job_id, "error", {"status": "error", "error": reason})
        return bool(changed)

    def fail_all_active(self, reason: str) -> list[str]:
        ids = self.queue()
        for job_id in ids:
            self.fail(job_id, reason)
        return ids

    # --- retention ---------------------------------------------------------------------------------
    def finished_jobs(self, finished_before: Optional[float] = None) -> list[Job]:
        """Finished jobs whose files have not been removed, oldest first."""
        where = "state IN ('done','error') AND removed_at IS NULL"
        args: tuple = ()
        if finished_before is not None:
            where += " AND finished_at<?"
            args = (finished_before,)
        return [Job(*row) for row in self.db.execute(f"{SELECT_JOB} WHERE {where} ORDER BY finished_at", args)]

    def mark_removed(self, job_id: str, reason: str) -> None:
        """A tombstone: the row stays (so the job answers 410 with the reason), its data goes."""
        self.db.execute("BEGIN")
        self.db.execute("UPDATE jobs SET removed_at=?, removed_reason=? WHERE job_id=?", (time.time(), reason, job_id))
        for table in ("frames", "frame_meshes", "frame_deaths"):
            self.db.execute(f"DELETE FROM {table} WHERE job_id=?", (job_id,))
        self.db.execute("COMMIT")

    # --- frames -----------------------------------------------------------------------------------
    def add_frame(self, job_id: str, index: int, pts_s: Optional[float], persons: list,
                  error: Optional[str] = None, meshes: Optional[dict[int, bytes]] = None) -> bool:
        """Store a frame once; a repeat (recomputed after a crash) is ignored. -> stored?"""
        self.db.execute("BEGIN")
        cur = self.db.execute(
            "INSERT INTO frames (job_id, frame_index, pts_s, persons, error) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (job_id, index, pts_s, msgpack.packb(persons, use_bin_type=True), error))
        stored = cur.rowcount == 1
        if stored and meshes:
            self.db.executemany("INSERT INTO frame_meshes (job_id, frame_index, track_id, vertices)"
                                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                [(job_id, index, track, blob) for track, blob in meshes.items()])
        self.db.execute("COMMIT")
        return stored

    def frames_done(self, job_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM frames WHERE job_id=?", (job_id,)).fetchone()[0]

    def stored_indices(self, job_id: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT frame_index FROM frames WHERE job_id=?", (job_id,))}

    def next_frame(self, job_id: str, selected: Optional[Sequence[int]] = None) -> int:
        """The first frame not yet stored (where a resumed job starts); for a job that processes
        only `selected` frames, the first of those not stored."""
        if selected is not None:
            stored = self.stored_indices(job_id)
            return next((i for i in selected if i not in stored), (selected[-1] + 1) if selected else 0)
        if not self.db.execute("SELECT 1 FROM frames WHERE job_id=? AND frame_index=0", (job_id,)).fetchone():
            return 0
        row = self.db.execute(
            "SELECT MIN(f.frame_index + 1) FROM frames f WHERE f.job_id=? AND NOT EXISTS"
            " (SELECT 1 FROM frames g WHERE g.job_id=f.job_id AND g.frame_index=f.frame_index+1)",
            (job_id,)).fetchone()
        return int(row[0] or 0)

    def iter_frames(self, job_id: str, after: int = -1, with_vertices: bool = False,
                    batch: int = 256) -> Iterator[dict]:
        """Frames in order, fetched in batches: memory stays flat however long the video."""
        while True:
            rows = self.db.execute(
                "SELECT frame_index, pts_s, persons, error FROM frames WHERE job_id=? AND frame_index>?"
                " ORDER BY frame_index LIMIT ?", (job_id, after, batch)).fetchall()
            if not rows:
                return
            meshes = self._meshes(job_id, rows[0][0], rows[-1][0]) if with_vertices else {}
            for index, pts, persons, error in rows:
                entry = {"frame_index": index, "pts_s": pts, "persons": msgpack.unpackb(persons, raw=False)}
                for person in entry["persons"]:
                    blob = meshes.get((index, person.get("track_id")))
                    if blob is not None:
                        person["vertices"] = blob
                if error:
                    entry["error"] = error
                yield entry
            after = rows[-1][0]

    def _meshes(self, job_id: str, first: int, last: int) -> dict[tuple[int, int], bytes]:
        return {(f, t): v for f, t, v in self.db.execute(
            "SELECT frame_index, track_id, vertices FROM frame_meshes WHERE job_id=? AND frame_index BETWEEN ? AND ?",
            (job_id, first, last))}

    def has_meshes(self, job_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM frame_meshes WHERE job_id=? LIMIT 1", (job_id,)).fetchone() is not None

    # --- job events (server-sent events read these) ---------------------------------------------------
    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> int:
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN")
        seq = self._event(job_id, kind, data)
        if own:
            self.db.execute("COMMIT")
        return seq

    def _event(self, job_id: str, kind: str, data: dict[str, Any]) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id=?", (job_id,)).fetchone()
        self.db.execute("INSERT INTO job_events (job_id, seq, at, type, data) VALUES (?, ?, ?, ?, ?)",
                        (job_id, row[0], time.time(), kind, json.dumps(data)))
        return row[0]

    def events_since(self, job_id: str, seq: int = 0, limit: int = 500) -> list[dict]:
        return [{"id": s, "at": at, "type": kind, "data": json.loads(data)} for s, at, kind, data in self.db.execute(
            "SELECT seq, at, type, data FROM job_events WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?",
            (job_id, seq, limit))]

    # --- poison frames ------------------------------------------------------------------------------
    def record_frame_death(self, job_id: str, index: int, cause: str) -> int:
        self.db.execute(
            "INSERT INTO frame_deaths (job_id, frame_index, deaths, last_cause) VALUES (?, ?, 1, ?)"
            " ON CONFLICT(job_id, frame_index) DO UPDATE SET deaths=deaths+1, last_cause=excluded.last_cause",
            (job_id, index, cause))
        return self.db.execute("SELECT deaths FROM frame_deaths WHERE job_id=? AND frame_index=?",
                               (job_id, index)).fetchone()[0]

    def poison_frames(self, job_id: str, threshold: int) -> dict[int, str]:
        return {i: f"frame killed the worker {d} times (last cause: {c}); skipped"
                for i, d, c in self.db.execute(
                    "SELECT frame_index, deaths, last_cause FROM frame_deaths WHERE job_id=? AND deaths>=?",
                    (job_id, threshold))}

    # --- crash reports --------------------------------------------------------------------------------
    def add_crash(self, report: dict[str, Any]) -> int:
        columns = [c for c in report if c != "id"]
        values = [json.dumps(report[c]) if isinstance(report[c], (dict, list)) else report[c] for c in columns]
        cur = self.db.execute(f"INSERT INTO crashes ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                              values)
        return cur.lastrowid

    def crashes(self, limit: int = 50, job_id: Optional[str] = None) -> list[dict]:
        where, args = ("WHERE job_id=? ", (job_id,)) if job_id else ("", ())
        cur = self.db.execute(f"SELECT * FROM crashes {where}ORDER BY id DESC LIMIT ?", (*args, limit))
        names = [d[0] for d in cur.description]
        return [_decode_json_fields(dict(zip(names, row))) for row in cur.fetchall()]

    def crash_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT cause, COUNT(*) FROM crashes GROUP BY cause"))

    # --- meta ----------------------------------------------------------------------------------------
    def put_blob(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, msgpack.packb(value, use_bin_type=True)))

    def get_blob(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return msgpack.unpackb(row[0], raw=False) if row and isinstance(row[0], bytes) else None

    def next_generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        generation = int(row[0]) + 1 if row else 1
        self.db.execute("INSERT INTO meta (key, value) VALUES ('generation', ?) ON CONFLICT(key)"
                        " DO UPDATE SET value=excluded.value", (str(generation),))
        return generation


def _decode_json_fields(row: dict) -> dict:
    for key in ("system_memory", "gpu_memory", "detail"):
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except ValueError:
                pass
    return row
