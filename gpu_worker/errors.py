"""Sort exceptions raised inside the worker into causes, by type and CUDA error code (never by
looking for the word "CUDA" in a message).

torch 2.8 and later raise `torch.AcceleratorError` with the CUDA runtime's `error_code`. Earlier
versions (the project supports torch 2.1 and later) raise a plain RuntimeError whose text is
"CUDA error: " + cudaGetErrorString(code), and the CUDA libraries' allocation failures arrive on
every version as a RuntimeError naming the library's status (CUBLAS_STATUS_ALLOC_FAILED, ...). For
those the exact error string or status name is the code: nothing else identifies them."""
from __future__ import annotations

import re

from pose_common import exitcodes

CUDA_OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation: a cudaMalloc outside torch's caching allocator
# Errors after which the context is unusable (every later call fails), with cudaGetErrorString's text
STICKY_CUDA_ERRORS = {
    700: "an illegal memory access was encountered",      # cudaErrorIllegalAddress
    710: "device-side assert triggered",                  # cudaErrorAssert
    714: "hardware stack error",                          # cudaErrorHardwareStackError
    715: "an illegal instruction was encountered",        # cudaErrorIllegalInstruction
    716: "misaligned address",                            # cudaErrorMisalignedAddress
    717: "operation not supported on global/shared address space",  # cudaErrorInvalidAddressSpace
    718: "invalid program counter",                       # cudaErrorInvalidPc
    719: "unspecified launch failure",                    # cudaErrorLaunchFailure
}
STICKY_CUDA_CODES = frozenset(STICKY_CUDA_ERRORS)
# The CUDA libraries' own out-of-memory statuses (cuBLAS handles and workspaces, cuDNN, cuSOLVER, ...)
LIBRARY_ALLOC_FAILED = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED",
                        "CUSPARSE_STATUS_ALLOC_FAILED", "CUFFT_ALLOC_FAILED", "CURAND_STATUS_ALLOCATION_FAILED")
_LIBRARY_ALLOC = re.compile(r"\b(" + "|".join(LIBRARY_ALLOC_FAILED) + r")\b")
_CUDA_ERROR = re.compile(r"^CUDA error: (.+?)(?:\n|$)")


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


def cuda_error_code(exc: BaseException) -> int | None:
    """The CUDA runtime's code: torch >= 2.8 carries it; before, it is known by its exact text."""
    names = _class_names(exc)
    if "AcceleratorError" in names:
        code = getattr(exc, "error_code", None)
        return code if isinstance(code, int) else None
    if "RuntimeError" not in names or not exc.args or not isinstance(exc.args[0], str):
        return None
    match = _CUDA_ERROR.match(exc.args[0])
    if match is None:
        return None
    text = match.group(1).strip()
    if text == "out of memory":
        return CUDA_OUT_OF_MEMORY
    return next((code for code, known in STICKY_CUDA_ERRORS.items() if text.startswith(known)), None)


def is_cuda_oom(exc: BaseException) -> bool:
    if "OutOfMemoryError" in _class_names(exc) or getattr(exc, "cuda_oom", False):
        return True
    if cuda_error_code(exc) == CUDA_OUT_OF_MEMORY:
        return True
    return "RuntimeError" in _class_names(exc) and bool(_LIBRARY_ALLOC.search(str(exc)))


def is_sticky_cuda(exc: BaseException) -> bool:
    if "AcceleratorError" in _class_names(exc) and getattr(exc, "error_code", None) is None:
        return True  # torch said it was the device's error and not which: treat the context as lost
    return cuda_error_code(exc) in STICKY_CUDA_CODES


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
