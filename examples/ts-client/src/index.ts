// Typed client for the pose-service native HTTP API (/v1). Node >= 18 (global fetch, FormData,
// Blob, AbortSignal.timeout); no runtime dependencies. Works in browsers too.

export type JobState = "queued" | "running" | "done" | "error";

/** Timestamps are passed through as the server reports them. */
export type Timestamp = number | string;

export interface JobStatus {
  job_id: string;
  status: JobState;
  frames_done: number;
  frames_total: number | null;
  attempts: number;
  error: string | null;
  created_at: Timestamp | null;
  started_at: Timestamp | null;
  finished_at: Timestamp | null;
  [extra: string]: unknown;
}

/** 202 answer of POST /v1/jobs. */
export interface SubmitResponse {
  job_id: string;
  status: JobState;
  [extra: string]: unknown;
}

export type Vec2Conf = [x: number, y: number, conf: number];
export type Vec3 = [x: number, y: number, z: number];

export interface SmplParams {
  global_orient?: number[] | number[][] | number[][][];
  body_pose?: number[] | number[][] | number[][][];
  betas?: number[];
  [extra: string]: unknown;
}

export interface Camera {
  tx?: number;
  ty?: number;
  tz?: number;
  focal_length?: number;
  [extra: string]: unknown;
}

export interface Person {
  track_id: number | string;
  score: number;
  bbox_xyxy: [number, number, number, number];
  keypoints_2d: Vec2Conf[];
  keypoints_3d: Vec3[];
  /** Present only for SMPL engines (hmr2_phalp). */
  smpl?: SmplParams;
  camera?: Camera;
  /** 6890 x 3, metres, SMPL engines only. */
  vertices?: Vec3[];
}

export interface Frame {
  frame_index: number;
  pts_s: number;
  /** Empty when nobody was found; the frame itself is always present. */
  persons: Person[];
  error?: string;
}

export interface VideoInfo {
  fps: number;
  frame_count: number;
  width: number;
  height: number;
  duration_s: number;
  rotation: number;
}

export interface EngineInfo {
  name: string;
  version: string;
  device: string;
}

export interface NativeResult {
  job_id: string;
  video: VideoInfo;
  engine: EngineInfo;
  joint_names: string[];
  frames: Frame[];
  /** Counts over the whole result (frames with a person, tracks, ...). */
  summary: Record<string, unknown>;
  /** Set when the video was cut or damaged, or frames were skipped. */
  warning?: string;
}

export type HealthState = "ready" | "degraded" | "loading" | "fatal" | "unavailable";

export interface HealthResponse {
  status: HealthState;
  [extra: string]: unknown;
}

/** Every error the service answers: a reason for people and a stable machine word. */
export interface ErrorBody {
  error: string;
  /** e.g. "unauthorized", "host_not_allowed", "origin_not_allowed", "outside_roots", "not_found",
   * "image_too_large", "video_too_large", "queue_full", "unavailable". */
  code: string;
  [extra: string]: unknown;
}

/**
 * A non-2xx answer (`status` = HTTP status, `message` = its JSON `error`, `code` = its machine
 * word), a network failure or timeout (`status` 0), or a job that ended in error (`status` 0,
 * `job` set).
 */
export class PoseServiceError extends Error {
  readonly status: number;
  readonly code?: string;
  readonly body: unknown;
  readonly job?: JobStatus;

  constructor(status: number, message: string, body?: unknown, job?: JobStatus) {
    super(message);
    this.name = "PoseServiceError";
    this.status = status;
    this.code = isErrorBody(body) ? body.code : undefined;
    this.body = body;
    this.job = job;
  }
}

function isErrorBody(body: unknown): body is ErrorBody {
  return (
    typeof body === "object" &&
    body !== null &&
    typeof (body as { error?: unknown }).error === "string" &&
    typeof (body as { code?: unknown }).code === "string"
  );
}

export interface WaitOptions {
  onProgress?: (status: JobStatus) => void;
  pollMs?: number;
  /** Overall deadline; no deadline when omitted. */
  timeoutMs?: number;
}

export interface ClientOptions {
  /**
   * The daemon's gateway.auth_token, sent as `Authorization: Bearer <token>` on every request.
   * Defaults to the POSE_SERVICE_TOKEN environment variable; leave both unset when the daemon has
   * no token (it listens on loopback only).
   */
  token?: string;
  /** Per-request timeout for small calls (status, health, submit by path). */
  requestTimeoutMs?: number;
  /** Timeout for uploads and result downloads. */
  transferTimeoutMs?: number;
}

function env(name: string): string | undefined {
  // Read through globalThis so this file needs no Node type definitions.
  const proc = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return proc?.env?.[name];
}

function defaultBaseUrl(): string {
  return env("POSE_SERVICE_URL") ?? "http://localhost:5000";
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export class PoseServiceClient {
  readonly baseUrl: string;
  private readonly requestTimeoutMs: number;
  private readonly transferTimeoutMs: number;
  private readonly authorization: Record<string, string>;

  constructor(baseUrl: string = defaultBaseUrl(), options: ClientOptions = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    const token = options.token ?? env("POSE_SERVICE_TOKEN");
    this.authorization = token ? { Authorization: `Bearer ${token}` } : {};
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.transferTimeoutMs = options.transferTimeoutMs ?? 600_000;
  }

  /** Submit a video the daemon can read itself (must be under its jobs.allowed_roots). */
  submitPath(videoPath: string, idempotencyKey?: string): Promise<SubmitResponse> {
    const body: Record<string, string> = { video_path: videoPath };
    const headers: Record<string, string> = { "Content-Type": "application/json" };
    if (idempotencyKey) {
      body.idempotency_key = idempotencyKey;
      headers["Idempotency-Key"] = idempotencyKey;
    }
    return this.request<SubmitResponse>("POST", "/v1/jobs", {
      body: JSON.stringify(body),
      headers,
    });
  }

  /**
   * Upload a video as multipart field "video". A Node Buffer is a Uint8Array and is accepted
   * (it is copied once); pass a Blob (e.g. `await fs.openAsBlob(path)`) to avoid buffering.
   */
  submitUpload(file: Blob | Uint8Array, filename: string, idempotencyKey?: string): Promise<SubmitResponse> {
    const blob = file instanceof Blob ? file : new Blob([new Uint8Array(file)], { type: "video/mp4" });
    const form = new FormData();
    form.append("video", blob, filename);
    const headers: Record<string, string> = {};
    if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
    return this.request<SubmitResponse>("POST", "/v1/jobs", {
      body: form,
      headers,
      timeoutMs: this.transferTimeoutMs,
    });
  }

  status(jobId: string): Promise<JobStatus> {
    return this.request<JobStatus>("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
  }

  /** The finished result; a job not yet done answers 409 (PoseServiceError.status === 409). */
  result(jobId: string): Promise<NativeResult> {
    return this.request<NativeResult>("GET", `/v1/jobs/${encodeURIComponent(jobId)}/result`, {
      timeoutMs: this.transferTimeoutMs,
    });
  }

  /** Poll status until done (then fetch the result) or error (then throw). */
  async waitForResult(jobId: string, options: WaitOptions = {}): Promise<NativeResult> {
    const pollMs = options.pollMs ?? 1000;
    const deadline = options.timeoutMs === undefined ? Infinity : Date.now() + options.timeoutMs;
    for (;;) {
      let st: JobStatus | undefined;
      try {
        st = await this.status(jobId);
      } catch (err) {
        // 503 (supervisor restarting) and network blips are transient: the job is in the ledger.
        if (!(err instanceof PoseServiceError) || !(err.status === 0 || err.status === 503)) throw err;
      }
      if (st) {
        options.onProgress?.(st);
        if (st.status === "done") return this.result(jobId);
        if (st.status === "error") {
          throw new PoseServiceError(0, `job ${jobId} failed: ${st.error ?? "unknown error"}`, st, st);
        }
      }
      if (Date.now() + pollMs > deadline) {
        throw new PoseServiceError(0, `timed out waiting for job ${jobId}`, st);
      }
      await sleep(pollMs);
    }
  }

  health(): Promise<HealthResponse> {
    // /v1/health answers 503 with a JSON body when the supervisor is unavailable: return it.
    return this.request<HealthResponse>("GET", "/v1/health", { acceptStatus: [503] });
  }

  private async request<T>(
    method: string,
    path: string,
    init: {
      body?: string | FormData;
      headers?: Record<string, string>;
      timeoutMs?: number;
      acceptStatus?: number[];
    } = {},
  ): Promise<T> {
    let res: Response;
    try {
      res = await fetch(this.baseUrl + path, {
        method,
        body: init.body,
        headers: { Accept: "application/json", ...this.authorization, ...init.headers },
        signal: AbortSignal.timeout(init.timeoutMs ?? this.requestTimeoutMs),
      });
    } catch (err) {
      const e = err as { name?: string; message?: string; cause?: { code?: string; message?: string } };
      const cause = e.cause?.code ?? e.cause?.message;
      const what = e.name === "TimeoutError" ? "timeout" : `${e.message ?? String(err)}${cause ? ` (${cause})` : ""}`;
      throw new PoseServiceError(0, `${method} ${path}: ${what}`);
    }
    const text = await res.text();
    let body: unknown = undefined;
    try {
      body = text ? JSON.parse(text) : undefined;
    } catch {
      body = text;
    }
    if (res.ok || init.acceptStatus?.includes(res.status)) {
      if (body === undefined || typeof body !== "object") {
        throw new PoseServiceError(res.status, `${method} ${path}: expected JSON, got ${text.slice(0, 200)}`, body);
      }
      return body as T;
    }
    const msg =
      body && typeof body === "object" && typeof (body as { error?: unknown }).error === "string"
        ? (body as { error: string }).error
        : `HTTP ${res.status}`;
    throw new PoseServiceError(res.status, msg, body);
  }
}
