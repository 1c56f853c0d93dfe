"""The rest of the fault matrix (tests/test_supervision.py runs its core cases): every fault kind at
every point of the worker's life, 40 cells in all across the two tiers."""
from __future__ import annotations

import pytest
from test_supervision import CORE_CASES, KINDS, OTHER_CASES, POINTS, clip, run_fault_case  # noqa: F401


def test_the_two_tiers_cover_the_whole_matrix_once():
    assert sorted(CORE_CASES + OTHER_CASES) == sorted((k, p) for k in KINDS for p in POINTS)
    assert not set(CORE_CASES) & set(OTHER_CASES)


@pytest.mark.parametrize("kind,point", OTHER_CASES)
def test_fault_matrix_other_cells(tmp_path, clip, kind, point):  # noqa: F811
    run_fault_case(tmp_path, clip, kind, point)
