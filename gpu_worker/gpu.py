"""GPU memory as the worker sees it, without importing torch when the engine did not."""
from __future__ import annotations

import sys
from typing import Optional


def gpu_memory_used() -> Optional[int]:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.memory_reserved())
    except Exception:
        return None
    return None
