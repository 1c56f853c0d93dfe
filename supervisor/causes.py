"""One function that decides how a worker (or probe) ended: exit status, who sent the signal,
what the worker reported before dying, its last breadcrumb and stderr tail, and memory at death."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Optional

from pose_common import exitcodes

WSL_EXIT_CODES = frozenset({255, -1, 4294967295})

REMEDIES = {
    "segfault": "A native extension crashed (torch/CUDA/detectron2/mediapipe). Restarted; if it repeats at the "
                "same stage, run `pose-service diagnose` and check driver/CUDA/torch versions match.",
    "abort": "A native library aborted (often a CUDA allocator assert after a GPU reset). Restarted; if it repeats, "
             "check `dmesg`/dxg messages and the driver.",
    "bus_error": "Bus error: usually a truncated or memory-mapped file changed underneath. "
                 "Run `pose-service models verify`.",
    "oom_killed": "Killed by SIGKILL we did not send: most likely the kernel OOM killer. Give the machine/WSL VM more "
                  "memory (.wslconfig memory=, swap=) or use a lighter detector (engine options detector=regnety).",
    "wsl_vm_exit": "Exit 4294967295/-1/255 is how a failing WSL VM (Wsl/Service/E_UNEXPECTED) looks. Raise memory and "
                   "swap in %UserProfile%\\.wslconfig, run `wsl --shutdown` from Windows, then restart the service.",
    "python_exception": "The engine raised an exception (traceback in the crash report). Restarted and resumed.",
    "cuda_oom": "CUDA out of memory. Use a lighter detector (detector=regnety), close other GPU programs, or step "
                "down to the CPU rung.",
    "cuda_sticky": "Sticky CUDA error (illegal memory access class): the CUDA context was poisoned, so the worker "
                   "exited on purpose and was restarted. Repeats point at a driver/hardware or kernel bug.",
    "hang": "No heartbeat or no progress within the deadline: stacks were dumped (SIGABRT, faulthandler) into the "
            "stderr tail, then the worker was killed. Under WSL, a hang in CUDA init means the dxg driver is wedged: "
            "`wsl --shutdown`.",
    "load_failure": "The engine could not load (missing weights or package). Not retried: fix it and run "
                    "`pose-service models verify` / `pose-service diagnose`, then POST /reload.",
    "killed_by_us": "Stopped by the supervisor (shutdown or reload).",
    "unreachable": "The worker's socket stopped taking messages, so it could not be given work; it was "
                   "replaced. Repeats point at a wedged worker main thread (see the stderr tail).",
    "unkillable": "The worker outlived SIGKILL (uninterruptible sleep, usually inside a GPU driver call): it was "
                  "abandoned, its job given back to the queue and a new worker started. Check `dmesg` for driver "
                  "errors; under WSL a wedged dxg driver needs `wsl --shutdown`. The abandoned process is reaped "
                  "if it ever ends.",
    "clean_exit": "The worker exited on its own without reporting why.",
    "orphaned": "The worker saw its supervisor disappear and exited.",
    "signal": "Killed by a signal.",
    "exit": "Exited with an unexpected status.",
}

GPU_CLASS = frozenset({"segfault", "abort", "bus_error", "oom_killed", "wsl_vm_exit", "cuda_oom", "cuda_sticky", "hang",
                       "python_exception", "signal", "exit", "clean_exit", "unreachable", "unkillable"})


@dataclass
class Death:
    """Everything known about an ended process (or one abandoned: it outlived our SIGKILL)."""
    returncode: Optional[int]                # None: it never ended (abandoned)
    killed_by_us: Optional[str] = None       # "hang: ...", "shutdown", "reload" when we sent the signal
    reported: Optional[dict[str, Any]] = None  # the DYING message, if it arrived
    stage: Optional[str] = None
    stderr_tail: str = ""
    rss: Optional[int] = None
    system_memory: dict[str, Any] = field(default_factory=dict)
    unkillable_s: Optional[float] = None     # alive this long after our SIGKILL when it was abandoned


@dataclass
class Ending:
    """How a worker or probe ended, decoded, with what is known of where it was."""
    process: str                 # "worker" | "probe"
    cause: Cause
    death: Death
    generation: int
    rung: str
    frame: Optional[int] = None
    detail: dict[str, Any] = field(default_factory=dict)
    blames_job: bool = True      # False: the job on the worker did not cause it (a hung image did)


@dataclass
class Cause:
    kind: str
    summary: str
    remedy: str
    counts_toward_intensity: bool
    retry: bool
    signal: Optional[str] = None


def decode_exit(death: Death) -> Cause:
    kind, summary, sig = _classify(death)
    return Cause(kind=kind, summary=summary, remedy=REMEDIES.get(kind, REMEDIES["exit"]),
                 counts_toward_intensity=kind in GPU_CLASS, retry=kind != "load_failure", signal=sig)


def _classify(death: Death) -> tuple[str, str, Optional[str]]:
    if death.returncode is None or death.unkillable_s is not None:
        why = f" (it was being killed for: {death.killed_by_us})" if death.killed_by_us else ""
        return "unkillable", f"still alive {death.unkillable_s or 0:g}s after SIGKILL: abandoned{why}", "SIGKILL"
    code = death.returncode
    sig = _signal_name(-code) if code < 0 and code != -1 else None
    if death.killed_by_us:
        if death.killed_by_us.startswith("hang"):
            return "hang", death.killed_by_us, sig
        if death.killed_by_us.startswith("unreachable"):
            return "unreachable", death.killed_by_us, sig
        return "killed_by_us", death.killed_by_us, sig
    if death.reported and death.reported.get("cause"):
        reported = death.reported
        return reported["cause"], f"{reported.get('exc_type', '')}: {reported.get('message', '')}".strip(": "), sig
    if sig:
        return _signal_cause(-code, death), _signal_summary(sig, death), sig
    if code in exitcodes.NAMES and code != exitcodes.EX_OK:
        return exitcodes.NAMES[code], f"exit {code} ({exitcodes.NAMES[code]})", None
    if code in WSL_EXIT_CODES:
        return "wsl_vm_exit", f"exit {code}: looks like a WSL VM failure (E_UNEXPECTED) or exit(-1)", None
    if code == 0:
        return "clean_exit", "exit 0 without a reason", None
    return "exit", f"exit {code}", None


def _signal_cause(signum: int, death: Death) -> str:
    if signum == signal.SIGSEGV:
        return "segfault"
    if signum == signal.SIGABRT:
        return "abort"
    if signum == signal.SIGBUS:
        return "bus_error"
    if signum == signal.SIGKILL:
        return "oom_killed"
    return "signal"


def _signal_summary(sig: str, death: Death) -> str:
    if sig == "SIGKILL":
        used = death.system_memory.get("percent")
        rss = f", worker RSS {death.rss // (1024 * 1024)} MiB" if death.rss else ""
        return f"SIGKILL not sent by us: probably the OOM killer (system memory {used}% used{rss})"
    return f"killed by {sig} at stage {death.stage or '?'}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
