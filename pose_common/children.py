"""Process hygiene shared by every parent and child: die with your parent, stop a child politely
then firmly, say what you are in `top`. One implementation of each, used by the service manager,
supervisor, worker and overlay."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Optional

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def die_with_parent(expected_parent: Optional[int] = None, sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent dies. -> False when the
    parent is already gone (the caller should exit: nobody is there to supervise it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass
    return expected_parent is None or os.getppid() == expected_parent


def name_process(name: str) -> None:
    """Linux: the name top, `ps -o comm` and /proc/PID/comm show for this process (15 bytes at most)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_NAME, name.encode()[:15])
    except OSError:
        pass


def stop_process(popen: subprocess.Popen, timeout_s: float, kill_wait_s: float = 5.0) -> Optional[int]:
    """SIGTERM, wait up to timeout_s, then SIGKILL. -> the exit status (None if it would not die)."""
    if popen.poll() is not None:
        return popen.returncode
    try:
        popen.send_signal(signal.SIGTERM)
        return popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        popen.kill()
    try:
        return popen.wait(kill_wait_s)
    except subprocess.TimeoutExpired:
        return None


def parent_death_signal(parent_pid: int, sig: int = signal.SIGKILL):
    """A Popen preexec_fn: the child gets `sig` when `parent_pid` dies, from its first instruction
    (PDEATHSIG survives exec). Only for single-threaded parents, as preexec_fn requires."""
    def arm() -> None:
        if not die_with_parent(parent_pid, sig):
            os._exit(1)  # the parent died before the signal was armed
    return arm
