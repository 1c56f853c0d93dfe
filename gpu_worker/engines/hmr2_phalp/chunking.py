"""A batched forward run over at most `chunk` rows at a time. PHALP hands every crop of a frame to its
HMAR in one batch (up to the detector's detections per image); the memory plan sizes how many crops
one forward may take (pose_common.memplan.crop_chunk), and this keeps to it. Outputs are put back
together as the unchunked forward returns them: tensors concatenated along dim 0, dicts, lists and
tuples of them rebuilt, anything else (a batch-independent value, a 0-dim tensor) taken from the
first chunk."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

Output = TypeVar("Output")


def run_in_chunks(forward: Callable[[Any], Output], batch: Any, chunk: int) -> Output:
    """forward(batch) computed over slices of at most `chunk` rows along dim 0."""
    if chunk < 1:
        raise ValueError(f"a crop chunk must be at least 1, not {chunk}")
    rows = int(batch.shape[0])
    if rows <= chunk:
        return forward(batch)
    return concatenate([forward(batch[start:start + chunk]) for start in range(0, rows, chunk)])


def concatenate(parts: list[Any]) -> Any:
    """The chunks' outputs joined along the batch dimension, in the structure of one output."""
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0) if first.dim() > 0 else first
    if isinstance(first, dict):
        return type(first)((key, concatenate([part[key] for part in parts])) for key in first)
    if isinstance(first, (list, tuple)):
        joined = [concatenate([part[i] for part in parts]) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    return first


def chunked(forward: Callable[[Any], Output], chunk: int) -> Callable[[Any], Output]:
    """`forward` made to take any batch, run `chunk` rows at a time."""
    def forward_in_chunks(batch: Any) -> Output:
        return run_in_chunks(forward, batch, chunk)
    return forward_in_chunks
