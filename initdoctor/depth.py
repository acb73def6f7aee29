"""Depth: which layers may be compared with which, the trends along them, and how a ratio is judged.

Layers are compared only with layers like them: same class, same weight shape, and the same module
path once numeric components are replaced (`blocks.3.conv2` -> `blocks.#.conv2`). Across unlike
layers, pooling and readouts fake trends (global average pooling gave a correct He CNN a 2e-6
"ratio" against its readout).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from . import thresholds as T
from . import vocab
from .stats import LayerStats, ModelStats

_NUM = re.compile(r"(?<![^.])\d+(?![^.])")


def path_pattern(name: str) -> str:
    return _NUM.sub("#", name)


def group_key(lay: LayerStats) -> tuple:
    return (lay.type, tuple(lay.weight_shape), path_pattern(lay.name))


def homologous_groups(stats: ModelStats) -> list[list[LayerStats]]:
    """Groups of at least MIN_GROUP comparable layers that ran, each in execution order."""
    groups: dict[tuple, list[LayerStats]] = {}
    for lay in stats.ran():
        if lay.kind == vocab.EMBEDDING:
            continue  # no fan-in: nothing propagates through them
        groups.setdefault(group_key(lay), []).append(lay)
    return [g for g in groups.values() if len(g) >= T.MIN_GROUP]


def _usable(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


@dataclass
class Trend:
    """One metric along one homologous group."""

    metric: str  # "signal" (q), "collapse" (r), "gradient" (G or G*q)
    layers: list[str]
    values: list[float]
    ratio: float  # last/first for signal and collapse, first/last for gradient (toward the input)
    normalized: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.values) - 1

    @property
    def per_layer(self) -> float:
        return self.ratio ** (1.0 / self.steps) if self.steps > 0 and self.ratio > 0 else float("nan")

    def start(self) -> str:
        """The layer after which the metric first leaves [1/2, 2] of its starting value."""
        seq = self.values if self.metric != "gradient" else self.values[::-1]
        names = self.layers if self.metric != "gradient" else self.layers[::-1]
        v0 = seq[0]
        for i, v in enumerate(seq[1:], 1):
            if not 0.5 <= v / v0 <= 2.0:
                return names[i - 1]
        return names[0]


def trends(stats: ModelStats) -> list[Trend]:
    """Every trend of every homologous group (computed once per examination; the rules share it)."""
    out: list[Trend] = []
    for group in homologous_groups(stats):
        live = [lay for lay in group if lay.weight_rms]  # zero tensors are deliberate or their own finding
        sig = [lay for lay in live if _usable(lay.q)]
        if len(sig) >= T.MIN_GROUP:
            q = [lay.q for lay in sig]
            out.append(Trend("signal", [lay.name for lay in sig], q, q[-1] / q[0]))
            col = [lay for lay in sig if _usable(lay.r)]
            if len(col) >= T.MIN_GROUP:
                r = [lay.r for lay in col]
                out.append(Trend("collapse", [lay.name for lay in col], r, r[-1] / r[0]))
        # A norm layer after a layer rescales its delta by 1/sqrt(q): compare G*q there.
        normalized = all(lay.normalized for lay in live)
        grad = [lay for lay in live if _usable(lay.grad_q) and (not normalized or _usable(lay.q))]
        if len(grad) >= T.MIN_GROUP:
            g = [lay.grad_q * (lay.q if normalized else 1.0) for lay in grad]
            out.append(Trend("gradient", [lay.name for lay in grad], g, g[0] / g[-1], normalized))
    return out


def severity_for_ratio(ratio: float, warn: float, error: float, low: bool) -> str | None:
    """'error'/'warning'/None for a ratio that should stay above `warn` (low=True) or below 1/warn."""
    if not math.isfinite(ratio):
        return None
    x = ratio if low else 1.0 / ratio
    if x < error:
        return "error"
    if x < warn:
        return "warning"
    return None


def tanh_depth(stats: ModelStats) -> int:
    """How many tanh-like nonlinearities the signal passes (5/3 turns chaotic deep: schemes.deep_tanh_gain)."""
    return sum(1 for a in stats.activations if a.kind in vocab.TANH_LIKE)
