"""The wire protocol: the only module that defines messages between gateway, supervisor and worker.

Every message is a ZeroMQ multipart: [msgpack header, *binary parts]. The header is an envelope
{v, type, seq, gen, job, req, body}. Large binaries (images, frames) travel as their own parts so
they are never copied into msgpack. Sockets: ROUTER on the supervisor, DEALER on the others.

RUN_JOB (supervisor -> worker) body: path, start_frame (the first frame not stored), max_frames,
poison ({frame: reason} recorded as failed, not run), and for a job resumed after a worker death
(supervisor/resume.py): warm_from (the first frame to re-run, not stored again, to warm the
tracker), stored_tracks ({frame: [[track_id, x0, y0, x1, y1], ...]} of the stored frames from
warm_from up to start_frame) and next_track_id (above every track id the job has stored): the
worker maps its new tracks onto the stored ids (gpu_worker/track_ids.py).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Sequence, TypeVar

import msgpack
import msgspec
import zmq
from msgspec import Meta

from pose_common import faults
from pose_common.runtime import RuntimeDir

PROTOCOL_VERSION = 1

# Limits on what a peer may make us allocate.
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_BLOB_BYTES = 256 * 1024 * 1024
MAX_PARTS = 8

SocketT = TypeVar("SocketT", bound=zmq.Socket)  # a sync or an asyncio socket: connect_dealer returns its context's kind


class T:
    """Message types. Values are short strings so a capture stays readable."""

    # gateway/CLI -> supervisor (requests, answered with REPLY carrying the same req id)
    SUBMIT = "submit"
    STATUS = "status"
    HEALTH = "health"
    DIAGNOSTICS = "diagnostics"
    METRICS = "metrics"
    IMAGE = "image"
    DRILL = "drill"
    RELOAD = "reload"
    CANCEL = "cancel"
    REPLY = "reply"
    # worker -> supervisor
    HELLO = "hello"
    HEARTBEAT = "hb"
    STAGE = "stage"
    READY = "ready"
    VIDEO = "video"
    FRAME = "frame"
    WARMED = "warmed"   # a resumed job's warm-up frame went through the engine (kept, not stored)
    JOB_DONE = "job_done"
    JOB_FAILED = "job_failed"
    INCIDENT = "incident"
    DYING = "dying"
    IMAGE_DONE = "image_done"
    # supervisor -> worker
    RUN_JOB = "run_job"
    RUN_IMAGE = "run_image"
    ARM_FAULT = "arm_fault"
    STOP_JOB = "stop_job"   # cancel: stop the job between two frames, keep the engine loaded


REQUESTS = frozenset({T.SUBMIT, T.STATUS, T.HEALTH, T.DIAGNOSTICS, T.METRICS, T.IMAGE, T.DRILL, T.RELOAD, T.CANCEL})
WORKER_MESSAGES = frozenset({T.HELLO, T.HEARTBEAT, T.STAGE, T.READY, T.VIDEO, T.FRAME, T.WARMED, T.JOB_DONE,
                             T.JOB_FAILED, T.INCIDENT, T.DYING, T.IMAGE_DONE})
TO_WORKER = frozenset({T.RUN_JOB, T.RUN_IMAGE, T.ARM_FAULT, T.STOP_JOB})


class ProtocolError(ValueError):
    """A message we refuse to interpret; receivers count it and carry on."""


@dataclass
class Envelope:
    type: str
    body: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    gen: Optional[int] = None
    job: Optional[str] = None
    req: Optional[str] = None
    blobs: list[Any] = field(default_factory=list)
    status: Optional[int] = None  # replies only: the HTTP-like status, beside the body, never in it


_seq = itertools.count(1)


def pack(env: Envelope) -> list[Any]:
    header = {
        "v": PROTOCOL_VERSION,
        "type": env.type,
        "seq": env.seq or next(_seq),
        "gen": env.gen,
        "job": env.job,
        "req": env.req,
        "body": env.body,
    }
    if env.status is not None:
        header["status"] = env.status
    return [msgpack.packb(header, use_bin_type=True), *env.blobs]


def unpack(parts: Sequence[Any]) -> Envelope:
    """Decode [header, *blobs]; raise ProtocolError on anything malformed or oversized."""
    if not parts or len(parts) > 1 + MAX_PARTS:
        raise ProtocolError(f"bad part count {len(parts)}")
    raw = _as_bytes(parts[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("header too large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable header: {type(exc).__name__}") from None
    if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("not a pose-service envelope")
    kind, body = header.get("type"), header.get("body")
    if not isinstance(kind, str) or not isinstance(body, dict):
        raise ProtocolError("envelope without type/body")
    blobs = list(parts[1:])
    if any(len(_as_bytes(b)) > MAX_BLOB_BYTES for b in blobs):
        raise ProtocolError("blob too large")
    return Envelope(
        type=kind,
        body=body,
        seq=_int_or_none(header.get("seq")) or 0,
        gen=_int_or_none(header.get("gen")),
        job=_str_or_none(header.get("job")),
        req=_str_or_none(header.get("req")),
        blobs=blobs,
        status=_int_or_none(header.get("status")),
    )


# --- bodies -----------------------------------------------------------------------------------
# Every body a receiver acts on is checked against its schema first (types, ranges, enums); a body
# that does not fit is a ProtocolError, which receivers drop and count. Unknown fields are ignored,
# so a newer peer may add fields without breaking an older one.

Name = Annotated[str, Meta(min_length=1, max_length=128)]
Path = Annotated[str, Meta(min_length=1, max_length=4096)]
Text = Annotated[str, Meta(max_length=65536)]
Count = Annotated[int, Meta(ge=0)]


class Body(msgspec.Struct, kw_only=True):
    pass


class Request(Body, kw_only=True):
    deadline: Optional[float] = None  # wall-clock time after which the caller no longer waits


class Submit(Request, kw_only=True):
    video_path: Path
    source: Literal["path", "upload", "cli"] = "path"
    idempotency_key: Optional[Annotated[str, Meta(min_length=1, max_length=256)]] = None
    max_frames: Optional[Annotated[int, Meta(ge=1, le=1_000_000)]] = None  # sample this many, evenly


class JobRef(Request, kw_only=True):
    job_id: Name


class ImageRequest(Request, kw_only=True):
    timeout_s: Optional[Annotated[float, Meta(gt=0, le=3600)]] = None


class DrillRequest(Request, kw_only=True):
    fault: faults.FaultKind
    at: str = "frame:0"

    def __post_init__(self) -> None:
        faults.check(self.fault, self.at)


class Hello(Body, kw_only=True):
    pid: int
    rung: dict = {}


class Heartbeat(Body, kw_only=True):
    rss: Optional[int] = None


class StageEvent(Body, kw_only=True):
    name: Name
    event: Literal["start", "end"]
    duration_s: Optional[float] = None
    rss_delta: Optional[int] = None
    gpu_delta: Optional[int] = None


class Ready(Body, kw_only=True):
    engine: dict
    joint_names: list[str] = []
    mesh_faces: Optional[list[list[int]]] = None
    stages: list[Name] = []


class VideoMeta(Body, kw_only=True):
    fps: float
    frame_count: Count
    width: Count
    height: Count
    duration_s: float
    rotation: int
    codec: str


class VideoFound(Body, kw_only=True):
    meta: VideoMeta


class Frame(Body, kw_only=True):
    index: Count
    pts: Optional[float] = None
    persons: list[dict] = []
    error: Optional[Text] = None


class Warmed(Body, kw_only=True):
    """A resumed job re-runs the stored frames [warm_from, start) to warm the tracker; none is stored
    again, so without this the job would look stalled for their whole run."""
    index: Count
    warm_from: Count
    start: Count


class JobDone(Body, kw_only=True):
    frames_decoded: Count
    warning: Optional[Text] = None
    peak_rss: Optional[int] = None


class JobFailed(Body, kw_only=True):
    reason: Text = "failed"


class Incident(Body, kw_only=True):
    cause: Name
    stage: Optional[Name] = None
    frame: Optional[Count] = None
    outcome: Text = ""
    message: Text = ""


class DyingReport(Body, kw_only=True):
    cause: Name
    stage: Optional[Name] = None
    frame: Optional[Count] = None
    exc_type: Optional[Name] = None
    message: Optional[Text] = None
    traceback: Optional[Text] = None
    error_code: Optional[int] = None


class ImageDone(Body, kw_only=True):
    persons: list[dict] = []
    width: Optional[Count] = None
    height: Optional[Count] = None
    engine: dict = {}
    joint_names: list[str] = []
    ms: Optional[float] = None
    error: Optional[Text] = None
    code: Optional[Annotated[int, Meta(ge=400, le=599)]] = None


# --- supervisor -> worker ---------------------------------------------------------------------
class RunJob(Body, kw_only=True):
    path: Path
    start_frame: Count = 0
    max_frames: Optional[Annotated[int, Meta(ge=1, le=1_000_000)]] = None
    poison: dict[str, Text] = {}              # frame index -> why it is skipped (it killed workers)
    # resuming: frames from warm_from re-run to warm the tracker, ids mapped onto the stored ones
    warm_from: Optional[Count] = None
    stored_tracks: dict[str, list[list[float]]] = {}
    next_track_id: Optional[Count] = None


class RunImage(Body, kw_only=True):
    pass


class ArmFault(Body, kw_only=True):
    fault: faults.FaultKind
    at: str = "frame:0"
    times: Optional[Annotated[int, Meta(ge=1)]] = 1
    hang_s: Annotated[float, Meta(gt=0)] = 3600.0

    def __post_init__(self) -> None:
        faults.check(self.fault, self.at)


class StopJob(Body, kw_only=True):
    pass


SCHEMAS: dict[str, type[Body]] = {
    T.SUBMIT: Submit, T.STATUS: JobRef, T.CANCEL: JobRef, T.HEALTH: Request, T.DIAGNOSTICS: Request,
    T.METRICS: Request, T.RELOAD: Request, T.IMAGE: ImageRequest, T.DRILL: DrillRequest,
    T.HELLO: Hello, T.HEARTBEAT: Heartbeat, T.STAGE: StageEvent, T.READY: Ready, T.VIDEO: VideoFound,
    T.FRAME: Frame, T.WARMED: Warmed, T.JOB_DONE: JobDone, T.JOB_FAILED: JobFailed, T.INCIDENT: Incident,
    T.DYING: DyingReport, T.IMAGE_DONE: ImageDone,
    T.RUN_JOB: RunJob, T.RUN_IMAGE: RunImage, T.ARM_FAULT: ArmFault, T.STOP_JOB: StopJob,
}


def parse(env: Envelope) -> Body:
    """The envelope's body checked against its type's schema, or ProtocolError saying what is wrong."""
    schema = SCHEMAS.get(env.type)
    if schema is None:
        raise ProtocolError(f"unknown message type {env.type[:40]!r}")
    try:
        return msgspec.convert(env.body, schema, strict=False)
    except (msgspec.ValidationError, faults.BadFault) as exc:
        raise ProtocolError(f"{env.type}: {exc}") from None


def reply(request: Envelope, status: int = 200, /, **body: Any) -> Envelope:
    return Envelope(type=T.REPLY, req=request.req, job=request.job, body=body, status=status)


def _as_bytes(part: Any) -> bytes | bytearray | memoryview:
    if isinstance(part, (bytes, bytearray, memoryview)):
        return part
    if isinstance(part, zmq.Frame):
        return part.buffer
    raise ProtocolError(f"unexpected part type {type(part).__name__}")


def _int_or_none(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def blob_bytes(part: Any) -> bytes:
    return bytes(_as_bytes(part))


# --- sockets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoints:
    gateway: str
    worker: str


def endpoints(runtime_dir: str) -> Endpoints:
    layout = RuntimeDir(runtime_dir)
    return Endpoints(gateway=f"ipc://{layout.supervisor_socket}", worker=f"ipc://{layout.worker_socket}")


def bind_router(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_BLOB_BYTES)
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket file from a dead supervisor
    sock.bind(endpoint)
    return sock


def connect_dealer(ctx: zmq.Context[SocketT], endpoint: str, identity: Optional[str] = None) -> SocketT:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # don't queue messages for a supervisor that isn't there: sending fails at once instead
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_BLOB_BYTES)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.connect(endpoint)
    return sock


def worker_identity(generation: int, channel: str = "main") -> bytes:
    return f"w{generation}:{channel}".encode()


def generation_of(identity: bytes) -> Optional[int]:
    try:
        text = identity.decode()
        if text.startswith("w") and ":" in text:
            return int(text[1:text.index(":")])
    except (UnicodeDecodeError, ValueError):
        pass
    return None

