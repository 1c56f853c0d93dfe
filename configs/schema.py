"""Typed configuration schema. Values live in pose_service.yaml; any key can be overridden
on the command line (`gateway.port=5123 "jobs.allowed_roots=[/data]"`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    # how long an HTTP handler waits for the supervisor before answering 503
    supervisor_timeout_s: float = 0.8
    max_upload_mb: int = 4096
    # JSON/multipart bodies of /pose/hybrid carry whole images as base64
    max_json_mb: int = 64
    # when set (here, in $POSE_SERVICE_TOKEN, or in auth_token_file), every route but /health and
    # /v1/health needs `Authorization: Bearer <token>`; binding beyond loopback requires one
    auth_token: Optional[str] = None
    auth_token_file: Optional[str] = None
    # Host names served besides loopback names and IP literals (a web page's DNS rebinding sends its
    # own name); "*" turns the check off. The backend's docker-compose name is the default
    allowed_hosts: list[str] = field(default_factory=lambda: ["pose-service"])
    # web origins allowed to call the service from a browser (CORS); the Node backend needs none
    allowed_origins: list[str] = field(default_factory=list)
    # an image declaring more pixels than this is refused (413) from its header, before decoding
    max_image_pixels: int = 50_000_000
    # a connection idle (or still sending its request's head) this long is closed
    idle_timeout_s: float = 15.0
    # a request body that sends nothing for this long ends in 408
    body_timeout_s: float = 30.0
    # ... and a body still arriving this long after its request's head ends in 408 (body_deadline) ...
    body_deadline_s: float = 3600.0
    # ... as does one arriving slower than this on average, judged once it has had body_rate_grace_s
    # (body_too_slow; 0 = no minimum rate). Close to the connection limit, slow bodies are cut first
    body_min_bytes_per_s: int = 16384
    body_rate_grace_s: float = 10.0
    # a multipart body may have at most this many parts (413 too_many_parts) ...
    max_form_parts: int = 32
    # ... and what is held in memory of it, every part but the uploaded video (streamed to disk under
    # max_upload_mb) - form fields, /pose/hybrid's image - at most this much together (413 too_large)
    max_form_memory_mb: int = 8
    # open connections beyond this are answered 503 and closed; above evict_idle_above x this many,
    # each new connection first closes the oldest one left idle after an answer (past max_connections,
    # one that never sent anything); a connection whose request arrived is never closed unanswered
    max_connections: int = 256
    evict_idle_above: float = 0.75
    # POST /process_video (synchronous) waits this long for the job, then answers 504 with its id
    sync_timeout_s: float = 3600.0
    # GET /warmup waits this long for the models (the backend gives up after 120 s)
    warmup_timeout_s: float = 110.0
    # POST /process_video: a result of at most this many frames carries each frame's overlay as a JPEG
    # (frames[i].image_base64, the app's carousel); a longer one leaves it out and says so
    inline_frame_images_max: int = 30


@dataclass
class JobsConfig:
    allowed_roots: list[str] = field(default_factory=list)
    # a frame that kills the worker this many times is recorded as failed and skipped
    poison_frame_deaths: int = 2
    queue_max: int = 100
    # a job whose worker died this many times in total ends in error
    max_attempts: int = 20
    map_windows_paths: bool = True
    # draw the poses on the video after each job (the legacy API's output_path)
    render_overlay: bool = True
    # ... drawn by an overlay process started ahead of need and waiting past its imports, so its start
    # does not compete with a job's first frames (false: one is started when the job reaches a worker)
    overlay_standby: bool = True
    # finished jobs' files (upload, result, overlay) are removed after this long (0 = never) ...
    keep_finished_s: float = 30 * 86400.0
    # ... and, oldest first, while all of them together are larger than this (0 = no limit)
    keep_max_mb: int = 20_000
    # how often the supervisor looks for jobs to remove
    retention_sweep_s: float = 300.0
    # an upload is refused (507) when it would leave less free space than this in storage_dir
    min_free_mb: int = 1024
    # a video whose frames declare more pixels than this is refused (413) before a frame is decoded
    max_video_pixels: int = 40_000_000


@dataclass
class SupervisorConfig:
    # Liveness counts the worker's run time: wall time less the time its threads waited for a CPU
    # (Linux schedstat), so a machine under load makes the worker slow, never "hung".
    # No heartbeat for heartbeat_s x liveness_misses of run time is a hang ...
    heartbeat_s: float = 1.0
    liveness_misses: int = 3
    # ... unless the worker used the CPU for at least this fraction of that time (native code holding
    # the GIL starves the heartbeat thread): then only its progress deadline judges it, or, in a
    # state without one, busy_silence_s of run time
    busy_cpu_fraction: float = 0.5
    busy_silence_s: float = 60.0
    # after SIGABRT (faulthandler dump) wait this long before SIGKILL
    abort_grace_s: float = 3.0
    # a worker asked to stop (reload, cancel, shutdown) that is still alive after this is SIGKILLed
    stop_grace_s: float = 10.0
    # a worker (or probe) still alive this long after our SIGKILL (uninterruptible sleep in a driver) is
    # abandoned: its job goes back to the queue (charged, cause `unkillable`), a new worker starts
    unkillable_after_s: float = 30.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # `intensity` GPU-class deaths within `period_s` -> next rung of the ladder (or fatal on the last)
    intensity: int = 3
    period_s: float = 60.0
    # while fatal, try to revive every fatal_retry_s (0 = never)
    fatal_retry_s: float = 300.0
    # on a lower rung, probe the rung above every step_up_after_s (0 = never)
    step_up_after_s: float = 600.0
    stderr_tail_lines: int = 40
    tick_s: float = 0.1
    # per-generation files (stderr, breadcrumb) of this many recent worker generations are kept
    keep_generations: int = 20


@dataclass
class DeadlinesConfig:
    stage_default_s: float = 300.0
    stages: dict[str, float] = field(default_factory=lambda: {"runtime": 120.0})
    # a job's first frames (and the first after a load) may take this long
    frame_s: float = 60.0
    # after frame_warmup frames, a frame is overdue at max(frame_floor_s, frame_factor x the
    # median of the worker's recent per-frame times): a warm CPU worker's hang shows in seconds
    frame_warmup: int = 5
    frame_floor_s: float = 3.0
    frame_factor: float = 20.0
    # from spawn to the worker's first message
    hello_s: float = 60.0
    probe_s: float = 600.0
    image_s: float = 60.0


@dataclass
class RungConfig:
    engine: str = "mediapipe"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineConfig:
    name: str = "mediapipe"
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    # a single image (/pose/hybrid) is reduced to this longest side before the engine and its second
    # pass see it (a JPEG is decoded reduced); coordinates are mapped back to the original's pixels
    image_max_side: int = 1920


@dataclass
class AnglesConfig:
    # a joint angle is computed only from joints seen at least this well (visibility 0..1); below it
    # the angle is null (legacy joint_angles_3d / jointAngles, the report's plot), never a guess
    min_visibility: float = 0.5


@dataclass
class FaultConfig:
    kind: Optional[str] = None
    # "frame:N", "stage:NAME" or "start"
    at: Optional[str] = None
    # null = every time; N = at most N firings across worker restarts
    times: Optional[int] = None
    # engine under the fault wrapper when engine.name=fault
    base: str = "mediapipe"
    hang_s: float = 3600.0


@dataclass
class ProbeConfig:
    # run the engine's detector stage in a throw-away process before the worker commits to it
    enabled: bool = True


@dataclass
class LedgerConfig:
    # unset: SQLite in state_dir (one machine); postgresql://user@host/db: one database shared by
    # every daemon of a deployment (see docs/many-hosts.md)
    url: Optional[str] = None
    # a claimed job's lease, renewed every lease_s/3: a dead host's job is taken over after this
    lease_s: float = 15.0


@dataclass
class Config:
    state_dir: str = "~/.local/state/pose-service"
    runtime_dir: str = ""  # default <state_dir>/run
    # uploads/ and results/ (with overlays) live here; default state_dir. With a shared ledger it
    # must be shared storage (NFS/SMB) mounted at the same path on every host
    storage_dir: str = ""
    log_level: str = "info"
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    deadlines: DeadlinesConfig = field(default_factory=DeadlinesConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # empty: a single rung made of `engine`; otherwise tried top to bottom
    ladder: list[RungConfig] = field(default_factory=list)
    fault: FaultConfig = field(default_factory=FaultConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    angles: AnglesConfig = field(default_factory=AnglesConfig)
