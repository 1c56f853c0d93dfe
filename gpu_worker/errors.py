"""Sort exceptions raised inside the worker into causes, by type and CUDA error code (never by
looking for the word "CUDA" in a message)."""
from __future__ import annotations

from pose_common import exitcodes

# cudaErrorIllegalAddress, cudaErrorAssert, misaligned/invalid address space/invalid PC, launch failure
STICKY_CUDA_CODES = frozenset({700, 710, 716, 717, 718, 719})


class WeightsMissing(FileNotFoundError):
    """A file an engine needs is absent or truncated; the message says which and where to get it."""


class TrackerStateLost(RuntimeError):
    """A tracker step failed after it may have changed the tracks (a CUDA out-of-memory inside PHALP's
    update): running it again would update twice, so the worker dies as for the error that caused
    it and its replacement rebuilds the tracks from the stored frames (the resume path)."""

    def __init__(self, message: str, cuda_oom: bool = True):
        super().__init__(message)
        self.cuda_oom = cuda_oom


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_cuda_oom(exc: BaseException) -> bool:
    return "OutOfMemoryError" in _class_names(exc) or bool(getattr(exc, "cuda_oom", False))


def is_sticky_cuda(exc: BaseException) -> bool:
    names = _class_names(exc)
    if "AcceleratorError" in names:
        code = getattr(exc, "error_code", None)
        return code in STICKY_CUDA_CODES or code is None
    # torch < 2.8 raises a plain RuntimeError for the same condition
    return "RuntimeError" in names and "illegal memory access" in str(exc)


def is_load_failure(exc: BaseException) -> bool:
    return isinstance(exc, (ImportError, WeightsMissing, FileNotFoundError))


def classify(exc: BaseException, during_load: bool) -> tuple[str, int]:
    """-> (cause, exit code)."""
    if is_sticky_cuda(exc):
        return "cuda_sticky", exitcodes.EX_CUDA_STICKY
    if is_cuda_oom(exc):
        return "cuda_oom", exitcodes.EX_CUDA_OOM
    if during_load and is_load_failure(exc):
        return "load_failure", exitcodes.EX_LOAD_FAILED
    return "python_exception", exitcodes.EX_EXCEPTION


def free_cuda_cache() -> None:
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
