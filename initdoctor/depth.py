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
    normalized: bool = False  # gradient compared as G*q: a norm rescales it
    notes: list[str] = field(default_factory=list)
    relative_to: str = ""  # "output": q of the layer's own output (a norm follows it); "stream": of the
    # stream its branch writes into (the next norm over the last dim, pre-norm transformers)
    raw_ratio: float | None = None  # gradient: G first/last before relating it to any scale
    stream_rms: tuple[float, float] | None = None  # "stream": its RMS at the first and the last layer

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
        # A norm rescales the gradient that flows back through it by 1/sqrt(q) of what it normalizes,
        # so behind one compare G*q: q of the stream a layer's branch writes into when every member
        # reaches a norm over the last dim (transformers, whose stream grows from the embeddings'
        # scale: the norm sees the stream, not the branch alone), else q of the layer's own output
        # when a norm follows it directly (BatchNorm after a convolution).
        stream = bool(live) and all(_usable(lay.stream_q) for lay in live)
        own = not stream and all(lay.normalized for lay in live)
        relative_to = "output" if own else "stream" if stream else ""
        grad = [lay for lay in live if _usable(lay.grad_q) and _usable(_scale(lay, relative_to))]
        if len(grad) >= T.MIN_GROUP:
            g = [lay.grad_q * _scale(lay, relative_to) for lay in grad]
            rms = (math.sqrt(grad[0].stream_q), math.sqrt(grad[-1].stream_q)) if stream else None
            out.append(Trend("gradient", [lay.name for lay in grad], g, g[0] / g[-1], own or stream,
                             relative_to=relative_to, raw_ratio=grad[0].grad_q / grad[-1].grad_q,
                             stream_rms=rms))
    return out


def _scale(lay: LayerStats, relative_to: str) -> float | None:
    return lay.q if relative_to == "output" else lay.stream_q if relative_to == "stream" else 1.0


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


@dataclass(frozen=True)
class ResidualScale:
    """A residual projection's scale relative to the layers that feed its branch.

    GPT-2 (and nanoGPT, Megatron) draw every weight at one std and the layers whose output a skip
    connection adds into the stream at that std / sqrt(N), N the number of such residual layers, so
    the stream's variance does not grow with depth (GPT-2 paper, 2.3). Recognised when every member
    of a homologous group of residual projections sits at 1/sqrt(N) of its branch's input layers, by
    std (`per_fan` False) or by std * sqrt(fan_in) (True), and not merely because its fan is larger.
    """

    ratio: float  # its std / its branch inputs' std (both times sqrt(fan_in) when per_fan)
    residual_layers: int  # N
    per_fan: bool
    mates: tuple[str, ...]  # the branch's input layers it is compared with
    deliberate: bool  # True: measured so on this layer's group; False: the factor its peers show


def residual_scales(stats: ModelStats) -> dict[str, ResidualScale]:
    """Residual projections drawn at 1/sqrt(N) of their branches (and, once a model shows it, the
    factor for its other residual projections, should they be re-drawn)."""
    writers = [lay for lay in stats.ran() if lay.residual and lay.kind != vocab.EMBEDDING and lay.weight_std]
    n = len(writers)
    if n < 2:
        return {}
    by_name = {lay.name: lay for lay in stats.layers}

    def mates(lay: LayerStats) -> list[LayerStats]:
        return [m for m in (by_name.get(f) for f in lay.fed_from)
                if m is not None and not m.residual and m.kind != vocab.EMBEDDING and m.weight_std and m.fan_in]

    def near(x: float, target: float) -> bool:
        return 1 / T.RESIDUAL_VAR_TOL <= x * x / target <= T.RESIDUAL_VAR_TOL

    groups: dict[tuple, list[LayerStats]] = {}
    for lay in writers:
        groups.setdefault(group_key(lay), []).append(lay)
    out: dict[str, ResidualScale] = {}
    found: list[bool] = []
    for group in groups.values():
        rows = []
        for lay in group:
            ms = mates(lay)
            if not ms or not lay.fan_in:
                break
            raw = lay.weight_std / (sum(m.weight_std for m in ms) / len(ms))
            fan = raw * math.sqrt(lay.fan_in / (sum(m.fan_in for m in ms) / len(ms)))
            rows.append((lay, raw, fan, tuple(m.name for m in ms)))
        if len(rows) < T.MIN_GROUP or len(rows) < len(group):
            continue
        # by std first (one std for every weight, as GPT-2 draws), unless the fan alone explains it
        if all(near(r, 1 / n) for _, r, _, _ in rows) and not all(near(f, 1.0) for _, _, f, _ in rows):
            per_fan = False
        elif all(near(f, 1 / n) for _, _, f, _ in rows):
            per_fan = True
        else:
            continue
        found.append(per_fan)
        for lay, raw, fan, names in rows:
            out[lay.name] = ResidualScale(fan if per_fan else raw, n, per_fan, names, True)
    if found:
        for lay in writers:
            ms = mates(lay)
            if lay.name not in out and ms:
                out[lay.name] = ResidualScale(1 / math.sqrt(n), n, found[0], tuple(m.name for m in ms), False)
    return out


def own_std(stats: ModelStats) -> float | None:
    """The std the model draws its weight layers at (the median over those that ran), leaving out what
    is drawn by another rule: embeddings, residual projections, tied and parametrized weights. GPT-2,
    BERT and LLaMA: 0.02 (their `initializer_range`)."""
    stds = sorted(lay.weight_std for lay in stats.ran()
                  if lay.weight_std and lay.kind != vocab.EMBEDDING and not lay.residual and not lay.tied
                  and not lay.parametrization)
    return stds[len(stds) // 2] if stds else None
