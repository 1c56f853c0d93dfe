"""Half-precision weights for the two ViT-H backbones (gpu_worker/engines/hmr2_phalp/half.py): the
torch behaviour the policy rests on, the policy changing no autocast result (small models), the
engine holding both backbones in half on a CUDA-shaped torch (tests/cuda_shim.py), and the
full-size models (ViT-H HMR2, ViTDet-H; random weights) in half weights against fp32.

The full-size runs are CPU kernels: bf16 and fp16 matrix products are emulated on a CPU without
avx512_bf16 / avx512_fp16 (4-5x slower than fp32 there; convolutions ~100x), so HMR2 runs on one
crop and ViTDet-H's ViT on one 224x224 input (the model full size, the input small: 14x14 tokens,
one attention window). Their numbers are the table in docs/hmr2-phalp.md ("Half-precision
weights: outputs against fp32"). A card differs: other kernels, and CUDA autocast runs softmax and
layer_norm in fp32 where CPU autocast keeps the input's half dtype (probably making the CPU's
differences the larger); the bounds are the CPU's measure, with room, not a card's.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import sys

import numpy as np
import pytest

from gpu_worker.engines.hmr2_phalp import Settings, backbone_sized_by
from gpu_worker.engines.hmr2_phalp.half import cast_backbone, half_weights_dtype, is_cast_layer, vitdet_backbone

from cuda_shim import cuda_shim
from support import REPO

PRECISIONS = ("bf16", "fp16")
# Measured on this tier's full-size models (random weights, seeded; the same on every run of this
# CPU's kernels), max / median absolute difference against fp32, and the bound each test holds
# (about twice the max). HMR2 on one crop: 2D keypoints in pixels of its 256-px crop, rotations
# (matrix entries), betas, the weak-perspective camera (s, tx, ty), 3D joints in metres. ViTDet-H's
# ViT on a 224x224 frame: its features, relative to the fp32 features' standard deviation.
#
#                      bf16: max    median   bound     fp16: max    median   bound
#   keypoints_2d_px        0.329    0.132    0.7           0.192    0.0782   0.4
#   global_orient          0.0046   0.00107  0.01          0.00151  0.000813 0.003
#   body_pose              0.022    0.00309  0.05          0.00455  0.000304 0.01
#   betas                  0.0124   0.00555  0.025         0.00129  0.000295 0.003
#   camera                 0.00274  0.00215  0.006         0.00127  0.000294 0.003
#   keypoints_3d_m         0.0133   0.00253  0.03          0.00193  0.000311 0.004
#   ViTDet ViT features    0.0371   0.00558  0.08          0.00496  0.000635 0.01
HMR2_BOUNDS = {
    "bf16": {"keypoints_2d_px": 0.7, "global_orient": 0.01, "body_pose": 0.05, "betas": 0.025,
             "camera": 0.006, "keypoints_3d_m": 0.03},
    "fp16": {"keypoints_2d_px": 0.4, "global_orient": 0.003, "body_pose": 0.01, "betas": 0.003,
             "camera": 0.003, "keypoints_3d_m": 0.004},
}
VITDET_BOUNDS = {"bf16": {"vit_features": 0.08}, "fp16": {"vit_features": 0.01}}
DETECTOR_INPUT = 224
# the engine test's small detector reads 128-px images with 2 proposals: on this CPU a convolution
# in half precision runs ~100x slower than in fp32 (no native kernel), and the pyramid and ROI heads
# are convolutions
CHEAP_DETECTOR_HEADS = ["dataloader.test.mapper.augmentations.0.short_edge_length=128",
                        "dataloader.test.mapper.augmentations.0.max_size=128",
                        "model.backbone.square_pad=128",
                        "model.proposal_generator.post_nms_topk=[1000,2]"]


def bench_hmr2_cpu():
    """bench/hmr2_cpu.py: the full-size HMR2 and its crops (the repository root is no package path here)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import bench.hmr2_cpu
    return bench.hmr2_cpu


def torch_dtype(precision: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def cpu_autocast(precision: str | None):
    import torch
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch_dtype(precision), cache_enabled=False)


def weight_layout(backbone) -> dict[str, set[str]]:
    """The dtypes of a backbone's parameters: its Linear/Conv layers', its norms', the rest's."""
    layout: dict[str, set[str]] = {"linear_conv": set(), "norm": set(), "other": set()}
    owned = set()
    for module in backbone.modules():
        kind = "linear_conv" if is_cast_layer(module) else "norm" if is_norm(module) else None
        if kind is None:
            continue
        for param in module.parameters(recurse=False):
            layout[kind].add(precision_name(param.dtype))
            owned.add(id(param))
    layout["other"] = {precision_name(p.dtype) for p in backbone.parameters() if id(p) not in owned}
    assert layout["norm"] and layout["other"], "no norm or embedding found: the check would pass on anything"
    return layout


def is_norm(module) -> bool:
    from torch import nn
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
        type(module).__name__ in ("LayerNorm", "FrozenBatchNorm2d")


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def held_in(backbone, precision: str):
    """The backbone cast in place for the block, then given its fp32 tensors back (kept, not copied)."""
    originals = {name: param.data for name, param in backbone.named_parameters()}
    try:
        yield cast_backbone(backbone, torch_dtype(precision))
    finally:
        for name, param in backbone.named_parameters():
            param.data = originals[name]


def flat(outputs, prefix: str = "") -> dict:
    """Nested output dicts as {dotted name: fp32 tensor}."""
    found = {}
    for key, value in outputs.items():
        if isinstance(value, dict):
            found.update(flat(value, f"{prefix}{key}."))
        elif hasattr(value, "is_floating_point") and value.is_floating_point():
            found[f"{prefix}{key}"] = value.float()
    return found


# --- the torch behaviour the policy rests on -----------------------------------------------------

def test_half_weights_only_on_cuda_in_a_half_precision():
    import torch

    assert half_weights_dtype(torch, "fp16", "cuda") is torch.float16
    assert half_weights_dtype(torch, "bf16", "cuda") is torch.bfloat16
    for precision, device_type in (("fp32", "cuda"), ("bf16", "cpu"), ("fp16", "cpu"), ("fp32", "cpu")):
        assert half_weights_dtype(torch, precision, device_type) is None


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cpu_autocast_norms_take_half_inputs_with_fp32_weights_and_refuse_the_reverse(precision):
    """CPU autocast runs layer_norm in its input's dtype (CUDA autocast runs it in fp32): an fp32
    norm given a half input works, a half norm given the fp32 residual stream is refused. So norms
    stay fp32; a policy that cast them fails on the CPU, and on a card would only lose bits."""
    import torch
    import torch.nn.functional as F

    half = torch_dtype(precision)
    x, weight, bias = torch.randn(4, 16), torch.rand(16) + 0.5, torch.randn(16)
    with cpu_autocast(precision):
        assert F.layer_norm(x, (16,), weight, bias).dtype == torch.float32
        assert F.layer_norm(x.to(half), (16,), weight, bias).dtype == half
        assert F.linear(x, torch.randn(8, 16).to(half)).dtype == half
        assert (F.linear(x, torch.randn(16, 16).to(half)) + x).dtype == torch.float32  # the residual stays fp32
        with pytest.raises(RuntimeError, match="mixed dtype"):
            F.layer_norm(x, (16,), weight.to(half), bias.to(half))


# --- the policy changes no autocast result (the tier's small models) -------------------------------

def small_hmr2(cache):
    import torch
    from hmr2.configs import get_config
    from hmr2.models import HMR2

    cfg = get_config(cache.paths()["hmr2_model_config"], update_cachedir=True)
    torch.manual_seed(0)
    with backbone_sized_by(cfg):
        return HMR2(cfg, init_renderer=False).eval()


def small_vitdet(cache):
    import torch
    from detectron2.config import instantiate

    from gpu_worker.engines.hmr2_phalp import detector_config

    torch.manual_seed(0)
    return instantiate(detector_config(Settings.from_options(cache.options())).model).eval()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_half_weights_compute_exactly_what_autocast_over_fp32_weights_computed(cache, precision):
    """Autocast rounds fp32 weights to the half dtype at every Linear/Conv call; holding them rounded
    gives the same numbers, bit for bit, as long as everything else stays fp32 (a positional
    embedding cast too would put the residual stream in half and change them)."""
    import torch

    crops = bench_hmr2_cpu().crops
    hmr2, vitdet = small_hmr2(cache), small_vitdet(cache)
    batch, image = crops(2), torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    # ViTDet's ViT alone: its pyramid and heads keep fp32 weights and would get the same inputs
    runs = {"hmr2": lambda model: flat(model(batch)), "vitdet": lambda model: flat(model.backbone.net(image))}
    for name, model in (("hmr2", hmr2), ("vitdet", vitdet)):
        backbone = model.backbone if name == "hmr2" else vitdet_backbone(model)
        reference = copy.deepcopy(model)
        cast = cast_backbone(backbone, torch_dtype(precision))
        assert cast.tensors > 0 and weight_layout(backbone)["linear_conv"] == {precision_name(torch_dtype(precision))}
        with torch.no_grad(), cpu_autocast(precision):
            expected, got = runs[name](reference), runs[name](model)
        assert set(got) == set(expected)
        different = [key for key in expected if not torch.equal(got[key], expected[key])]
        assert not different, f"{name}: {different}"


# --- the engine on a CUDA-shaped torch -----------------------------------------------------------

def first_frame(frames_dir) -> np.ndarray:
    import cv2
    return cv2.imread(str(sorted(frames_dir.glob("*.jpg"))[0]))[:, :, ::-1].copy()


def loaded_engine(options: dict, device: str, skip: tuple[str, ...] = ()):
    from gpu_worker.engines.hmr2_phalp import HMR2PhalpEngine

    engine = HMR2PhalpEngine(device, options)
    for stage in engine.stages():
        if stage.name not in skip:
            stage.run()
    return engine


def test_the_cuda_engine_holds_both_vit_backbones_in_half_and_nothing_else(cache, frames_dir, monkeypatch):
    """fp16, what precision=auto picks on a card the fp32 plan does not fit, with the shim's autocast
    in fp16 too (bf16 takes the same path with the other dtype; its cast is checked above)."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    precision = "fp16"
    half, rgb = torch_dtype(precision), first_frame(frames_dir)
    options = cache.options(precision=precision)
    options["detector_overrides"] += CHEAP_DETECTOR_HEADS
    with cuda_shim(physical=1, total_mb=8192, autocast_as_asked=True) as shim:
        engine = loaded_engine(options, "cuda")
        persons = engine.infer_image(rgb)
    assert ("autocast", str(half)) in shim.calls and shim.indices_used() == {0}
    backbones = {"hmr2_backbone": engine._hmr2.backbone, "vitdet_backbone": engine._detector.model.backbone.net}
    for name, backbone in backbones.items():
        assert weight_layout(backbone) == {"linear_conv": {precision_name(half)}, "norm": {"float32"},
                                           "other": {"float32"}}, name
        cast = engine.half_weights[name]
        assert cast.bytes_after * 2 == cast.bytes_before and param_bytes(backbone) == cast.bytes_after + cast.kept_fp32_bytes
    in_half = {id(p) for backbone in backbones.values() for m in backbone.modules() if is_cast_layer(m)
               for p in m.parameters(recurse=False)}
    # everything else the engine holds (SMPL head and body model, the detector's pyramid and ROI
    # heads, HMAR, PHALP's pose predictor) stays fp32
    everything = dict(engine._phalp.named_parameters(prefix="phalp"))
    everything.update(engine._detector.model.named_parameters(prefix="detector"))
    wrong = [name for name, p in everything.items() if p.dtype != (half if id(p) in in_half else torch.float32)]
    assert not wrong, wrong[:10]
    assert set(engine.describe()["half_weights"]) == set(backbones)
    from detectron2.layers import mask_ops

    from gpu_worker.engines.hmr2_phalp.detectors import MASK_PASTE_CHUNK_BYTES
    assert mask_ops.GPU_MEM_LIMIT == MASK_PASTE_CHUNK_BYTES  # masks pasted in the chunks the plan counts
    # the same image on the CPU, fp32 weights under the same autocast: the same people, exactly
    on_cpu = loaded_engine({**options, "hmr2_cpu_runtime": "torch"}, "cpu", skip=("tracker",))
    assert not on_cpu.half_weights
    expected = on_cpu.infer_image(rgb)
    assert persons and len(persons) == len(expected)
    for got, want in zip(persons, expected):
        for key in ("bbox_xyxy", "keypoints_2d", "keypoints_3d"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_the_cpu_engine_keeps_fp32_weights_in_bf16(cache):
    """On the CPU the weights stay fp32 (half.py says why): the torch HMR2 and the detector."""
    import torch

    engine = loaded_engine(cache.options(precision="bf16", hmr2_cpu_runtime="torch"), "cpu", skip=("tracker",))
    assert not engine.half_weights and "half_weights" not in engine.describe()
    for model in (engine._hmr2, engine._detector.model):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


# --- the full-size models against fp32 ---------------------------------------------------------------

def hmr2_outputs(model, batch, precision: str | None) -> dict:
    import torch

    from gpu_worker.engines.hmr2_phalp.patches import in_float32

    with torch.no_grad(), cpu_autocast(precision):
        out = in_float32(model(batch))
    params = out["pred_smpl_params"]
    return {"keypoints_2d_px": out["pred_keypoints_2d"] * model.cfg.MODEL.IMAGE_SIZE,
            "global_orient": params["global_orient"], "body_pose": params["body_pose"], "betas": params["betas"],
            "camera": out["pred_cam"], "keypoints_3d_m": out["pred_keypoints_3d"]}


def abs_differences(reference: dict, other: dict, scale: dict | None = None) -> dict[str, dict[str, float]]:
    rows = {}
    for name, ref in reference.items():
        diff = (other[name] - ref).abs() / (scale[name] if scale else 1.0)
        rows[name] = {"max": float(diff.max()), "median": float(diff.median())}
    return rows


@pytest.fixture(scope="module")
def hmr2_against_fp32(cache):
    """The full-size HMR2 (ViT-H, the released head; random weights) on one crop: fp32, then its
    backbone held in bf16 and in fp16 under autocast. Only the numbers leave: the 2.6 GB model goes."""
    bench = bench_hmr2_cpu()
    model, batch = bench.full_size_hmr2(cache), bench.crops(1)
    fp32_bytes = param_bytes(model.backbone)
    reference = hmr2_outputs(model, batch, None)
    found = {}
    for precision in PRECISIONS:
        with held_in(model.backbone, precision) as cast:
            found[precision] = {"rows": abs_differences(reference, hmr2_outputs(model, batch, precision)),
                                "layout": weight_layout(model.backbone), "cast": cast,
                                "bytes": param_bytes(model.backbone), "fp32_bytes": fp32_bytes}
    del model
    gc.collect()
    print_rows("HMR2 (ViT-H, 1 crop)", found)
    return found


def full_size_vitdet():
    """ViTDet-H as PHALP configures it (random weights, seeded), reading 224x224 inputs."""
    import torch
    from detectron2.config import instantiate

    from gpu_worker.engines.hmr2_phalp.detectors import detector_config

    size = [f"dataloader.test.mapper.augmentations.0.short_edge_length={DETECTOR_INPUT}",
            f"dataloader.test.mapper.augmentations.0.max_size={DETECTOR_INPUT}",
            f"model.backbone.square_pad={DETECTOR_INPUT}"]
    cfg = detector_config(Settings.from_options({"detector": "vitdet", "detector_overrides": size}))
    torch.manual_seed(0)
    return instantiate(cfg.model).eval(), instantiate(cfg.dataloader.test.mapper).augmentations


def detector_input(model, augmentations, bgr: np.ndarray):
    """What ViTDet's ViT reads for a frame: LazyConfigPredictor's resize, the model's normalisation
    and square padding."""
    import detectron2.data.transforms as T
    import torch

    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    resized = augmentations(T.AugInput(rgb)).apply_image(rgb)
    image = torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
    return model.preprocess_image([{"image": image}]).tensor


def vit_features(net, image, precision: str | None) -> dict:
    import torch

    with torch.no_grad(), cpu_autocast(precision):
        return {"vit_features": net(image)["last_feat"].float()}


@pytest.fixture(scope="module")
def vitdet_against_fp32(frames_dir, hmr2_against_fp32):
    """ViTDet-H's ViT on a frame of the clip: fp32, then held in bf16 and in fp16 under autocast.
    The features, not boxes: the random detector scores every proposal near 1 (the cache's person
    bias), so any rounding reorders which boxes survive NMS and top-k, a property of random weights;
    and its pyramid and ROI heads are convolutions, ~100x slower in half than in fp32 on this CPU,
    with fp32 weights the policy leaves as they were. After the HMR2 numbers: one model at a time."""
    import cv2

    model, augmentations = full_size_vitdet()
    image = detector_input(model, augmentations, cv2.imread(str(sorted(frames_dir.glob("*.jpg"))[0])))
    net = vitdet_backbone(model)
    fp32_bytes = param_bytes(net)
    reference = vit_features(net, image, None)
    scale = {name: float(value.std()) for name, value in reference.items()}
    found = {}
    for precision in PRECISIONS:
        with held_in(net, precision) as cast:
            found[precision] = {"rows": abs_differences(reference, vit_features(net, image, precision), scale),
                                "layout": weight_layout(net), "cast": cast, "bytes": param_bytes(net),
                                "fp32_bytes": fp32_bytes}
    del model, net
    gc.collect()
    print_rows(f"ViTDet-H's ViT ({DETECTOR_INPUT}x{DETECTOR_INPUT} input), relative to the fp32 features' std", found)
    return found


def print_rows(title: str, found: dict) -> None:
    print(f"\n{title}")
    for precision, result in found.items():
        for name, row in result["rows"].items():
            print(f"  {precision} {name:<16} max {row['max']:.3g}  median {row['median']:.3g}")
        print(f"  {precision} {result['cast'].describe()}")


def assert_held_in_half(result: dict, precision: str) -> None:
    half = precision_name(torch_dtype(precision))
    assert result["layout"] == {"linear_conv": {half}, "norm": {"float32"}, "other": {"float32"}}
    cast = result["cast"]
    assert cast.bytes_after * 2 == cast.bytes_before and cast.bytes_before > 2.4e9  # ViT-H's Linear/Conv
    assert result["bytes"] == cast.bytes_after + cast.kept_fp32_bytes and cast.kept_fp32_bytes < 0.01 * cast.bytes_after
    assert result["bytes"] < 0.51 * result["fp32_bytes"]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_full_size_hmr2_with_half_backbone_weights_against_fp32(hmr2_against_fp32, precision):
    assert_within_bounds(hmr2_against_fp32[precision], precision, HMR2_BOUNDS[precision], "body_pose")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_full_size_vitdet_with_half_backbone_weights_against_fp32(vitdet_against_fp32, precision):
    assert_within_bounds(vitdet_against_fp32[precision], precision, VITDET_BOUNDS[precision], "vit_features")


def assert_within_bounds(result: dict, precision: str, bounds: dict, must_change: str) -> None:
    """Held in half, every output within its bound of fp32, and `must_change` not identical to it."""
    assert_held_in_half(result, precision)
    too_far = {name: row for name, row in result["rows"].items() if row["max"] > bounds[name]}
    assert not too_far, too_far
    assert result["rows"][must_change]["max"] > 0, "nothing changed: the half weights did not run"
