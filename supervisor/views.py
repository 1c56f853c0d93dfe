"""What the supervisor shows: health (the gateway's /v1/health and the legacy /health), the ops
diagnostics page and the state Prometheus reads when scraped."""
from __future__ import annotations

import os
import time

from pose_common.hostinfo import gpu_facts, host_facts, package_versions
from supervisor.parts import SupervisorParts


def health(sup: SupervisorParts) -> dict:
    health = {**sup.slot.health(), "queue_depth": None, "running_job": sup.jobs.current,
              "uptime_s": round(time.time() - sup.started_at, 1), "ledger": "ok"}
    with sup.keeper.guard():
        if not sup.keeper.outage:
            health["queue_depth"] = len(sup.ledger.queue())
    outage = sup.keeper.outage
    if outage:
        health["ledger"] = f"unavailable for {round(sup.clock() - outage.since, 1)}s: {outage.reason}"
        if health["status"] == "ready":
            health["status"] = "degraded"
        health["reason"] = (f"{outage.reason}: new jobs are refused (507) and the running job resumes once space "
                            "is freed" if outage.disk_full else
                            f"the job ledger is unavailable ({outage.reason}); jobs resume when it is back")
    return health


def message_counts(sup: SupervisorParts) -> dict:
    """`dropped`: refused at the boundary (undecodable, invalid, wrong socket); the rest were
    well-formed but no longer wanted (an old generation, a finished job, a state they don't fit)."""
    refused = ("undecodable", "invalid", "wrong_socket")
    return {"dropped": sum(sup.dropped[k] for k in refused), **{k: sup.dropped[k] for k in refused},
            "stale_generation": sup.dropped["stale_generation"], "stale_job": sup.jobs.stale,
            "ignored_for_state": sum(sup.slot.ignored.values()),
            "expired_request": sup.dropped["expired_request"],
            "reply_undeliverable": sup.dropped["reply_undeliverable"]}


def diagnostics(sup: SupervisorParts) -> dict:
    pids, worker = sup.slot.pids(), sup.slot.describe()
    return {"health": health(sup), "worker": worker, "ladder": worker["ladder"],
            "probed_ok": worker["probed_ok"], "boots": worker["boots"],
            "crashes": sup.ledger.crashes(limit=20), "restarts_by_cause": sup.ledger.crash_counts(),
            "queue": sup.ledger.queue(), "running_job": sup.jobs.current, "messages": message_counts(sup),
            "host": host_facts(), "gpu": gpu_facts(pids), "packages": package_versions(),
            "supervisor": {"pid": os.getpid(), "started_at": sup.started_at}}


def metric_state(sup: SupervisorParts) -> dict:
    gpu = gpu_facts(sup.slot.pids())
    return {**health(sup), "worker_rss": sup.slot.rss, "jobs_by_state": sup.ledger.count_by_state(),
            "deaths_by_cause": sup.ledger.crash_counts(), "messages": message_counts(sup),
            "job_fps": sup.jobs.progress.fps(sup.clock()) if sup.jobs.current else None,
            "gpu_devices": gpu.get("devices") if gpu.get("available") else []}
