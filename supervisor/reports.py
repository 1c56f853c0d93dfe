"""Crash reports: what the ledger keeps about every death and in-process incident, so an operator
can read the cause, the stage, the frame and a remedy without the logs."""
from __future__ import annotations

import time
from typing import Any, Optional

from pose_common import protocol as P
from pose_common.hostinfo import gpu_facts, system_memory
from supervisor.causes import Ending


def death_report(ending: Ending, job_id: Optional[str], worker_rss: Optional[int],
                 pids: tuple[int, ...]) -> dict[str, Any]:
    death, cause = ending.death, ending.cause
    return _report(process=ending.process, generation=ending.generation, rung=ending.rung, stage=death.stage,
                   job_id=job_id, frame_index=ending.frame if job_id else None, cause=cause.kind,
                   summary=cause.summary, exit_code=death.returncode, signal=cause.signal, remedy=cause.remedy,
                   stderr_tail=death.stderr_tail, worker_rss=worker_rss, pids=pids, detail=ending.detail)


def incident_report(body: P.Incident, job_id: Optional[str], generation: int, rung: str,
                    worker_rss: Optional[int], pids: tuple[int, ...]) -> dict[str, Any]:
    return _report(process="worker", generation=generation, rung=rung, stage=body.stage, job_id=job_id,
                   frame_index=body.frame, cause=body.cause, summary=body.message, exit_code=None, signal=None,
                   remedy=f"recovered in-process: {body.outcome}", stderr_tail="", worker_rss=worker_rss,
                   pids=pids, detail={})


def _report(*, pids: tuple[int, ...], **fields: Any) -> dict[str, Any]:
    return {"at": time.time(), **fields, "system_memory": system_memory(), "gpu_memory": gpu_facts(pids)}
