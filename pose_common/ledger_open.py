"""Which ledger a process opens: the SQLite file of one machine, or the PostgreSQL database that
many daemons share (`ledger.url`)."""
from __future__ import annotations

from typing import Optional

from pose_common.ledger import Ledger, SqlLedger


def open_ledger(url: Optional[str], sqlite_path: str, readonly: bool = False) -> SqlLedger:
    """`ledger.url` unset: the SQLite file in the state dir; `postgresql://...`: the shared database."""
    if url:
        from pose_common.ledger_pg import PgLedger
        return PgLedger(url, readonly=readonly)
    return Ledger(sqlite_path, readonly=readonly)


def open_ledger_at(location: str, readonly: bool = False) -> SqlLedger:
    """A ledger named by one string, as a child process is told: a database URL or a SQLite path."""
    is_url = location.startswith(("postgresql://", "postgres://"))
    return open_ledger(location if is_url else None, location, readonly)
