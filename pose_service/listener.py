"""The HTTP listening socket outlives the processes that serve it: systemd's socket unit (socket
activation, sd_listen_fds(3)) or the service manager owns it and hands it to each gateway
generation, so while a gateway restarts, connections wait in the kernel's backlog instead of
being refused."""
from __future__ import annotations

import os
import socket
from typing import Optional

SD_LISTEN_FDS_START = 3
HANDOVER_ENV = "POSE_SERVICE_LISTEN_FD"  # read by gateway.app.main
BACKLOG = 1024


def inherited_from_systemd() -> Optional[socket.socket]:
    """The first socket systemd passed us, if it passed one to this very process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0") or 0) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # so that no child mistakes them for its own
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def bind_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def listening_socket(host: str, port: int) -> socket.socket:
    sock = inherited_from_systemd() or bind_listener(host, port)
    sock.set_inheritable(True)
    return sock
