"""Reporters: pure functions of a Diagnosis (text, JSON, markdown, TensorBoard, figures)."""

from __future__ import annotations

import json
import math
from typing import Any


def _clean(x: Any) -> Any:
    """JSON has no NaN/Inf: they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(diag) -> str:
    return json.dumps(_clean(diag.to_dict()), indent=2, allow_nan=False)
