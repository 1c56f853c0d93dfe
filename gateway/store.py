"""The ledger, read-only, from the gateway: results and events are streamed from it in batches, so
nothing is loaded whole, and (with a shared PostgreSQL ledger) any gateway answers for any job.

Every read runs on one thread of its own: a slow query never blocks the event loop, and the
connection is only ever used by that one thread."""
from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, TypeVar

from aiohttp import web

from configs import Config, ledger_location
from gateway.errors import json_error
from pose_common.ledger import Job, LedgerUnavailable, SqlLedger
from pose_common.ledger_open import open_ledger_at

T = TypeVar("T")


class LedgerReader:
    def __init__(self, cfg: Config) -> None:
        self.location = ledger_location(cfg)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self.ledger: Optional[SqlLedger] = None

    def _open(self) -> SqlLedger:
        if self.ledger is None:
            self.ledger = open_ledger_at(self.location, readonly=True)
        return self.ledger

    async def run(self, read: Callable[[SqlLedger], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: read(self._open()))
        except (LedgerUnavailable, sqlite3.OperationalError) as exc:
            self.ledger = None
            raise json_error(503, "the job ledger is unavailable; try again shortly", code="ledger_unavailable",
                             detail=str(exc)[:200]) from None

    async def chunks(self, source: Callable[[SqlLedger], Iterator[Any]], per_batch: int = 64):
        """An iterator over the ledger, pulled `per_batch` items at a time on the ledger's thread."""
        items: dict[str, Iterator[Any]] = {}

        def pull(ledger: SqlLedger) -> list:
            iterator = items.setdefault("it", source(ledger))
            batch = []
            for item in iterator:
                batch.append(item)
                if len(batch) >= per_batch:
                    break
            return batch

        while batch := await self.run(pull):
            for item in batch:
                yield item

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.ledger is not None:
            self.ledger.close()


READER_KEY = web.AppKey("ledger_reader", LedgerReader)


def reader(request: web.Request) -> LedgerReader:
    return request.app[READER_KEY]


def ledger_job(ledger: SqlLedger, job_id: str) -> Job:
    """A job the supervisor has just answered for (its rows are never deleted, only its files)."""
    job = ledger.job(job_id)
    if job is None:
        raise LookupError(f"job {job_id} is not in the ledger")
    return job
