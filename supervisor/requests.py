"""What the gateway and the CLI may ask the supervisor: one handler per request type, found through
one table, each answering exactly once (an image is answered later: by the worker, a timeout or the
worker's end; see PendingImages)."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from configs import video_roots
from pose_common import faults
from pose_common import protocol as P
from pose_common.ledger import LedgerUnavailable
from pose_common.paths import PathRefused, resolve_inside
from pose_common.views import job_view
from supervisor import views
from supervisor.outage import Outage
from supervisor.parts import SupervisorParts

Handler = Callable[[bytes, P.Envelope, Any], None]


class RequestHandlers:
    def __init__(self, sup: SupervisorParts):
        self.sup = sup
        self.table: dict[str, Handler] = {
            P.T.SUBMIT: self.submit, P.T.STATUS: self.status, P.T.CANCEL: self.cancel, P.T.HEALTH: self.health,
            P.T.DIAGNOSTICS: self.diagnostics, P.T.METRICS: self.metrics, P.T.IMAGE: self.image,
            P.T.DRILL: self.drill, P.T.RELOAD: self.reload,
        }
        missing = P.REQUESTS - set(self.table)
        if missing:
            raise RuntimeError(f"request types without a handler: {sorted(missing)}")

    def handle(self, identity: bytes, env: P.Envelope, body: P.Body) -> None:
        deadline = getattr(body, "deadline", None)  # every request schema has one (P.Request)
        if deadline is not None and deadline < time.time():
            self.sup.dropped["expired_request"] += 1
            return  # the caller already gave up (queued while we were down)
        self.table[env.type](identity, env, body)

    def answer(self, identity: bytes, env: P.Envelope, status: int = 200, **body: Any) -> None:
        self.sup.reply(identity, env, status, **body)

    # --- jobs ---------------------------------------------------------------------------------------
    def submit(self, identity: bytes, env: P.Envelope, body: P.Submit) -> None:
        sup = self.sup
        if sup.slot.is_fatal:
            return self.answer(identity, env, 503, error=f"service is fatal: {sup.slot.fatal_reason()}",
                               status_word="fatal")
        if sup.keeper.outage:
            return self.refuse_for_ledger(identity, env, sup.keeper.outage)
        if len(sup.ledger.queue()) >= sup.cfg.jobs.queue_max:
            return self.answer(identity, env, 429, error=f"Queue full (max {sup.cfg.jobs.queue_max})",
                               retry_after_s=sup.jobs.seconds_until_free(sup.clock()))
        refusal = self.refuse_path(body.video_path)
        if refusal:
            sup.log.warning("submit_refused", reason=refusal)
            return self.answer(identity, env, 403, error=refusal)
        try:
            job, created = sup.ledger.accept(body.video_path, body.source, body.idempotency_key, body.max_frames)
        except LedgerUnavailable as exc:
            return self.refuse_for_ledger(identity, env, sup.keeper.lost(exc))
        sup.log.info("job_accepted", job_id=job.job_id, created=created)
        self.answer(identity, env, 202 if created else 200, job={**job_view(job, sup.ledger), "created": created})

    def refuse_for_ledger(self, identity: bytes, env: P.Envelope, outage: Outage) -> None:
        """A full disk under the ledger is a 507, any other outage a 503: nothing new is accepted meanwhile."""
        self.answer(identity, env, outage.cause.http_status, error=outage.refusal(), code=outage.cause.code)

    def refuse_path(self, path: str) -> Optional[str]:
        """Defence in depth: the gateway checked the roots, and so does the ledger's only writer."""
        try:
            resolve_inside(path, video_roots(self.sup.cfg))
        except PathRefused as exc:
            return str(exc)
        return None

    def status(self, identity: bytes, env: P.Envelope, body: P.JobRef) -> None:
        view = self.sup.jobs.view(body.job_id)
        if view is None:
            return self.answer(identity, env, 404, error="Job not found")
        self.answer(identity, env, 200, job=view)

    def cancel(self, identity: bytes, env: P.Envelope, body: P.JobRef) -> None:
        """DELETE: a job still to run or running is stopped (the engine stays loaded); then, whatever
        its state, its results and files go, and it answers 410 from then on."""
        jobs = self.sup.jobs
        if jobs.view(body.job_id) is None:
            return self.answer(identity, env, 404, error="Job not found")
        jobs.cancel(body.job_id, self.sup.clock())
        self.sup.retention.delete(body.job_id, "deleted by its owner (DELETE /v1/jobs/{job_id})")
        self.answer(identity, env, 200, job=jobs.view(body.job_id))

    def image(self, identity: bytes, env: P.Envelope, body: P.ImageRequest) -> None:
        sup = self.sup
        if not env.blobs:
            return self.answer(identity, env, 400, error="no image")
        if not env.req:
            return self.answer(identity, env, 400, error="an image request needs its request id (req) for the answer")
        if not sup.slot.serving:
            return self.answer(identity, env, 503, error=f"worker not ready ({sup.slot.life.label()})",
                               health=views.health(sup))
        if not sup.send_worker(P.T.RUN_IMAGE, req=env.req, blobs=[env.blobs[0]]):
            sup.slot.worker_unreachable("the worker's socket refused an image")
            return self.answer(identity, env, 503, error="worker unreachable; it is being replaced")
        timeout = body.timeout_s or sup.cfg.deadlines.image_s
        sup.images.add(env.req, identity, self.sup.clock() + timeout)

    # --- what the service shows ------------------------------------------------------------------------
    def health(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.answer(identity, env, 200, health=views.health(self.sup))

    def diagnostics(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.answer(identity, env, 200, **views.diagnostics(self.sup))

    def metrics(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.answer(identity, env, 200, text=self.sup.metrics.exposition())

    # --- the operator ------------------------------------------------------------------------------------
    def drill(self, identity: bytes, env: P.Envelope, body: P.DrillRequest) -> None:
        sup = self.sup
        try:
            faults.check(body.fault, body.at, sup.slot.stage_names or None)
        except faults.BadFault as exc:
            return self.answer(identity, env, 400, error=str(exc))
        self.clear_fault_counter(body.fault, body.at)
        if body.at == faults.SUPERVISOR:
            sup.crash_next_tick = True
        elif body.at.startswith("frame:") or body.at == "image":
            if not sup.slot.serving:
                return self.answer(identity, env, 409, error=f"the worker is {sup.slot.life.label()}; a frame or "
                                                             "image fault needs a ready worker")
            if not sup.send_worker(P.T.ARM_FAULT, fault=body.fault, at=body.at, times=1, hang_s=sup.cfg.fault.hang_s):
                return self.answer(identity, env, 503, error="the worker could not be reached; nothing was armed")
        else:
            sup.slot.drill(body.fault, body.at)
        sup.log.warning("drill_armed", kind=body.fault, at=body.at)
        self.answer(identity, env, 200, armed={"kind": body.fault, "at": body.at}, generation=sup.slot.generation)

    def reload(self, identity: bytes, env: P.Envelope, body: P.Request) -> None:
        self.sup.slot.reload()
        self.answer(identity, env, 200, status_word="reloaded", health=views.health(self.sup))

    def clear_fault_counter(self, kind: str, at: str) -> None:
        path = faults.counter_path(kind, at, self.sup.cfg.runtime_dir)
        if os.path.exists(path):
            os.unlink(path)
