"""Each model's GPU memory need, traced from the real upstream architectures without a GPU, without
real weights and without allocating them, under the rules a CUDA card runs them by. Writes the
numbers the plan reads (pose_common/memory_plan.json, tracked) and prints a table.

How: every model is built and run under torch's FakeTensorMode (tensors with shapes and dtypes, no
data) on fake CUDA tensors, and torch's MemTracker counts parameter and buffer bytes (exact) and the
peak of live activation bytes during one no-grad forward at the real input size.

- fp32: weights fp32, no autocast.
- fp16 and bf16: the engine's half-precision weights (gpu_worker/engines/hmr2_phalp/half.py: the
  Linear/Conv layers of the two ViT-H backbones, HMR2's `backbone` and ViTDet's `backbone.net`, in
  that dtype; norms, positional embeddings and everything else fp32), all under CUDA autocast in that
  dtype with its weight-cast cache off (as the engine runs it). The two differ: softmax in fp32 from
  an fp16 input is one fused kernel on CUDA (`_softmax(half_to_float=True)`), from bf16 it first
  copies its input to fp32 (aten/src/ATen/native/SoftMax.cpp), which ViTDet's 16x4096x4096
  global-attention maps feel.

CUDA autocast's op policy is torch's own, not a copy of its lists: the AutocastCUDA kernels (matmul,
linear, conv, bmm ... in fp16; softmax, layer_norm, sum, exp, pow ... in fp32; the rest in the widest
input type; torch's docs, "Autocast Op Reference") dispatch on fake CUDA tensors without a GPU
(`cuda_autocast`; tests/test_memplan.py holds softmax to fp32 and linear to fp16 under it).

What is traced: ViTDet-H's and RegNetY's preprocessing and backbone + feature pyramid at the input
the engine's own preprocessing gives a 1920x1080 frame, then, with the input and the pyramid still
held, detectron2's mask pasting (`paste_masks_in_image`, its CUDA path: every detection's mask at
the full frame, chunked by GPU_MEM_LIMIT) for the detector's detections per image (their ROI heads
have data-dependent shapes FakeTensorMode cannot follow: their parameters are counted, their masks
stand in as zeros); HMR2 (ViT-H + transformer head; the SMPL layer indexes
by tensor values, its buffers are counted) and PHALP's HMAR appearance network on 1 and 4 crops, whose
difference is the cost of a crop. PHALP's pose transformer is counted from its checkpoint's size
(pose_common/memplan.py). Run with the upstream tier's venv (a few minutes on 2 cores):

    .venv-upstream/bin/python -m bench.memory_plan   # writes pose_common/memory_plan.json
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "pose_common" / "memory_plan.json"
FRAME_HW = (1080, 1920)
CROPS = (1, 4)              # HMR2 and HMAR are traced at these crop counts
MASK_PX = 28                # the mask head's output, M x M, that paste_masks_in_image resizes
PRECISIONS = ("fp32", "fp16", "bf16")
HALF_DTYPES = {"fp16": lambda torch: torch.float16, "bf16": lambda torch: torch.bfloat16}
MB = 2 ** 20


@contextlib.contextmanager
def cuda_autocast(dtype: Any) -> Iterator[None]:
    """CUDA autocast on fake CUDA tensors: torch's own AutocastCUDA kernels decide each op's dtype.
    torch.autocast("cuda") switches itself off when no CUDA device is present ("CUDA is not
    available ... Disabling autocast"), so the switches it sets are set here directly. The weight-cast
    cache is off, as in the engine's autocast."""
    import torch

    previous = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_cache_enabled(False)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", previous[0])
        torch.set_autocast_dtype("cuda", previous[1])
        torch.set_autocast_cache_enabled(previous[2])


def precision_context(precision: str) -> contextlib.AbstractContextManager:
    import torch

    return cuda_autocast(HALF_DTYPES[precision](torch)) if precision in HALF_DTYPES else contextlib.nullcontext()


def hold_in_half(backbone: Any, dtype: Any) -> None:
    """The engine's half-precision weights (gpu_worker/engines/hmr2_phalp/half.py, one policy): the
    weight and bias of every Linear/Conv layer inside the backbone in `dtype`; norms, positional
    embeddings and everything else stay fp32."""
    from gpu_worker.engines.hmr2_phalp.half import is_cast_layer

    for module in backbone.modules():
        if is_cast_layer(module):
            retype_tensors(module, lambda tensor: tensor.to(dtype))


def onto_cuda(module: Any) -> None:
    """Parameters and buffers a model built from numpy arrays (torch.from_numpy ignores the default
    device) moved onto the fake CUDA device with everything else."""
    for sub in module.modules():
        retype_tensors(sub, lambda tensor: tensor.to("cuda"))


def retype_tensors(module: Any, change: Callable[[Any], Any]) -> None:
    """`change` applied to a module's own parameters and buffers, replaced in place: Module.to()
    swaps tensors, which FakeTensorMode's weak references forbid."""
    import torch

    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            if tensor is None:
                continue
            changed = change(tensor.detach())
            is_param = isinstance(tensor, torch.nn.Parameter)
            store[name] = torch.nn.Parameter(changed, requires_grad=tensor.requires_grad) if is_param else changed


def trace(build: Callable[[], Any], forwards: Mapping[str, Callable[[Any], Any]], precision: str,
          half_part: Optional[Callable[[Any], Optional[Any]]] = None) -> dict[str, dict[str, int]]:
    """Build once on fake CUDA, then each forward under its own MemTracker: weights, activation peak
    and the bytes of what the forward returns (bytes)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    rows: dict[str, dict[str, int]] = {}
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        with building_without_values():  # the ViTs read their drop-path rates with .item() while they build
            model = build().eval()
        onto_cuda(model)
        half = half_part(model) if half_part is not None and precision != "fp32" else None
        if half is not None:
            hold_in_half(half, HALF_DTYPES[precision](torch))
        for label, forward in forwards.items():
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker, torch.no_grad(), precision_context(precision):
                output = forward(model)
            peak = cuda_snapshot(tracker.get_tracker_snapshot("peak"))
            rows[label] = {
                "weights": int(peak[_MemRefType.PARAM] + peak[_MemRefType.BUFFER]),
                "activations": int(peak[_MemRefType.ACT] + peak[_MemRefType.TEMP] + peak[_MemRefType.OTH]),
                "outputs": tensor_bytes(output)}
    return rows


def cuda_snapshot(snapshot: Mapping[Any, Mapping[Any, int]]) -> Mapping[Any, int]:
    cuda = [values for device, values in snapshot.items() if getattr(device, "type", "") == "cuda"]
    if len(cuda) != 1:
        raise RuntimeError(f"expected the trace on one CUDA device, got {list(snapshot)}")
    return cuda[0]


def tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


@contextlib.contextmanager
def building_without_values() -> Iterator[None]:
    """Initialisers that read tensor values (data-dependent under FakeTensorMode) made value-free."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original, original_trunc_normal = torch.linspace, torch.nn.init.trunc_normal_
    torch.nn.init.trunc_normal_ = lambda tensor, *args, **kwargs: tensor  # checks values; values do not matter here

    class Rate(float):
        def item(self) -> float:
            return float(self)

    def linspace(*args: Any, **kwargs: Any) -> Any:
        """Plain numbers with .item(): a real tensor's .item() would still pass through the fake mode."""
        kwargs["device"] = "cpu"
        with unset_fake_temporarily():
            return [Rate(value) for value in original(*args, **kwargs).tolist()]

    torch.linspace = linspace
    try:
        yield
    finally:
        torch.linspace, torch.nn.init.trunc_normal_ = original, original_trunc_normal


def detector_input(cfg: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (H, W) a FRAME_HW frame has after the detector's resize, and after its padding: what its
    backbone sees."""
    import detectron2.data.transforms as T
    import numpy as np
    from detectron2.config import instantiate

    mapper = instantiate(cfg.dataloader.test.mapper)
    frame = T.AugInput(np.zeros((*FRAME_HW, 3), dtype=np.uint8))
    mapper.augmentations(frame)  # resizes frame.image in place
    height, width = frame.image.shape[:2]
    square = getattr(cfg.model.backbone, "square_pad", 0) or 0
    if square:
        return (height, width), (square, square)
    divisor = 32
    return (height, width), (-(-height // divisor) * divisor, -(-width // divisor) * divisor)


def detections_per_image(model: Any) -> int:
    """The final box predictor's test_topk_per_image (a cascade's last stage decides)."""
    import torch

    predictor = model.roi_heads.box_predictor
    final = predictor[-1] if isinstance(predictor, torch.nn.ModuleList) else predictor
    return int(final.test_topk_per_image)


def detector_rows(name: str) -> dict[str, Any]:
    """Per precision: the backbone's forward on the preprocessed frame, and the whole traceable
    forward (preprocess, backbone, then every detection's mask pasted while the input and the feature
    pyramid are still held, as GeneralizedRCNN.inference holds them); the pasting alone for 1 and
    for the detector's detections per image."""
    import torch
    import torch.nn.functional as F
    from detectron2.config import instantiate
    from detectron2.layers.mask_ops import paste_masks_in_image

    from gpu_worker.engines.hmr2_phalp import Settings, detector_config
    from gpu_worker.engines.hmr2_phalp.detectors import paste_masks_in_small_chunks
    from gpu_worker.engines.hmr2_phalp.half import vitdet_backbone

    paste_masks_in_small_chunks()  # the engine's pasting, as its detector sets it up
    cfg = detector_config(Settings.from_options({"detector": name}))
    (resized_h, resized_w), (height, width) = detector_input(cfg)
    found: dict[str, int] = {}

    def build() -> Any:
        model = instantiate(cfg.model)
        found["detections"] = detections_per_image(model)
        return model

    def preprocessed(model: Any) -> Any:
        """GeneralizedRCNN.preprocess_image: the resized frame on the device, normalised, padded."""
        image = torch.zeros(3, resized_h, resized_w)
        normalized = (image - model.pixel_mean) / model.pixel_std
        return F.pad(normalized, (0, width - resized_w, 0, height - resized_h))[None]

    def backbone(model: Any) -> Any:
        return model.backbone(preprocessed(model))

    def pasting_after(precision: str) -> Callable[[Any], Any]:
        def forward(model: Any) -> Any:
            images = preprocessed(model)
            features = model.backbone(images)
            detections = found["detections"]
            masks = torch.zeros(detections, MASK_PX, MASK_PX, dtype=mask_dtype(precision))
            pasted = paste_masks_in_image(masks, torch.zeros(detections, 4), FRAME_HW)
            return images, features, pasted
        return forward

    traced = {precision: trace(build, {"backbone": backbone, "forward": pasting_after(precision)}, precision,
                               vitdet_backbone)
              for precision in PRECISIONS}
    detections = found["detections"]
    return {"input": [height, width], "detections_per_image": detections, "traced": traced,
            "mask_paste": {precision: mask_paste_rows(precision, (1, detections)) for precision in PRECISIONS},
            "halved": "backbone.net (ViT-H)" if name == "vitdet" else ""}


def mask_dtype(precision: str) -> Any:
    """The masks' dtype at pasting: under autocast the mask head's logits come from a conv (the
    autocast dtype) and their sigmoid keeps it."""
    import torch

    return HALF_DTYPES[precision](torch) if precision in HALF_DTYPES else torch.float32


def mask_paste_rows(precision: str, counts: tuple[int, ...]) -> dict[str, int]:
    """detectron2's paste_masks_in_image on CUDA for `count` detections at the full frame."""
    import torch
    from detectron2.layers.mask_ops import paste_masks_in_image

    def paste(count: int) -> Callable[[Any], Any]:
        def forward(_: Any) -> Any:
            masks = torch.zeros(count, MASK_PX, MASK_PX, dtype=mask_dtype(precision))
            return paste_masks_in_image(masks, torch.zeros(count, 4), FRAME_HW)
        return forward

    rows = trace(torch.nn.Module, {str(count): paste(count) for count in counts}, precision)
    return {count: row["activations"] for count, row in rows.items()}


def hmr2_rows(config_path: str) -> dict[str, Any]:
    import torch
    import yaml
    from hmr2.configs import get_config
    from hmr2.models import HMR2

    released = yaml.safe_load(open(config_path))
    released["MODEL"]["BACKBONE"] = {"TYPE": "vit"}  # vit(cfg): ViT-H, as released
    released["MODEL"]["SMPL_HEAD"]["TRANSFORMER_DECODER"] = {
        "depth": 6, "heads": 8, "mlp_dim": 1024, "dim_head": 64, "dropout": 0.0, "emb_dropout": 0.0,
        "norm": "layer", "context_dim": 1280}
    full = Path(config_path).with_name("model_config_full.yaml")
    full.write_text(yaml.safe_dump(released))
    cfg = get_config(str(full), update_cachedir=True)

    def crops(count: int) -> Callable[[Any], Any]:
        def forward(model: Any) -> Any:
            """HMR2.forward_step's backbone and SMPL head; the SMPL layer after them indexes its
            kinematic tree by tensor values FakeTensorMode cannot follow (its buffers are counted as
            weights; its activations, a few 6890x3 meshes a crop, are not traced)."""
            features = model.backbone(torch.zeros(count, 3, 256, 256)[:, :, :, 32:-32])
            return model.smpl_head(features)
        return forward

    forwards = {str(count): crops(count) for count in CROPS}
    return {"traced": {precision: trace(lambda: HMR2(cfg, init_renderer=False), forwards, precision,
                                        lambda model: model.backbone)
                       for precision in PRECISIONS},
            "halved": "backbone (ViT-H)"}


def hmar_rows() -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf
    from phalp.configs.base import FullConfig
    from phalp.models.hmar.hmar import HMAR

    cfg = OmegaConf.structured(FullConfig)
    cfg.device = "cuda"

    def crops(count: int) -> Callable[[Any], Any]:
        def forward(model: Any) -> Any:
            return model(torch.zeros(count, 4, 256, 256))
        return forward

    forwards = {str(count): crops(count) for count in CROPS}
    return {"traced": {precision: trace(lambda: HMAR(cfg), forwards, precision) for precision in PRECISIONS},
            "halved": ""}


def in_mb(value: float) -> float:
    return round(value / MB, 1)


def crop_model_entry(rows: dict[str, Any]) -> dict[str, Any]:
    """Weights per precision; activations as fixed + per crop, from the 1- and 4-crop traces."""
    low, high = (str(count) for count in CROPS)
    entry: dict[str, Any] = {"weights_mb": {}, "fixed_mb": {}, "per_crop_mb": {}, "halved": rows["halved"]}
    for precision, traced in rows["traced"].items():
        per_crop = (traced[high]["activations"] - traced[low]["activations"]) / (CROPS[1] - CROPS[0])
        entry["weights_mb"][precision] = in_mb(traced[low]["weights"])
        entry["per_crop_mb"][precision] = in_mb(per_crop)
        # linear in the crops; a fraction of a MB below zero is the 512 B rounding, not a saving
        entry["fixed_mb"][precision] = in_mb(max(0.0, traced[low]["activations"] - per_crop * CROPS[0]))
    return entry


def detector_entry(rows: dict[str, Any]) -> dict[str, Any]:
    """forward_mb is what the plan reads: the larger of the backbone's peak and the pasting's, with
    what each moment also holds; the other figures say where it comes from."""
    detections = str(rows["detections_per_image"])
    return {
        "weights_mb": {p: in_mb(t["backbone"]["weights"]) for p, t in rows["traced"].items()},
        "forward_mb": {p: in_mb(t["forward"]["activations"]) for p, t in rows["traced"].items()},
        "backbone_mb": {p: in_mb(t["backbone"]["activations"]) for p, t in rows["traced"].items()},
        "features_mb": {p: in_mb(t["backbone"]["outputs"]) for p, t in rows["traced"].items()},
        "mask_paste_mb": {p: in_mb(r[detections]) for p, r in rows["mask_paste"].items()},
        "mask_paste_one_mb": {p: in_mb(r["1"]) for p, r in rows["mask_paste"].items()},
        "detections_per_image": rows["detections_per_image"],
        "input": rows["input"],
        "halved": rows["halved"],
    }


def conditions() -> dict[str, Any]:
    import torch
    from detectron2.layers import mask_ops

    return {
        "tool": "bench/memory_plan.py",
        "torch": torch.__version__,
        "device": "fake CUDA tensors under FakeTensorMode (no GPU); MemTracker rounds to 512 B blocks",
        "policy": "cuda-autocast",
        "autocast": "fp16, bf16: torch's own AutocastCUDA kernels, switched on directly (cuda_autocast), "
                    "weight-cast cache off",
        "half_weights": "fp16, bf16: the Linear/Conv layers of the two ViT-H backbones in that dtype "
                        "(gpu_worker/engines/hmr2_phalp/half.py); norms, positional embeddings, all else fp32",
        "precisions": list(PRECISIONS),
        "frame": list(FRAME_HW),
        "crops": list(CROPS),
        "mask_px": MASK_PX,
        "gpu_mem_limit": mask_ops.GPU_MEM_LIMIT,  # as the engine sets it (detectors.paste_masks_in_small_chunks)
    }


def measure() -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "upstream"))
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from synthetic import make_cache  # the tier's synthetic SMPL model: HMR2 and HMAR build their SMPL from it
        cache = make_cache(Path(tmp))
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "hmr2": lambda: crop_model_entry(hmr2_rows(cache.paths()["hmr2_model_config"])),
            "hmar": lambda: crop_model_entry(hmar_rows()),
            "vitdet": lambda: detector_entry(detector_rows("vitdet")),
            "regnety": lambda: detector_entry(detector_rows("regnety")),
        }
        for name, step in steps.items():
            started = time.perf_counter()
            models[name] = step()  # a model that cannot be traced stops the run: the plan needs every one
            models[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(name, json.dumps(models[name]), flush=True)
    return {"conditions": conditions(), "models": models}


def print_table(results: dict[str, Any]) -> None:
    for name, entry in results["models"].items():
        for precision in PRECISIONS:
            if "per_crop_mb" in entry:
                what = f"fixed {entry['fixed_mb'][precision]:7.1f}  per crop {entry['per_crop_mb'][precision]:6.1f}"
            else:
                what = (f"forward {entry['forward_mb'][precision]:7.1f}"
                        f"  backbone {entry['backbone_mb'][precision]:7.1f}"
                        f"  features {entry['features_mb'][precision]:5.1f}"
                        f"  mask paste x{entry['detections_per_image']} {entry['mask_paste_mb'][precision]:7.1f}"
                        f" (one {entry['mask_paste_one_mb'][precision]:.1f})")
            print(f"{name:<8} {precision}  weights {entry['weights_mb'][precision]:7.1f} MB  {what}")


def main() -> int:
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    results = measure()
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
