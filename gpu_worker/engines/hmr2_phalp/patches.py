"""Scoped changes to torch and hmr2 behaviour the engine needs while it loads and runs upstream code
(trusted checkpoint loading, PHALP's hard-coded .cuda() on other devices, a sized ViT backbone)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator


@contextlib.contextmanager
def trusted_torch_load(device: Any = "cpu") -> Iterator[None]:
    """PHALP calls torch.load(path) with torch's default weights_only, which became True in torch
    2.6 and rejects these (trusted, locally verified) checkpoints, and without map_location, which
    fails on a machine without CUDA when a file holds CUDA tensors. Scoped to the load stages."""
    import torch

    previous = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    original = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("map_location", device)
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
        if previous is None:
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = previous


@contextlib.contextmanager
def cuda_calls_on(device: Any) -> Iterator[None]:
    """PHALP hard-codes tensor.cuda() in get_human_features, get_uv_distance and its pose
    predictor. On a CUDA device the runtime stage made the engine's device the current one, so
    .cuda() already lands there; on the CPU, .cuda() inside these calls stays on the CPU."""
    if device is None or device.type == "cuda":
        yield
        return
    import torch

    # a deliberate monkeypatch of a method, undone in `finally`: what mypy's method-assign forbids
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor.to(device)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


VIT_SIZE_KEYS = ("EMBED_DIM", "DEPTH", "NUM_HEADS")


@contextlib.contextmanager
def backbone_sized_by(model_cfg: Any) -> Iterator[None]:
    """hmr2's vit(cfg) always builds ViT-H (embed 1280, depth 32, 16 heads). A model_config.yaml
    that names MODEL.BACKBONE.EMBED_DIM / DEPTH / NUM_HEADS gets the same ViT class at that size
    (the test tier's small random checkpoints, docs/hmr2-phalp.md); the released config names none
    and gets upstream's vit(cfg) untouched."""
    backbone = model_cfg.MODEL.BACKBONE
    sizes = {key.lower(): int(backbone[key]) for key in VIT_SIZE_KEYS if key in backbone}
    if not sizes:
        yield
        return
    import hmr2.models.hmr2 as hmr2_module
    from hmr2.models.backbones.vit import ViT

    def sized_vit(cfg: Any) -> Any:
        # vit(cfg)'s other arguments, unchanged
        arguments = dict(img_size=(256, 192), patch_size=16, embed_dim=1280, depth=32, num_heads=16, ratio=1,
                         use_checkpoint=False, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.55)
        return ViT(**{**arguments, **sizes})

    original = hmr2_module.create_backbone
    hmr2_module.create_backbone = sized_vit
    try:
        yield
    finally:
        hmr2_module.create_backbone = original


def in_float32(value: Any) -> Any:
    """A network's outputs back in fp32 after autocast (PHALP turns them into numpy, which has no
    bfloat16): floating tensors in dicts, lists and tuples; anything else unchanged."""
    if hasattr(value, "is_floating_point") and value.is_floating_point():
        return value.float()
    if isinstance(value, dict):
        return {key: in_float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(in_float32(item) for item in value)
    return value


def instances_in_float32(instances: Any) -> Any:
    """detectron2 Instances with their floating fields (boxes, scores, masks) in fp32."""
    for name, field in list(instances.get_fields().items()):
        if hasattr(field, "tensor"):
            field.tensor = in_float32(field.tensor)
        else:
            instances.set(name, in_float32(field))
    return instances
