"""A job's video, resolved inside the allowed roots and opened so that what is checked is what is
read: the file is opened without following a symlink in its last component, and the check is made
on the real path of the open descriptor, not on the name. Used wherever a video is opened — the
gateway before accepting, the supervisor when a submit arrives, the worker on every attempt (so a
job re-queued after a crash is checked again), the frame route and the overlay renderer — so a file
swapped for a symlink after acceptance is refused everywhere."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence


class PathRefused(ValueError):
    """The path may not be read; the message says why without naming anything outside the roots."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def real_roots(roots: Sequence[str]) -> list[str]:
    return [os.path.realpath(os.path.expanduser(root)) for root in roots if root]


def is_inside(real: str, roots: Sequence[str]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in real_roots(roots))


def resolve_inside(path: str, roots: Sequence[str]) -> str:
    """-> the real path, if it is inside a root (whether or not it exists); else PathRefused."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise PathRefused("the video path is empty or not a valid path", "bad_path")
    if not real_roots(roots):
        raise PathRefused("video paths are disabled: set jobs.allowed_roots (or upload the file)", "no_roots")
    real = os.path.realpath(path)
    if not is_inside(real, roots):
        raise PathRefused("the video path is outside the allowed roots", "outside_roots")
    return real


@contextmanager
def open_inside(path: str, roots: Sequence[str]) -> Iterator[str]:
    """Open the video once and yield a path to that very open file (`/proc/self/fd/N`), for readers
    such as FFmpeg that take a path. Refused: a symlink, anything whose real location is outside the
    roots, anything that is not a regular file."""
    resolve_inside(path, roots)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PathRefused(*_open_refusal(exc)) from None
    try:
        if not is_inside(os.readlink(f"/proc/self/fd/{fd}"), roots):
            raise PathRefused("the video path is outside the allowed roots", "outside_roots")
        if not _is_regular(fd):
            raise PathRefused("the video path is not a regular file", "not_a_file")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _is_regular(fd: int) -> bool:
    import stat
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _open_refusal(exc: OSError) -> tuple[str, str]:
    """-> (a reason for the client, a code)."""
    import errno
    if exc.errno == errno.ELOOP:
        return "the video path is a symbolic link (refused: it could point anywhere)", "symlink"
    if exc.errno == errno.ENOENT:
        return "the video file does not exist (any more)", "missing"
    if exc.errno == errno.EACCES:
        return "the video file is not readable by the service", "unreadable"
    return "the video file could not be opened", "unreadable"
