"""`pose-service models import-smpl PATH`: SMPLify's neutral model as plain numpy, without chumpy.

The file SMPLify publishes (basicModel_neutral_lbs_10_207_0_v1.0.0.pkl) is a Python 2 pickle whose
arrays are chumpy objects and whose J_regressor is a scipy sparse matrix. chumpy does not import on
numpy >= 1.24 or Python >= 3.11 (docs/hmr2-phalp.md §3). This reads the pickle with stand-ins for
those classes (no chumpy, no scipy needed), keeps each chumpy array's value (`x`) and densifies the
sparse matrix, checks the result as the engine's weights stage does, and writes it where HMR2 and
PHALP read it. smplx loads the result as it loads any SMPL pickle."""
from __future__ import annotations

import os
import pickle
import sys
import tempfile
from typing import Any, Mapping

import numpy as np

from gpu_worker.engines import hmr2_assets


class ChumpyStandIn:
    """Stands for any chumpy class while unpickling: keeps its pickled state."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def value(self, key: str) -> np.ndarray:
        if isinstance(self.state, dict) and "x" in self.state:
            return np.asarray(self.state["x"])
        raise ValueError(f"{key} is a chumpy expression without a stored value; convert it where chumpy imports")


class SparseStandIn:
    """Stands for scipy.sparse's csc_matrix / csr_matrix / coo_matrix while unpickling."""

    kind = ""

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)

    def dense(self) -> np.ndarray:
        shape = tuple(self.state.get("_shape") or self.state["shape"])
        data = np.asarray(self.state["data"], dtype=np.float64)
        out = np.zeros(shape, dtype=np.float64)
        if self.kind == "coo":
            np.add.at(out, (np.asarray(self.state["row"]), np.asarray(self.state["col"])), data)
            return out
        indices, indptr = np.asarray(self.state["indices"]), np.asarray(self.state["indptr"])
        for outer in range(len(indptr) - 1):
            span = slice(indptr[outer], indptr[outer + 1])
            if self.kind == "csc":
                out[indices[span], outer] += data[span]
            else:
                out[outer, indices[span]] += data[span]
        return out


def sparse_class(kind: str) -> type:
    return type(f"{kind}_matrix", (SparseStandIn,), {"kind": kind})


class WithoutChumpy(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return ChumpyStandIn
        if module.startswith("scipy.sparse") and name in ("csc_matrix", "csr_matrix", "coo_matrix"):
            return sparse_class(name[:3])
        return super().find_class(module, name)


def load_without_chumpy(path: str) -> dict:
    with open(path, "rb") as fh:
        data = WithoutChumpy(fh, encoding="latin1").load()
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected the SMPL model's dict")
    return data


def plain_value(key: str, value: Any) -> Any:
    if isinstance(value, ChumpyStandIn):
        return value.value(key)
    if isinstance(value, SparseStandIn):
        return value.dense()
    return value


def plain_smpl(data: Mapping[str, Any]) -> dict:
    return {key: plain_value(key, value) for key, value in data.items()}


def smpl_destinations(env: Mapping[str, str]) -> list[str]:
    """Where HMR2 and PHALP read SMPL_NEUTRAL.pkl (the same paths `models verify` checks)."""
    assets = hmr2_assets.hmr2_assets(env) + hmr2_assets.phalp_assets(env, "hmar")
    return [asset.path for asset in assets if asset.content == "smpl"]


def write_atomically(path: str, data: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(dict(data), fh, protocol=4)
    hmr2_assets.check_smpl(tmp)  # the weights stage's own check, on what was written
    os.replace(tmp, path)


def import_smpl(source: str, env: Mapping[str, str] = os.environ) -> list[str]:
    """Convert `source` and write it to every destination; returns the paths written."""
    plain = plain_smpl(load_without_chumpy(source))
    written = []
    for path in smpl_destinations(env):
        write_atomically(path, plain)
        written.append(path)
    return written


def import_smpl_command(args: Any) -> int:
    try:
        written = import_smpl(args.path)
    except (OSError, ValueError, pickle.UnpicklingError, hmr2_assets.ContentError) as exc:
        print(f"import-smpl: {args.path}: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
