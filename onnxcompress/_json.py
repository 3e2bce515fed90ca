"""JSON-safe copies of report data (NaN/Inf → null, numpy scalars → Python)."""
from __future__ import annotations

import math


def json_clean(x):
    """JSON-safe copy: NaN/Inf → None, numpy scalars → Python."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return json_clean(x.item())
    return x
