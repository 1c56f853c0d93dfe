"""`pose-service install-service` gives the service a token unless told not to: a 0600 file holding
a random token, kept across reinstalls, named in every ExecStart= line as gateway.auth_token_file,
and the command says how the backend passes it. The daemon started as that line says then needs it."""
from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys

from support import REPO, assert_token_guards, free_port


def install(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pose_service.cli", "install-service", "--unit-dir",
                           str(tmp_path / "units"), "--no-start", *extra], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def exec_start(unit_text: str) -> list[str]:
    return shlex.split(re.search(r"^ExecStart=(.+)$", unit_text, re.M).group(1))


def test_install_creates_a_private_token_file_once_and_the_unit_uses_it(tmp_path):
    run = install(tmp_path)
    assert run.returncode == 0, run.stderr
    token_file = tmp_path / "units" / "pose-service.token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert f"token file {token_file}: created" in run.stdout
    assert "POSE_SERVICE_TOKEN" in run.stdout and "Authorization: Bearer" in run.stdout and "MIGRATION" in run.stdout
    argv = exec_start((tmp_path / "units" / "pose-service.service").read_text())
    assert f"gateway.auth_token_file={token_file}" in argv
    again = install(tmp_path)
    assert "kept" in again.stdout and token_file.read_text().strip() == token  # a reinstall keeps the backend's token

    port = free_port()  # the daemon as the unit starts it (its overrides) needs the token
    overrides = [a for a in argv if "=" in a and not a.startswith(("state_dir=", "runtime_dir="))]
    proc = subprocess.Popen([sys.executable, "-m", "pose_service.cli", "gateway", f"state_dir={tmp_path / 'state'}",
                             f"gateway.port={port}", *overrides], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={k: v for k, v in os.environ.items()
                                                            if k != "POSE_SERVICE_TOKEN"})
    try:
        assert_token_guards(f"http://127.0.0.1:{port}", token)
    finally:
        proc.terminate()
        proc.wait(15)


def test_no_token_writes_none_and_a_loose_file_is_tightened(tmp_path):
    run = install(tmp_path, "--no-token")
    assert run.returncode == 0 and not (tmp_path / "units" / "pose-service.token").exists()
    assert "auth_token_file" not in (tmp_path / "units" / "pose-service.service").read_text()
    loose = tmp_path / "given.token"
    loose.write_text("already-there\n")
    loose.chmod(0o644)
    run = install(tmp_path, "--token-file", str(loose), "--user-unit")
    assert run.returncode == 0 and "tightened" in run.stdout
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o600 and loose.read_text() == "already-there\n"
    assert f"gateway.auth_token_file={loose}" in exec_start((tmp_path / "units" / "pose-service.service").read_text())


def test_dry_run_creates_no_token(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pose_service.cli", "install-service", "--dry-run", "--unit-dir",
                          str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0 and "would create the token file" in run.stdout
    assert list(tmp_path.iterdir()) == []
