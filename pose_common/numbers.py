"""Numbers on their way out as JSON, which has no NaN or Infinity."""
from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """NaN and infinities become None, recursively through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
