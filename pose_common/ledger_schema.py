"""The ledger's schema as numbered migrations, in the words both dialects (SQLite, PostgreSQL) take.
A migration is only ever appended: a ledger opens at its stored version and runs the ones after it."""
from __future__ import annotations


def migrations(blob: str, real: str, serial: str) -> list[str]:
    """The schema, step by step, with the two dialects' names for bytes, floats and row ids."""
    return [
        # 1: jobs, frames, poison frames, crash reports, meta
        f"""
        CREATE TABLE IF NOT EXISTS jobs (
            job_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, video_path TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT 'path', kind TEXT NOT NULL DEFAULT 'video', state TEXT NOT NULL,
            created_at {real} NOT NULL, started_at {real}, finished_at {real}, attempts INTEGER NOT NULL DEFAULT 0,
            frames_total INTEGER, frames_decoded INTEGER, error TEXT, warning TEXT, video_meta TEXT,
            engine_meta TEXT, result_path TEXT);
        CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
        CREATE TABLE IF NOT EXISTS frames (
            job_id TEXT NOT NULL, frame_index INTEGER NOT NULL, pts_s {real}, persons {blob} NOT NULL, error TEXT,
            PRIMARY KEY (job_id, frame_index));
        CREATE TABLE IF NOT EXISTS frame_deaths (
            job_id TEXT NOT NULL, frame_index INTEGER NOT NULL, deaths INTEGER NOT NULL, last_cause TEXT,
            PRIMARY KEY (job_id, frame_index));
        CREATE TABLE IF NOT EXISTS crashes (
            id {serial} PRIMARY KEY, at {real} NOT NULL, generation INTEGER, process TEXT NOT NULL, rung TEXT,
            stage TEXT, job_id TEXT, frame_index INTEGER, cause TEXT NOT NULL, summary TEXT, exit_code BIGINT,
            signal TEXT, remedy TEXT, stderr_tail TEXT, worker_rss BIGINT, system_memory TEXT, gpu_memory TEXT,
            detail TEXT);
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value {blob});
        """,
        # 2: sampling, the rendering phase, tombstones, leases, job events, compact meshes
        f"""
        ALTER TABLE jobs ADD COLUMN max_frames INTEGER;
        ALTER TABLE jobs ADD COLUMN overlay_path TEXT;
        ALTER TABLE jobs ADD COLUMN removed_at {real};
        ALTER TABLE jobs ADD COLUMN removed_reason TEXT;
        ALTER TABLE jobs ADD COLUMN run_facts TEXT;
        ALTER TABLE jobs ADD COLUMN owner TEXT;
        ALTER TABLE jobs ADD COLUMN lease_until {real};
        ALTER TABLE jobs ADD COLUMN lease_gen INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
        CREATE TABLE IF NOT EXISTS job_events (
            id {serial} PRIMARY KEY, job_id TEXT NOT NULL, at {real} NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL);
        CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id, id);
        CREATE TABLE IF NOT EXISTS frame_meshes (
            job_id TEXT NOT NULL, frame_index INTEGER NOT NULL, track_id INTEGER NOT NULL, vertices {blob} NOT NULL,
            PRIMARY KEY (job_id, frame_index, track_id));
        """,
    ]
