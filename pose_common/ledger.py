"""The durable job ledger (SQLite, WAL). The supervisor is its only writer.

A job is accepted once its row is committed; frames are appended as they arrive, keyed by
(job, frame_index), so a resumed job can never store a frame twice."""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import msgpack

SCHEMA = """
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
"""

ACTIVE_STATES = ("queued", "running")
JOB_COLUMNS = ("job_id", "idempotency_key", "video_path", "source", "kind", "state", "created_at",
               "started_at", "finished_at", "attempts", "frames_total", "frames_decoded", "error",
               "warning", "video_meta", "engine_meta", "result_path")


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

    def meta(self) -> dict:
        return json.loads(self.video_meta) if self.video_meta else {}


class Ledger:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives any process crash; acceptance commits use FULL (see accept)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- jobs -----------------------------------------------------------------------------------
    def accept(self, video_path: str, source: str = "path", idempotency_key: Optional[str] = None,
               kind: str = "video") -> tuple[Job, bool]:
        """Commit a new job (durably) or return the existing one for this idempotency key."""
        if idempotency_key:
            existing = self.job_by_key(idempotency_key)
            if existing:
                return existing, False
        job_id = uuid.uuid4().hex[:16]
        self.db.execute("PRAGMA synchronous=FULL")
        try:
            self.db.execute(
                "INSERT INTO jobs (job_id, idempotency_key, video_path, source, kind, state, created_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?) ON CONFLICT DO NOTHING",
                (job_id, idempotency_key, video_path, source, kind, time.time()))
        finally:
            self.db.execute("PRAGMA synchronous=NORMAL")
        if idempotency_key:
            return self.job_by_key(idempotency_key), True
        return self.job(job_id), True

    def job(self, job_id: str) -> Optional[Job]:
        row = self.db.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def job_by_key(self, key: str) -> Optional[Job]:
        row = self.db.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE idempotency_key=?", (key,)).fetchone()
        return Job(*row) if row else None

    def next_job(self) -> Optional[Job]:
        row = self.db.execute(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE state IN ('queued', 'running')"
            " ORDER BY created_at LIMIT 1").fetchone()
        return Job(*row) if row else None

    def queue(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT job_id FROM jobs WHERE state IN ('queued','running') ORDER BY created_at")]

    def queue_position(self, job_id: str) -> int:
        queue = self.queue()
        return queue.index(job_id) if job_id in queue else -1

    def count_by_state(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    def requeue_running(self) -> int:
        """On boot: every job that was running when the supervisor died goes back to the queue."""
        return self.db.execute("UPDATE jobs SET state='queued' WHERE state='running'").rowcount

    def mark_running(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET state='running', attempts=attempts+1,"
                        " started_at=COALESCE(started_at, ?) WHERE job_id=?", (time.time(), job_id))

    def mark_queued(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET state='queued' WHERE job_id=? AND state='running'", (job_id,))

    def set_video_meta(self, job_id: str, meta: dict) -> None:
        self.db.execute("UPDATE jobs SET video_meta=?, frames_total=? WHERE job_id=?",
                        (json.dumps(meta), meta.get("frame_count") or None, job_id))

    def set_engine_meta(self, job_id: str, engine: dict) -> None:
        self.db.execute("UPDATE jobs SET engine_meta=? WHERE job_id=?", (json.dumps(engine), job_id))

    def finish(self, job_id: str, frames_decoded: int, result_path: str, warning: Optional[str] = None) -> None:
        self.db.execute("UPDATE jobs SET state='done', finished_at=?, frames_decoded=?, frames_total=?,"
                        " result_path=?, warning=? WHERE job_id=?",
                        (time.time(), frames_decoded, frames_decoded, result_path, warning, job_id))

    def fail(self, job_id: str, reason: str) -> None:
        self.db.execute("UPDATE jobs SET state='error', finished_at=?, error=? WHERE job_id=?"
                        " AND state IN ('queued','running')", (time.time(), reason, job_id))

    def fail_all_active(self, reason: str) -> list[str]:
        ids = self.queue()
        for job_id in ids:
            self.fail(job_id, reason)
        return ids

    # --- frames -----------------------------------------------------------------------------------
    def add_frame(self, job_id: str, index: int, pts_s: Optional[float], persons: list,
                  error: Optional[str] = None) -> bool:
        """Store a frame once; a repeat (recomputed after a crash) is ignored. -> stored?"""
        cur = self.db.execute(
            "INSERT INTO frames (job_id, frame_index, pts_s, persons, error) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (job_id, index, pts_s, msgpack.packb(persons, use_bin_type=True), error))
        return cur.rowcount == 1

    def frames_done(self, job_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM frames WHERE job_id=?", (job_id,)).fetchone()[0]

    def next_frame(self, job_id: str) -> int:
        """The first frame index not yet stored (where a resumed job starts)."""
        row = self.db.execute(
            "SELECT MIN(f.frame_index + 1) FROM frames f WHERE f.job_id=? AND NOT EXISTS"
            " (SELECT 1 FROM frames g WHERE g.job_id=f.job_id AND g.frame_index=f.frame_index+1)",
            (job_id,)).fetchone()
        if not self.db.execute("SELECT 1 FROM frames WHERE job_id=? AND frame_index=0", (job_id,)).fetchone():
            return 0
        return int(row[0] or 0)

    def iter_frames(self, job_id: str) -> Iterator[dict]:
        for index, pts, persons, error in self.db.execute(
                "SELECT frame_index, pts_s, persons, error FROM frames WHERE job_id=? ORDER BY frame_index",
                (job_id,)):
            entry = {"frame_index": index, "pts_s": pts, "persons": msgpack.unpackb(persons, raw=False)}
            if error:
                entry["error"] = error
            yield entry

    def frame(self, job_id: str, index: int) -> Optional[dict]:
        row = self.db.execute("SELECT pts_s, persons, error FROM frames WHERE job_id=? AND frame_index=?",
                              (job_id, index)).fetchone()
        if not row:
            return None
        return {"frame_index": index, "pts_s": row[0], "persons": msgpack.unpackb(row[1], raw=False), "error": row[2]}

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

    def crashes(self, limit: int = 50) -> list[dict]:
        cur = self.db.execute("SELECT * FROM crashes ORDER BY id DESC LIMIT ?", (limit,))
        names = [d[0] for d in cur.description]
        return [_decode_json_fields(dict(zip(names, row))) for row in cur.fetchall()]

    def crash_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT cause, COUNT(*) FROM crashes GROUP BY cause"))

    # --- meta ----------------------------------------------------------------------------------------
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
