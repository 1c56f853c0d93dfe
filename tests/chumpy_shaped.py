"""A pickle with the structure of SMPLify's basicModel_neutral_lbs_10_207_0_v1.0.0.pkl: a protocol-2
dict whose arrays are objects of class chumpy.ch.Ch (state: `x` plus chumpy's bookkeeping) and whose
J_regressor is a scipy.sparse.csc.csc_matrix (state: data, indices, indptr, _shape), at SMPL's
real shapes with random values. Written with stand-in classes registered under those module names
for the moment of pickling only, so neither chumpy nor scipy is needed to make it or to read it."""
from __future__ import annotations

import contextlib
import pickle
import sys
import types
from pathlib import Path
from typing import Iterator

import numpy as np

V, F, J = 6890, 13776, 24


class Ch:
    def __init__(self, x):
        self.x = np.asarray(x)

    def __getstate__(self):
        return {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {}}


class csc_matrix:  # noqa: N801 - scipy's name
    def __init__(self, dense: np.ndarray):
        rows, cols = np.nonzero(dense.T)  # column-major walk: (col, row) pairs
        self.data = dense.T[rows, cols]
        self.indices = cols.astype(np.int32)
        self.indptr = np.searchsorted(rows, np.arange(dense.shape[1] + 1)).astype(np.int32)
        self._shape = dense.shape
        self.maxprint = 50


@contextlib.contextmanager
def registered(module: str, cls: type) -> Iterator[None]:
    parts = module.split(".")
    saved = {name: sys.modules.get(name) for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1))}
    for name in saved:
        sys.modules[name] = types.ModuleType(name)
    cls.__module__, cls.__qualname__ = module, cls.__name__
    setattr(sys.modules[module], cls.__name__, cls)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def smpl_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    regressor = np.where(rng.random((J, V)) < 0.002, rng.random((J, V)), 0.0)
    return {"v_template": rng.normal(size=(V, 3)), "posedirs": rng.normal(size=(V, 3, 207)) * 0.01,
            "shapedirs": rng.normal(size=(V, 3, 10)) * 0.01, "J_regressor": regressor,
            "weights": rng.dirichlet(np.ones(J), size=V), "kintree_table": np.vstack([
                np.r_[4294967295, np.arange(J - 1) // 2], np.arange(J)]).astype(np.int64),
            "f": rng.integers(0, V, size=(F, 3)).astype(np.uint32)}


def write_chumpy_shaped_smpl(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes the pickle; returns the plain arrays it holds, for comparison."""
    arrays = smpl_arrays(seed)
    data = {key: Ch(value) for key, value in arrays.items() if key not in ("J_regressor", "kintree_table", "f")}
    data.update(J_regressor=csc_matrix(arrays["J_regressor"]), kintree_table=arrays["kintree_table"],
                f=arrays["f"], bs_type="lrotmin", bs_style="lbs", vert_sym_idxs=np.arange(V))
    with registered("chumpy.ch", Ch), registered("scipy.sparse.csc", csc_matrix):
        with open(path, "wb") as fh:
            pickle.dump(data, fh, protocol=2)
    return arrays
