"""Run a command on a machine starved of CPU: PER_CORE busy processes per core (plain priority, or
--nice N as root) for as long as the command runs, then stop them all.

Used once to run the upstream tier under the same hog as tests/endurance/test_lifecycle_attack.py
(4 busy processes per core), which CI does not do:

    python -m bench.under_hog --per-core 4 -- .venv-upstream/bin/python -m pytest --timeout 3600 tests/upstream

Prints the command's wall time and the load average at its end; exits with the command's status."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def spin(nice: int) -> None:
    if nice:
        os.nice(nice)
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.under_hog")
    parser.add_argument("--per-core", type=int, default=4)
    parser.add_argument("--nice", type=int, default=0, help="the hogs' niceness (negative needs root)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    context = multiprocessing.get_context("spawn")
    hogs = [context.Process(target=spin, args=(args.nice,), daemon=True)
            for _ in range(args.per_core * (os.cpu_count() or 1))]
    for hog in hogs:
        hog.start()
    started = time.monotonic()
    try:
        status = subprocess.call(command)
    finally:
        load = os.getloadavg()
        for hog in hogs:
            hog.kill()
            hog.join(5)
    print(f"under_hog: {len(hogs)} busy processes (nice {args.nice}); the command took "
          f"{time.monotonic() - started:.0f} s, exit {status}; load average at its end {load[0]:.1f}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
