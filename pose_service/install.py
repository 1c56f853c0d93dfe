"""`pose-service install-service`: the systemd units in systemd/, written for this checkout and the
virtual environment running this command, then enabled and started. `--dry-run` prints the plan
and every unit's text without touching anything (no root needed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHECKOUT = Path(__file__).resolve().parents[1]
TEMPLATE_PREFIX = "/opt/pose-service"
TEMPLATE_BIN = f"{TEMPLATE_PREFIX}/.venv/bin/pose-service"
SYSTEM_DIR = Path("/etc/systemd/system")
SERVICE_USER = "pose-service"


@dataclass
class Unit:
    name: str        # the installed name, e.g. pose-service@.socket
    template: str    # the file under systemd/
    start: list[str]  # what to enable and start


def units_for(user_unit: bool, gpus: list[int]) -> list[Unit]:
    if user_unit:
        return [Unit("pose-service.service", "pose-service-user.service", ["pose-service.service"])]
    if gpus:
        return [Unit("pose-service@.socket", "pose-service@.socket", [f"pose-service@{g}.socket" for g in gpus]),
                Unit("pose-service@.service", "pose-service@.service", [f"pose-service@{g}.service" for g in gpus])]
    return [Unit("pose-service.socket", "pose-service.socket", ["pose-service.socket"]),
            Unit("pose-service.service", "pose-service.service", ["pose-service.service"])]


def service_binary() -> str:
    """The pose-service entry point of the environment running this command."""
    candidate = Path(sys.executable).parent / "pose-service"
    return str(candidate) if candidate.exists() else shutil.which("pose-service") or str(candidate)


def render(template: str, binary: str, checkout: Path) -> str:
    return template.replace(TEMPLATE_BIN, binary).replace(TEMPLATE_PREFIX, str(checkout))


def unit_dir(user_unit: bool, override: Optional[str]) -> Path:
    if override:
        return Path(override)
    if user_unit:
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    return SYSTEM_DIR


def plan(args) -> list[tuple[Path, str, bool]]:
    """-> [(destination, text, changed?)]"""
    binary, target = service_binary(), unit_dir(args.user_unit, args.unit_dir)
    out = []
    for unit in units_for(args.user_unit, args.gpu or []):
        text = render((CHECKOUT / "systemd" / unit.template).read_text(), binary, CHECKOUT)
        dest = target / unit.name
        out.append((dest, text, not dest.exists() or dest.read_text() != text))
    return out


def ensure_service_user(name: str = SERVICE_USER) -> None:
    """The system units run as `pose-service` (state in /var/lib/pose-service, its HOME)."""
    import pwd
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    command = ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/pose-service", "--no-create-home",
               "--shell", shutil.which("nologin") or "/bin/false", "--comment", "pose-service daemon", name]
    print("ran:", " ".join(command))
    subprocess.run(command, check=True)


def install_service(args) -> int:
    steps = plan(args)
    systemctl = ["systemctl", "--user"] if args.user_unit else ["systemctl"]
    starts = [name for unit in units_for(args.user_unit, args.gpu or []) for name in unit.start]
    if args.dry_run:
        for dest, text, changed in steps:
            print(f"# would {'write' if changed else 'keep (unchanged)'} {dest}\n{text}")
        print(f"# would run: {' '.join(systemctl)} daemon-reload && {' '.join(systemctl)} enable --now "
              + " ".join(starts))
        return 0
    if not args.user_unit and not args.unit_dir and os.geteuid() != 0:
        print("pose-service install-service: writing system units needs root; use sudo, --user-unit, or --dry-run",
              file=sys.stderr)
        return 2
    if not args.user_unit and not args.unit_dir:
        ensure_service_user()
    for dest, text, changed in steps:
        if changed:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        print(f"{'wrote' if changed else 'unchanged'} {dest}")
    if args.no_start:
        return 0
    for command in ([*systemctl, "daemon-reload"], [*systemctl, "enable", "--now", *starts]):
        print("ran:", " ".join(command))
        if subprocess.run(command).returncode != 0:
            return 1
    return 0
