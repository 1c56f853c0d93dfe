"""One process per role per state dir: an exclusive, non-blocking flock that the kernel releases
when its holder dies, however it dies. The file names the holder so a refusal can say who."""
from __future__ import annotations

import fcntl
import os
from typing import IO


class StateDirHeld(RuntimeError):
    def __init__(self, path: str, holder: str):
        super().__init__(f"{os.path.dirname(path)} is in use by {holder} (lock {os.path.basename(path)}); "
                         "stop it first, or use another state_dir")
        self.holder = holder


def hold(path: str, role: str) -> IO[str]:
    """Take the lock at `path` for this process's life. -> the open file (keep it referenced)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StateDirHeld(path, holder) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{role} PID {os.getpid()}")
    fh.flush()
    return fh
