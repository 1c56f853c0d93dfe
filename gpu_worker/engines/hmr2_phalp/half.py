"""Half-precision weights for the two ViT-H backbones: HMR2's `backbone` and ViTDet's ViT
(`model.backbone.net` inside the detectron2 model), about 2.6 GB each in fp32.

The policy (the memory plan counts exactly this: the two backbones' Linear/Conv parameters in 2
bytes, normalisation parameters in 4, everything else in fp32):

- **cast to the run's half dtype** (fp16 or bf16): the weight and bias of every Linear and
  convolution inside the two backbones, nearly all of their bytes. Under autocast these layers
  already ran in that dtype: autocast rounded the fp32 weights at every call, so holding them rounded
  changes no result, only the memory.
- **kept fp32, normalisation** (LayerNorm and any other norm): autocast runs layer_norm in fp32 on
  CUDA (it casts the input and the weights up), so half norm weights would only lose bits; on the
  CPU, autocast leaves layer_norm alone and torch's kernel refuses an fp32 input with half weights
  ("mixed dtype (CPU): expect parameter to have scalar type of Float"), while an fp32 norm takes a
  half input (torch 2.14.1, checked in tests/upstream/test_half_weights.py).
- **kept fp32, positional embeddings** (HMR2's `pos_embed`; ViTDet's `pos_embed`, `rel_pos_h/w`),
  kilobytes: the patch embedding's half output plus an fp32 embedding is fp32 (type promotion), and
  every block adds its half output to that fp32 residual stream, so the 32 blocks accumulate in fp32,
  as in the mixed-precision training both networks had (HMR2 `precision: 16`, ViTDet AMP).
- **untouched**: everything outside the two backbones (HMR2's SMPL head and body model, the
  detector's pyramid and ROI heads, HMAR, PHALP's pose predictor), and RegNetY (no ViT-H).

Half weights only run under autocast (a half-weight Linear given an fp32 input outside autocast is
a dtype error); the engine runs every call of these models under its autocast.

When: a CUDA device with engine.options.precision resolved to fp16 or bf16. Not on the CPU: there
HMR2 runs through OpenVINO (cpu_runtime.py), converted from the fp32 torch modules; with
hmr2_cpu_runtime=torch, or for the detector, the weights' memory is host RAM, not the card's, and
keeping fp32 keeps a CPU bf16 run exactly the autocast run it was before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

HALF_PRECISIONS = ("fp16", "bf16")


def half_weights_dtype(torch: Any, precision: str, device_type: str) -> Optional[Any]:
    """The dtype the backbones' weights are held in for this run, or None to keep fp32."""
    if device_type != "cuda" or precision not in HALF_PRECISIONS:
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def is_cast_layer(module: Any) -> bool:
    """A Linear or a convolution (detectron2's Conv2d is an nn.Conv2d): the layers held in half."""
    from torch import nn

    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                               nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


@dataclass(frozen=True)
class HalfWeights:
    """What cast_backbone did: the dtype, how many tensors and bytes it cast, the fp32 bytes it kept."""
    dtype: str
    tensors: int
    bytes_before: int
    bytes_after: int
    kept_fp32_bytes: int

    def describe(self) -> str:
        mb = 2 ** 20
        return (f"{self.dtype}: {self.tensors} Linear/Conv tensors {self.bytes_before / mb:.0f} MB -> "
                f"{self.bytes_after / mb:.0f} MB, {self.kept_fp32_bytes / mb:.1f} MB kept fp32")


def cast_backbone(backbone: Any, dtype: Any) -> HalfWeights:
    """Holds the Linear/Conv weights and biases of `backbone` in `dtype`, in place; every other
    parameter and buffer (norms, positional embeddings) stays as it is. Only the layer's own
    parameters: a detectron2 Conv2d's `norm` child is a norm, kept fp32."""
    tensors = before = after = 0
    for module in backbone.modules():
        if not is_cast_layer(module):
            continue
        for param in module.parameters(recurse=False):
            before += param.numel() * param.element_size()
            param.data = param.data.to(dtype)
            after += param.numel() * param.element_size()
            tensors += 1
    kept = sum(p.numel() * p.element_size() for p in backbone.parameters() if p.dtype != dtype)
    kept += sum(b.numel() * b.element_size() for b in backbone.buffers() if b.is_floating_point())
    return HalfWeights(str(dtype).replace("torch.", ""), tensors, before, after, kept)


def vitdet_backbone(detector_model: Any) -> Optional[Any]:
    """ViTDet's ViT inside a detectron2 model (its SimpleFeaturePyramid's `net`); None for another
    detector (RegNetY's backbone is no ViT-H and stays fp32)."""
    from detectron2.modeling.backbone.vit import ViT

    net = getattr(getattr(detector_model, "backbone", None), "net", None)
    return net if isinstance(net, ViT) else None
