"""The job ledger on PostgreSQL (psycopg 3), shared by every daemon of a deployment.

Same statements as the SQLite ledger (placeholders translated), with `FOR UPDATE SKIP LOCKED` so
concurrent supervisors claim different jobs, and a versioned schema migrated under an advisory
lock at start. A lost connection raises LedgerUnavailable; the next call reconnects."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import psycopg

from pose_common.ledger import LedgerUnavailable, SqlLedger
from pose_common.ledger_schema import migrations

MIGRATION_LOCK = 0x706F7365  # pg_advisory_lock key: one migrator at a time
CONNECT_TIMEOUT_S = 5


class PgLedger(SqlLedger):
    skip_locked = " FOR UPDATE SKIP LOCKED"
    # the server's clock: a host whose own clock runs ahead cannot take over a job whose lease has not expired
    now_sql = "EXTRACT(EPOCH FROM clock_timestamp())::float8"

    def __init__(self, url: str, readonly: bool = False):
        """Connects lazily: a daemon that starts while the database is down still starts (and says
        so); the schema is migrated on the first connection."""
        self.url, self.readonly, self.path = url, readonly, url
        self.conn: Optional[psycopg.Connection] = None
        self.migrated = readonly
        try:
            self.connect()
        except LedgerUnavailable:
            pass

    def connect(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            try:
                self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
                if not self.migrated:
                    self.migrate(self.conn)
                    self.migrated = True
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._drop()
                raise unavailable(exc) from None
        return self.conn

    def migrate(self, conn: psycopg.Connection) -> int:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            steps = migrations("BYTEA", "DOUBLE PRECISION", "BIGSERIAL")
            for number, script in enumerate(steps[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
            return number if steps[version:] else version

    def schema_version(self) -> int:
        row = self.one("SELECT version FROM schema_version")
        return row[0] if row else 0

    def _run(self, sql: str, args: Sequence):
        try:
            return self.connect().execute(sql.replace("?", "%s"), tuple(args))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop()
            raise unavailable(exc) from None

    def exec(self, sql: str, args: Sequence = ()) -> int:
        return self._run(sql, args).rowcount

    def one(self, sql: str, args: Sequence = ()) -> Optional[tuple]:
        return self._run(sql, args).fetchone()

    def all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        return self._run(sql, args).fetchall()

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[None]:
        """Every commit on PostgreSQL is durable (synchronous_commit is the server's to set)."""
        conn = self.connect()
        try:
            with conn.transaction():
                yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop()
            raise unavailable(exc) from None

    def ping(self) -> None:
        """A read answers on a full disk too: a write committed shows that writes work again."""
        if self.readonly:
            return super().ping()
        with self.transaction():
            self.exec("INSERT INTO meta (key, value) VALUES ('write_probe', ?) ON CONFLICT(key) DO UPDATE"
                      " SET value=excluded.value", (b"probe",))

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None

    def close(self) -> None:
        self._drop()


def unavailable(exc: psycopg.Error) -> LedgerUnavailable:
    """The server's disk full (SQLSTATE 53100) is told apart: it answers reads, and new jobs get 507."""
    return LedgerUnavailable(_first_line(exc), disk_full=isinstance(exc, psycopg.errors.DiskFull))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]

