"""`models import-smpl`'s output read by the library that reads it on the user's machine: smplx (under
HMR2's and PHALP's SMPL classes) loads each converted file and poses the body with it exactly as the
arrays of the original chumpy pickle say."""
from __future__ import annotations

import numpy as np
import pytest

from pose_service.verbs.models_import_smpl import import_smpl

from chumpy_shaped import write_chumpy_shaped_smpl


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-smpl")
    original = root / "basicModel_neutral_lbs_10_207_0_v1.0.0.pkl"
    arrays = write_chumpy_shaped_smpl(original)
    return arrays, import_smpl(str(original), {"HOME": str(root / "home")})


def pose(model, betas=None, body_pose=None):
    import torch

    out = model(betas=torch.zeros(1, 10) if betas is None else betas,
                body_pose=torch.zeros(1, 69) if body_pose is None else body_pose, global_orient=torch.zeros(1, 3))
    return out.vertices[0].detach().numpy(), out.joints[0, :24].detach().numpy()


def test_smplx_loads_both_imported_files_and_rests_at_the_template(imported):
    import smplx

    arrays, written = imported
    assert len(written) == 2
    for path in written:
        vertices, joints = pose(smplx.SMPL(model_path=path))
        np.testing.assert_allclose(vertices, arrays["v_template"], atol=1e-5)
        np.testing.assert_allclose(joints, arrays["J_regressor"] @ arrays["v_template"], atol=1e-4)


def test_a_shape_and_a_pose_move_the_body_by_the_original_blend_shapes(imported):
    import smplx
    import torch

    arrays, written = imported
    model = smplx.SMPL(model_path=written[0])
    betas = torch.zeros(1, 10)
    betas[0, 0] = 1.0
    vertices, _ = pose(model, betas=betas)
    np.testing.assert_allclose(vertices, arrays["v_template"] + arrays["shapedirs"][:, :, 0], atol=1e-5)
    bent = torch.zeros(1, 69)
    bent[0, 9:12] = torch.tensor([0.0, 0.0, 1.2])  # the left knee
    moved, _ = pose(model, body_pose=bent)
    rest, _ = pose(model)
    assert np.abs(moved - rest).max() > 1e-3, "the pose did nothing: posedirs or weights were lost"
