"""The paths a GPU run takes, with the real upstream code on the CPU: the engine with
engine.device=cuda and cuda:1 on a CUDA-shaped torch (tests/cuda_shim.py: every placement checked as
torch checks it and recorded, tensors kept on the CPU), the texture sampler's fallback when
neural_renderer does not import (it is not installed here), and bf16 autocast against fp32."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import run_on_frames

from cuda_shim import cuda_shim

FRAMES = 8
# bf16 keeps 8 bits of mantissa. Measured on this tier (8 frames, random weights): rotation-matrix
# entries differ by up to 0.095, 3D joints by up to 0.029 m, boxes not at all (detector in fp32)
BF16_SMPL_ATOL = 0.15
BF16_JOINTS_ATOL = 0.05
BF16_BOX_ATOL = 1.0


@pytest.fixture(scope="module")
def cpu_fp32(cache, frames_dir):
    return run_on_frames(cache.options(precision="fp32"), frames_dir, FRAMES)[0]


def ids_per_frame(frames) -> list[list[int]]:
    return [sorted(p["track_id"] for p in f.persons) for f in frames]


def people(frames) -> dict[tuple[int, int], dict]:
    return {(f.index, p["track_id"]): p for f in frames for p in f.persons}


@pytest.mark.parametrize("device,index", [("cuda", 0), ("cuda:1", 1)])
def test_the_engine_runs_on_a_cuda_device_and_every_tensor_lands_there(cache, frames_dir, cpu_fp32, device, index,
                                                                        monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with cuda_shim(physical=2, total_mb=24576) as shim:
        frames, engine = run_on_frames(cache.options(appearance="auto", precision="fp32"), frames_dir, FRAMES,
                                       device=device)
    assert ("set_device", index) in shim.calls
    assert shim.indices_used() == {index}, shim.placements[:20]
    where = {name for name, _ in shim.placements}
    assert {"Tensor.cuda", "to"} <= where or "Tensor.cuda" in where  # PHALP's .cuda() calls went through it
    # neural_renderer is not installed here: the CUDA rung runs with HMAR and says so
    described = engine.describe()
    assert described["appearance"] == "hmar" and "neural_renderer" in described["appearance_note"]
    assert ids_per_frame(frames) == ids_per_frame(cpu_fp32)
    for key, person in people(cpu_fp32).items():
        np.testing.assert_allclose(people(frames)[key]["keypoints_3d"], person["keypoints_3d"], atol=1e-4)


def detector_in_fp32(engine) -> None:
    """The synthetic detector is random: its scores sit together near 1 and its boxes are arbitrary
    regressions, so bf16 rounding reorders them and changes which boxes survive NMS; nothing about a
    real detector follows from that. Its bf16 run is checked on its own (it runs and hands fp32 on)."""
    engine._detector.autocast = contextlib.nullcontext


# the detector's pyramid and ROI heads in bf16 on a CPU without bf16 kernels: about 14 minutes on the
# 2-core machine, over the tier's 15-minute default when it is loaded
@pytest.mark.timeout(1800)
def test_the_whole_engine_runs_in_bf16_autocast(cache, frames_dir):
    frames, engine = run_on_frames(cache.options(precision="bf16"), frames_dir, FRAMES)
    assert engine.precision == "bf16" and engine._detector.autocast == engine._autocast
    assert [f.index for f in frames] == list(range(FRAMES))
    assert sum(len(f.persons) for f in frames) > 0


def test_bf16_hmr2_and_appearance_give_the_same_tracks_and_close_bodies(cache, frames_dir, cpu_fp32):
    frames, engine = run_on_frames(cache.options(precision="bf16"), frames_dir, FRAMES, prepare=detector_in_fp32)
    assert engine.precision == "bf16"
    assert ids_per_frame(frames) == ids_per_frame(cpu_fp32)
    reduced, full = people(frames), people(cpu_fp32)
    assert full, "no person tracked: nothing compared"
    worst = {"smpl": 0.0, "joints": 0.0, "box": 0.0}
    for key, person in full.items():
        other = reduced[key]
        for part in ("global_orient", "body_pose", "betas"):
            diff = np.abs(np.asarray(other["smpl"][part]) - np.asarray(person["smpl"][part])).max()
            worst["smpl"] = max(worst["smpl"], float(diff))
        worst["joints"] = max(worst["joints"], float(np.abs(np.asarray(other["keypoints_3d"])
                                                             - np.asarray(person["keypoints_3d"])).max()))
        worst["box"] = max(worst["box"], float(np.abs(np.asarray(other["bbox_xyxy"])
                                                      - np.asarray(person["bbox_xyxy"])).max()))
    print(f"bf16 vs fp32, largest differences: {worst}")
    assert worst["smpl"] <= BF16_SMPL_ATOL and worst["joints"] <= BF16_JOINTS_ATOL and worst["box"] <= BF16_BOX_ATOL
    if not cpu_runs_bf16():
        pytest.skip("this CPU has no bf16 kernels (OpenVINO's CPU OPTIMIZATION_CAPABILITIES lists no BF16): the "
                    "bf16 hint runs HMR2 in fp32, so bf16 cannot change its outputs here; tracks and bounds held")
    assert worst["smpl"] > 0, "bf16 changed nothing: autocast did not reach the models"


def cpu_runs_bf16() -> bool:
    import openvino as ov
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
