"""`pose-service models import-smpl` on a pickle shaped like SMPLify's (chumpy classes, a sparse
J_regressor), with chumpy absent; `models verify` names the step when it meets such a pickle."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from gpu_worker.engines import hmr2_assets
from pose_service.verbs.models_import_smpl import import_smpl, load_without_chumpy, plain_smpl

from chumpy_shaped import write_chumpy_shaped_smpl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def chumpy_pickle(tmp_path_factory):
    path = tmp_path_factory.mktemp("smplify") / "basicModel_neutral_lbs_10_207_0_v1.0.0.pkl"
    return path, write_chumpy_shaped_smpl(path)


def test_the_fixture_really_needs_chumpy(chumpy_pickle):
    assert importlib.util.find_spec("chumpy") is None
    with open(chumpy_pickle[0], "rb") as fh, pytest.raises(ModuleNotFoundError, match="chumpy"):
        pickle.load(fh, encoding="latin1")
    assert "chumpy" in hmr2_assets.pickle_modules(str(chumpy_pickle[0]))


def test_conversion_keeps_every_value_and_densifies_the_regressor(chumpy_pickle):
    path, arrays = chumpy_pickle
    plain = plain_smpl(load_without_chumpy(str(path)))
    for key, value in arrays.items():
        assert isinstance(plain[key], np.ndarray), key
        np.testing.assert_array_equal(plain[key], value, err_msg=key)
    assert plain["bs_style"] == "lbs"


def test_import_writes_both_caches_and_the_weights_check_passes(chumpy_pickle, tmp_path):
    env = {"HOME": str(tmp_path / "home")}
    written = import_smpl(str(chumpy_pickle[0]), env)
    assert written == [os.path.join(env["HOME"], ".cache/4DHumans/data/smpl/SMPL_NEUTRAL.pkl"),
                       os.path.join(env["HOME"], ".cache/phalp/3D/models/smpl/SMPL_NEUTRAL.pkl")]
    for path in written:
        hmr2_assets.check_smpl(path)
        assert "chumpy" not in hmr2_assets.pickle_modules(path) and "scipy" not in hmr2_assets.pickle_modules(path)


def test_verify_names_import_smpl_for_a_chumpy_pickle_and_the_cli_fixes_it(chumpy_pickle, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONPATH": REPO}
    env.pop("FVCORE_CACHE", None)
    env.pop("TORCH_HOME", None)
    smpl_path = os.path.join(env["HOME"], ".cache/4DHumans/data/smpl/SMPL_NEUTRAL.pkl")
    os.makedirs(os.path.dirname(smpl_path))
    with open(chumpy_pickle[0], "rb") as src, open(smpl_path, "wb") as dst:
        dst.write(src.read())

    def verify_row() -> dict:
        proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "models", "verify", "--engine",
                               "hmr2_phalp", "--json"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        return next(f for f in json.loads(proc.stdout)["files"] if f["name"] == "hmr2_smpl_neutral")

    before = verify_row()
    assert before["status"] == "invalid" and "models import-smpl" in before["problem"]
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "models", "import-smpl", str(chumpy_pickle[0])],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert smpl_path in proc.stdout
    assert verify_row()["status"] == "present"
