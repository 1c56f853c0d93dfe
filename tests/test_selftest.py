"""`pose-service selftest --json` on the CPU rungs: one row per rung of the ladder with the report's
fields, real numbers for the rungs that load, and a named failure for one that cannot."""
from __future__ import annotations

import json
import subprocess
import sys

from support import REPO

FIELDS = {"engine", "device", "detector", "precision", "load_s", "fps", "persons_frames", "gpu_peak_mb", "error"}


def test_selftest_json_reports_every_cpu_rung(tmp_path):
    ladder = ("ladder=[{engine:mediapipe,device:cpu},{engine:noop,device:cpu},"
              "{engine:hmr2_phalp,device:cpu,options:{detector:mediapipe}}]")
    out = tmp_path / "selftest.json"
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "selftest", "--json", "--frames", "8",
                           "--out", str(out), ladder, f"state_dir={tmp_path / 'state'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    mediapipe, noop, hmr2 = report["rungs"]
    for row in report["rungs"]:
        assert FIELDS <= set(row), row
    assert mediapipe["error"] is None and mediapipe["load_s"] > 0 and mediapipe["fps"] > 0
    assert 0 < mediapipe["persons_frames"] <= 8  # the built-in clip has a person in every frame
    assert noop["error"] is None and noop["persons_frames"] == 0  # noop finds nobody
    assert [s["name"] for s in mediapipe["stages"]] == ["runtime", "weights", "model", "detector"]
    # no hmr2 weights (or packages) on this machine: the rung names its stage and cause
    assert hmr2["error"] and hmr2["load_s"] is None and hmr2["error"].split(":")[0] in ("runtime", "weights")
