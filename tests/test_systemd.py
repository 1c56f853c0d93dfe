"""The systemd units, written for this checkout by `pose-service install-service`, pass
`systemd-analyze verify` with no complaint about our files (Debian's systemd; the sd_notify side,
READY/WATCHDOG/STOPPING, is tested against a real `serve` in test_lifecycle)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze not installed (Debian package systemd)")


def install(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pose_service.cli", "install-service", "--unit-dir", str(tmp_path),
                           "--no-start", *extra], capture_output=True, text=True, cwd=REPO, timeout=60)


def verify(tmp_path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)


@pytest.mark.parametrize("extra,units", [
    ((), ("pose-service.service", "pose-service.socket")),
    (("--gpu", "0", "--gpu", "1"), ("pose-service@0.service", "pose-service@0.socket", "pose-service@1.service")),
    (("--user-unit",), ("pose-service.service",)),
])
def test_installed_units_pass_systemd_analyze_verify(tmp_path, extra, units):
    written = install(tmp_path, *extra)
    assert written.returncode == 0, written.stderr
    assert "wrote" in written.stdout
    result = verify(tmp_path, *units)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if str(tmp_path) in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr
    text = (tmp_path / units[0].replace("@0", "@").replace("@1", "@")).read_text()
    assert sys.executable.rsplit("/", 1)[0] in text  # ExecStart= points at this venv, not /opt


def test_verify_fails_on_a_broken_unit(tmp_path):
    install(tmp_path)
    unit = tmp_path / "pose-service.service"
    unit.write_text(unit.read_text().replace("ExecStart=", "ExecStart=/nonexistent/pose-service #"))
    assert verify(tmp_path, "pose-service.service").returncode != 0


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    shown = subprocess.run([sys.executable, "-m", "pose_service.cli", "install-service", "--dry-run", "--unit-dir",
                            str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert shown.returncode == 0 and "would write" in shown.stdout and "enable --now" in shown.stdout
    assert list(tmp_path.iterdir()) == []
