"""`pose-service install-service`: the systemd units in systemd/, written for this checkout and the
virtual environment running this command, then enabled and started. `--dry-run` prints the plan
and every unit's text without touching anything (no root needed).

Unless `--no-token`, the service is given a token: a file (0600, the service user's) holding a
random one, created once and kept across reinstalls, named in ExecStart= as
gateway.auth_token_file. Without it any local user could list every job, fetch its frames and
results, delete jobs and read diagnostics. The command prints how the backend passes it."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHECKOUT = Path(__file__).resolve().parents[2]
TEMPLATE_PREFIX = "/opt/pose-service"
TEMPLATE_BIN = f"{TEMPLATE_PREFIX}/.venv/bin/pose-service"
SYSTEM_DIR = Path("/etc/systemd/system")
SERVICE_USER = "pose-service"
SYSTEM_TOKEN_FILE = Path("/etc/pose-service/token")


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


def token_file(args) -> Optional[Path]:
    """Where the service's token lives: --token-file, else beside units written to --unit-dir, else
    the user's config dir for a user unit, else /etc/pose-service/token. None with --no-token."""
    if args.no_token:
        return None
    if args.token_file:
        return Path(args.token_file).expanduser().absolute()
    if args.unit_dir:
        return Path(args.unit_dir).absolute() / "pose-service.token"
    if args.user_unit:
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "pose-service" / "token"
    return SYSTEM_TOKEN_FILE


def with_token_file(text: str, token: Optional[Path]) -> str:
    """Every ExecStart= line gets gateway.auth_token_file=<token> (quoted for systemd, % doubled)."""
    if token is None:
        return text
    word = "gateway.auth_token_file=" + str(token).replace("%", "%%")
    word = f'"{word}"' if re.search(r"\s", word) else word
    return re.sub(r"^(ExecStart=.+)$", lambda m: f"{m.group(1)} {word}", text, flags=re.M)


def ensure_token(path: Path, owner: Optional[str]) -> str:
    """Create the token file (0600, chowned to `owner`) unless it holds a token already. -> what was done."""
    if path.exists() and path.read_text().strip():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
            return "kept (its mode tightened to 0600)"
        return "kept"
    path.parent.mkdir(mode=0o755 if owner else 0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    if owner:
        import pwd
        user = pwd.getpwnam(owner)
        os.chown(path, user.pw_uid, user.pw_gid)
    return "created"


def token_instructions(path: Path) -> str:
    return (f"The service needs `Authorization: Bearer <token>` on every route but /health and /v1/health.\n"
            f"The backend sends it: put the file's content in its environment, POSE_SERVICE_TOKEN=\"$(cat {path})\",\n"
            f"and every call carries `Authorization: Bearer ${{POSE_SERVICE_TOKEN}}` (examples/MIGRATION.md).\n"
            f"Operator commands (pose-service drill ...) read it with gateway.auth_token_file={path} or the same "
            f"variable.")


def plan(args) -> list[tuple[Path, str, bool]]:
    """-> [(destination, text, changed?)]"""
    binary, target, token = service_binary(), unit_dir(args.user_unit, args.unit_dir), token_file(args)
    out = []
    for unit in units_for(args.user_unit, args.gpu or []):
        text = with_token_file(render((CHECKOUT / "systemd" / unit.template).read_text(), binary, CHECKOUT), token)
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
    token = token_file(args)
    if args.dry_run:
        if token:
            print(f"# would {'keep' if token.exists() else 'create'} the token file {token} (0600)")
        for dest, text, changed in steps:
            print(f"# would {'write' if changed else 'keep (unchanged)'} {dest}\n{text}")
        print(f"# would run: {' '.join(systemctl)} daemon-reload && {' '.join(systemctl)} enable --now "
              + " ".join(starts))
        return 0
    if not args.user_unit and not args.unit_dir and os.geteuid() != 0:
        print("pose-service install-service: writing system units needs root; use sudo, --user-unit, or --dry-run",
              file=sys.stderr)
        return 2
    system_wide = not args.user_unit and not args.unit_dir
    if system_wide:
        ensure_service_user()
    if token:
        print(f"token file {token}: {ensure_token(token, SERVICE_USER if system_wide else None)}")
        print(token_instructions(token))
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
