"""Worker process: connect, load the engine stage by stage, then serve jobs and images until told
to stop. Every way out is deliberate: a reported cause plus a meaningful exit code, or a real crash
that the supervisor decodes from the signal, the breadcrumb file and the stderr tail."""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import msgspec
import numpy as np
import psutil
import structlog
import zmq

from configs import Config, fault_settings, read_config, video_roots
from gpu_worker.engines import build_engine
from gpu_worker.engines.base import FrameOut
from gpu_worker.engines.fault import FaultEngine, FaultPlan
from gpu_worker.errors import classify, free_cuda_cache, is_cuda_oom
from gpu_worker.gpu import gpu_memory_used
from gpu_worker.images import decode_for_engine, to_original
from gpu_worker.track_ids import Resume
from pose_common import exitcodes
from pose_common import protocol as P
from pose_common.children import die_with_parent
from pose_common.logs import setup_logging
from pose_common.numbers import finite
from pose_common.paths import PathRefused, open_inside
from pose_common.runtime import RuntimeDir
from pose_common.sampling import sampled_indices
from pose_common.video import FrameSource, TruncatedVideo, VideoError, VideoMeta, user_reason

SKIP_REPORT_MAX_S = 5.0  # the longest silence while frames before a resume point are read


class Dying(Exception):
    """Raised to leave the worker with a reported cause and a chosen exit code."""

    def __init__(self, cause: str, code: int, detail: dict[str, Any]):
        super().__init__(cause)
        self.cause, self.code, self.detail = cause, code, detail


class JobStopped(Exception):
    """The supervisor cancelled the job on the worker: stop between two frames, keep the engine."""


@dataclass
class JobProgress:
    decoded: int
    began: bool = False


class SkipReporter:
    """Frames before a resume point are read without anything to send, and the supervisor's frame
    deadline counts from the job's dispatch: the video's meta is sent again now and then while
    they are read (a VIDEO message is progress to the supervisor, supervisor/jobs.py on_video)."""

    def __init__(self, send_meta: Callable[[VideoMeta], None], every_s: float):
        self.send_meta, self.every_s = send_meta, every_s
        self.last = time.monotonic()

    def __call__(self, meta: VideoMeta) -> None:
        if (now := time.monotonic()) - self.last >= self.every_s:
            self.last = now
            self.send_meta(meta)


class Breadcrumb:
    """Where the worker is, in a file: it survives a death too sudden to report."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def drop(self, **where: Any) -> None:
        data = json.dumps(where).encode()
        os.pwrite(self.fd, data.ljust(256), 0)


class Heartbeat(threading.Thread):
    """Beats from its own thread and socket. It proves the process lives, not that it progresses:
    the supervisor watches progress separately. It also ends the worker if the supervisor is gone."""

    def __init__(self, ctx: zmq.Context, endpoint: str, generation: int, interval: float, parent_pid: int):
        super().__init__(name="heartbeat", daemon=True)
        self.sock = P.connect_dealer(ctx, endpoint, P.worker_identity(generation, "hb").decode())
        self.generation, self.interval, self.parent_pid = generation, interval, parent_pid
        self.status: dict[str, Any] = {"state": "starting"}
        self.stop = threading.Event()

    def run(self) -> None:
        proc = psutil.Process()
        while not self.stop.wait(self.interval):
            if os.getppid() != self.parent_pid:
                os._exit(exitcodes.EX_ORPHANED)
            body = {**self.status, "rss": proc.memory_info().rss}
            try:
                self.sock.send_multipart(P.pack(P.Envelope(P.T.HEARTBEAT, body, gen=self.generation)),
                                         flags=zmq.NOBLOCK)
            except zmq.Again:
                pass


class Worker:
    def __init__(self, cfg: Config, generation: int, rung: dict, parent_pid: int):
        self.cfg, self.generation, self.rung = cfg, generation, rung
        self.log = setup_logging("worker", cfg.log_level).bind(generation=generation)
        self.ctx = zmq.Context()
        self.endpoint = P.endpoints(cfg.runtime_dir).worker
        self.sock = P.connect_dealer(self.ctx, self.endpoint, P.worker_identity(generation).decode())
        self.heartbeat = Heartbeat(self.ctx, self.endpoint, generation, cfg.supervisor.heartbeat_s, parent_pid)
        self.crumb = Breadcrumb(RuntimeDir(cfg.runtime_dir).worker_crumb(generation))
        self._engine: Optional[FaultEngine] = None
        self.stage = "start"
        self.job: Optional[str] = None
        self.frame: Optional[int] = None
        self.process = psutil.Process()
        self.held_pts: dict[int, Optional[float]] = {}  # frames in the engine, not yet emitted
        self.resume: Optional[Resume] = None

    @property
    def engine(self) -> FaultEngine:
        """The engine run() built first; everything else the worker does comes after."""
        if self._engine is None:
            raise RuntimeError("the worker's engine is not built yet")
        return self._engine

    # --- sending ----------------------------------------------------------------------------
    def send(self, kind: str, job: Optional[str] = None, blobs: Optional[list] = None, **body: Any) -> None:
        env = P.Envelope(kind, body, gen=self.generation, job=job, blobs=blobs or [])
        self.sock.send_multipart(P.pack(env), copy=False)

    def mark(self, stage: str, frame: Optional[int] = None) -> None:
        self.stage, self.frame = stage, frame
        self.crumb.drop(stage=stage, job=self.job, frame=frame, t=time.time())
        self.heartbeat.status = {"state": stage, "job": self.job, "frame": frame}

    # --- life ---------------------------------------------------------------------------------
    def run(self) -> int:
        self.heartbeat.start()
        self.send(P.T.HELLO, pid=os.getpid(), rung=self.rung)
        try:
            self._engine = self.build_engine()
            self.mark("start")
            self.engine.check("start")
            self.load()
            faces = self.engine.mesh_faces()
            self.send(P.T.READY, engine=self.engine.describe(), joint_names=self.engine.joint_names,
                      mesh_faces=None if faces is None else faces.tolist())
            self.mark("ready")
            return self.serve()
        except Dying as dying:
            return self.die(dying)
        except Exception as exc:  # a bug of ours: still report it before going
            return self.die(self.dying_from(exc, during_load=False))

    def build_engine(self) -> FaultEngine:
        fault = fault_settings(self.cfg)
        name = self.rung["engine"]
        if name == "fault":
            fault.setdefault("base", self.cfg.fault.base)
        try:
            return build_engine(name, self.rung.get("device", "cpu"), self.rung.get("options") or {},
                                fault=fault, counter_dir=self.cfg.runtime_dir)
        except Exception as exc:
            raise self.dying_from(exc, during_load=True) from None

    def load(self) -> None:
        for stage in self.engine.stages():
            self.mark(stage.name)
            before_rss, before_gpu, started = self.process.memory_info().rss, gpu_memory_used(), time.monotonic()
            self.send(P.T.STAGE, name=stage.name, event="start")
            try:
                stage.run()
            except Exception as exc:
                raise self.dying_from(exc, during_load=True) from None
            self.send(P.T.STAGE, name=stage.name, event="end",
                      duration_s=round(time.monotonic() - started, 4),
                      rss_delta=self.process.memory_info().rss - before_rss,
                      gpu_delta=_delta(gpu_memory_used(), before_gpu))

    def serve(self) -> int:
        """Until the supervisor's SIGTERM (see main) or a death ends the process."""
        while True:
            if not self.sock.poll(1000):
                continue
            received = self.receive()
            if received is not None:
                self.handle(*received)

    def receive(self) -> Optional[tuple[P.Envelope, P.Body]]:
        """The next message from the supervisor, checked against its schema; what does not fit is
        dropped and logged."""
        try:
            env = P.unpack(self.sock.recv_multipart(copy=False))
            if env.type not in P.TO_WORKER:
                raise P.ProtocolError(f"{env.type[:40]!r} is not for the worker")
            return env, P.parse(env)
        except P.ProtocolError as exc:
            self.log.warning("dropped_message", reason=str(exc))
            return None

    def handle(self, env: P.Envelope, body: P.Body) -> None:
        if isinstance(body, P.RunJob):
            self.run_job(env, body)
        elif isinstance(body, P.RunImage):
            self.run_image(env)
        elif isinstance(body, P.ArmFault):
            self.engine.arm(FaultPlan(body.fault, body.at, body.times, self.cfg.runtime_dir, body.hang_s))

    # --- jobs -----------------------------------------------------------------------------------
    def run_job(self, env: P.Envelope, body: P.RunJob) -> None:
        self.job = env.job
        structlog.contextvars.bind_contextvars(job_id=self.job)
        log = self.log
        poison = {int(k): v for k, v in body.poison.items()}
        start = body.start_frame
        self.resume = Resume.from_run_job(msgspec.structs.asdict(body), start)
        self.held_pts = {}
        log.info("job_start", path=body.path, start_frame=start, poison=sorted(poison),
                 warm_from=self.resume and self.resume.warm_from)
        progress = JobProgress(decoded=start)
        try:
            with open_inside(body.path, video_roots(self.cfg)) as readable:  # checked again on every attempt
                source = self.process_video(readable, start, poison, body.max_frames, progress)
            if not progress.began:
                progress.decoded = frames_decoded_with_nothing_left(source, start)
            self.send(P.T.JOB_DONE, job=self.job, frames_decoded=progress.decoded, peak_rss=peak_rss())
        except TruncatedVideo as exc:
            log.warning("video_cut", reason=str(exc))
            if not progress.began and start == 0:  # not one frame decoded: a failed job, not an empty result
                self.send(P.T.JOB_FAILED, job=self.job, reason=user_reason(exc))
            else:
                self.send(P.T.JOB_DONE, job=self.job, frames_decoded=progress.decoded, warning=user_reason(exc),
                          peak_rss=peak_rss())
        except (VideoError, PathRefused) as exc:
            log.warning("job_failed", reason=str(exc))
            self.send(P.T.JOB_FAILED, job=self.job, reason=user_reason(exc))
        except JobStopped:
            log.info("job_stopped")
            self.send(P.T.JOB_FAILED, job=self.job, reason="cancelled")
        # not in a `finally`: a dying worker must keep its job and frame for the report
        self.job = None
        structlog.contextvars.unbind_contextvars("job_id")
        self.mark("ready")

    def process_video(self, readable: str, start: int, poison: dict[int, str], max_frames: Optional[int],
                      progress: "JobProgress") -> FrameSource:
        resume = self.resume
        first = resume.warm_from if resume else start
        started = False
        source = FrameSource(readable, first, self.cfg.jobs.max_video_pixels, on_skip=self.skip_reporter())
        for meta, index, pts, rgb in only_sampled(source, max_frames):
            if not started:
                self.send(P.T.VIDEO, job=self.job, meta=meta.as_dict())
                self.engine.begin_video(meta.width, meta.height, meta.fps)
                started = True
            if index < start and (resume is None or not resume.warms(index)):  # None: frames() starts at start
                continue
            self.mark("frame", index)
            if index in poison:
                self.send_frame(index, pts, [], error=poison[index])
            else:
                self.held_pts[index] = pts
                self.emit(self.infer_frame(index, pts, rgb))
            if index >= start:
                progress.began = True
                progress.decoded = index + 1
            self.serve_pending_images()
        if started:
            self.emit(self.engine.end_video())
        if source.seek_refused:
            self.log.info("resume_decoded_from_frame_0", start=first, reason=source.seek_refused)
        return source

    def skip_reporter(self) -> SkipReporter:
        every_s = min(SKIP_REPORT_MAX_S, float(self.cfg.deadlines.frame_s) / 4)
        return SkipReporter(lambda meta: self.send(P.T.VIDEO, job=self.job, meta=meta.as_dict()), every_s)

    def infer_frame(self, index: int, pts: float, rgb: np.ndarray) -> list[FrameOut]:
        try:
            return self.engine.push(index, pts, rgb)
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise self.dying_from(exc, during_load=False) from None
        # CUDA OOM is recoverable: flush the cache, say so, retry this frame once
        self.send(P.T.INCIDENT, job=self.job, cause="cuda_oom", stage="frame", frame=index,
                  outcome="cache flushed, frame retried", message="CUDA out of memory")
        free_cuda_cache()
        try:
            return self.engine.push(index, pts, rgb)
        except Exception as exc:
            raise self.dying_from(exc, during_load=False) from None

    def emit(self, outs: list[FrameOut]) -> None:
        """Frames the engine made final, each with its own pts (an engine with lag emits a frame
        after later ones were pushed). Warm-up frames of a resumed job are kept, not sent."""
        for out in outs:
            pts = self.held_pts.pop(out.index, None)
            if self.resume is None:
                self.send_frame(out.index, pts, out.persons)
            elif out.index < self.resume.start:
                self.resume.keep_warm(out.index, out.persons)
                self.send(P.T.WARMED, job=self.job, index=out.index, warm_from=self.resume.warm_from,
                          start=self.resume.start)
            else:
                self.send_frame(out.index, pts, self.resume.rename(out.persons))

    def send_frame(self, index: int, pts: Optional[float], persons: list, error: Optional[str] = None) -> None:
        self.send(P.T.FRAME, job=self.job, index=index, pts=pts, persons=finite(persons), error=error)

    # --- images -----------------------------------------------------------------------------------
    def serve_pending_images(self) -> None:
        """Between two frames of a video: answer single-image requests (their own model state),
        arm faults, and stop the job if the supervisor cancelled it."""
        while self.sock.poll(0):
            received = self.receive()
            if received is None:
                continue
            env, body = received
            if isinstance(body, P.StopJob) and env.job == self.job:
                raise JobStopped(self.job)
            if isinstance(body, (P.RunImage, P.ArmFault)):
                self.handle(env, body)

    def run_image(self, env: P.Envelope) -> None:
        started = time.monotonic()
        try:
            image = decode_for_engine(P.blob_bytes(env.blobs[0]), self.cfg.gateway.max_image_pixels,
                                      int(self.cfg.engine.image_max_side))
        except ValueError as exc:
            # req belongs on the envelope (send() would put it in the body, and the reply would be lost)
            self.sock.send_multipart(P.pack(P.Envelope(P.T.IMAGE_DONE, {"error": str(exc), "code": 400},
                                                       gen=self.generation, req=env.req)))
            return
        try:
            persons = to_original(self.engine.infer_image(image.rgb), image)
        except Exception as exc:
            raise self.dying_from(exc, during_load=False) from None
        body = {"persons": finite(persons), "width": image.width, "height": image.height,
                "engine": self.engine.describe(), "joint_names": self.engine.joint_names,
                "ms": round((time.monotonic() - started) * 1000, 2)}
        env_out = P.Envelope(P.T.IMAGE_DONE, body, gen=self.generation, req=env.req)
        self.sock.send_multipart(P.pack(env_out))

    # --- dying ------------------------------------------------------------------------------------
    def dying_from(self, exc: BaseException, during_load: bool) -> Dying:
        cause, code = classify(exc, during_load)
        detail = {"exc_type": type(exc).__name__, "message": str(exc)[:2000],
                  "traceback": traceback.format_exc()[-4000:], "error_code": getattr(exc, "error_code", None)}
        return Dying(cause, code, detail)

    def die(self, dying: Dying) -> int:
        self.log.error("worker_dying", cause=dying.cause, stage=self.stage, frame=self.frame,
                       job_id=self.job, message=dying.detail.get("message"))
        self.send(P.T.DYING, job=self.job, cause=dying.cause, stage=self.stage, frame=self.frame, **dying.detail)
        self.sock.setsockopt(zmq.LINGER, 2000)  # let the report leave before we do
        self.sock.close()
        return dying.code


def frames_decoded_with_nothing_left(source: FrameSource, start: int) -> int:
    """No frame at or after `start` was run. A video that decoded (frames before `start`) ends
    there, or the job's sample ends there: every frame of the job is stored and it is done, with
    the frames up to where the video ended (fewer than `start` only if the file was cut since).
    Not one frame decoded: the video cannot be decoded."""
    if source.end == 0:
        raise VideoError(f"no frame at or after {start}")
    return min(start, source.end)


def only_sampled(decoded, max_frames: Optional[int]):
    """With max_frames, only the frames the supervisor expects (spread evenly, pose_common.sampling);
    when the container does not say how long it is, the first max_frames."""
    selected: Optional[set[int]] = None
    for meta, index, pts, rgb in decoded:
        if max_frames and selected is None and meta.frame_count:
            selected = set(sampled_indices(meta.frame_count, max_frames))
        if max_frames and selected is None and index >= max_frames:
            return
        if selected is None or index in selected:
            yield meta, index, pts, rgb


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _delta(after: Optional[int], before: Optional[int]) -> Optional[int]:
    return None if after is None or before is None else after - before


def volunteer_for_oom_killer(score: int = 500) -> None:
    """If memory runs out, the kernel should take the worker (which the supervisor restarts),
    not the supervisor or the gateway. Raising one's own score needs no privilege."""
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write(str(score))
    except OSError:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--rung", required=True, help="JSON {engine, device, options}")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    if not die_with_parent(args.parent_pid):
        return exitcodes.EX_ORPHANED
    faulthandler.enable(file=sys.stderr, all_threads=True)  # SIGSEGV/SIGABRT/SIGBUS dump stacks
    volunteer_for_oom_killer()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(exitcodes.EX_OK))
    cfg = read_config(args.config)
    code = Worker(cfg, args.generation, json.loads(args.rung), args.parent_pid).run()
    sys.stderr.flush()
    os._exit(code)
