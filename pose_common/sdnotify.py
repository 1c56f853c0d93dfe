"""sd_notify(3) in a few lines: a datagram to $NOTIFY_SOCKET; a no-op outside systemd."""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
            return True
        except OSError:
            return False


def watchdog_interval_s() -> float:
    """Half of WatchdogSec, as sd_watchdog_enabled(3) recommends; 0 when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    return int(usec) / 2e6 if usec and usec.isdigit() else 0.0
