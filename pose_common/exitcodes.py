"""Exit codes the worker chooses on purpose, so the supervisor can tell a decision from a crash."""

EX_OK = 0
EX_LOAD_FAILED = 3          # missing weights / import error: restarting will not help
EX_EXCEPTION = 70           # unhandled Python exception, reported over the wire first
EX_CUDA_OOM = 71            # CUDA OOM that survived a cache flush and one retry
EX_CUDA_STICKY = 72         # sticky CUDA error: the context is poisoned, the process must go
EX_ORPHANED = 73            # the supervisor went away

NAMES = {
    EX_OK: "ok",
    EX_LOAD_FAILED: "load_failure",
    EX_EXCEPTION: "python_exception",
    EX_CUDA_OOM: "cuda_oom",
    EX_CUDA_STICKY: "cuda_sticky",
    EX_ORPHANED: "orphaned",
}
