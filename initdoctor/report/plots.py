"""Figures: the depth profile of a diagnosis, and heatmaps of a watched training run.

Reporters only read. Everything here draws numbers that the probe already measured; the only
arithmetic is dividing a curve by its first usable value and taking log10 for a colour scale.

matplotlib is imported inside the functions (``import initdoctor`` stays light), and figures are
``matplotlib.figure.Figure`` objects with no pyplot state, so they render headless, need no backend
choice and are garbage-collected like any other object. Colours are the Okabe-Ito palette, which
stays distinguishable under the common colour-vision deficiencies; severity is also told by marker
shape, and before/after by line style, so no meaning rests on colour alone.

    fig = depth_profile(diagnosis, diagnosis.after)
    fig.savefig("profile.png", dpi=120, bbox_inches="tight")
    png = figure_to_png(plot_history(doctor.history))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .. import thresholds as T
from ..vocab import METRICS

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
}
COLORS = {
    "signal": OKABE_ITO["blue"],
    "gradient": OKABE_ITO["vermillion"],
    "saturated": OKABE_ITO["purple"],
    "dead": OKABE_ITO["sky"],
    "error": OKABE_ITO["vermillion"],
    "warning": OKABE_ITO["orange"],
    "band": "#DDDDDD",
}
SEVERITY_MARKER = {"error": "X", "warning": "^"}
MAX_TICK_LABELS = 40

# A metric is asked for by its name (vocab.METRICS) or by the LayerStats attribute a history keeps it under.
LOG_METRICS = tuple(m.attr for m in METRICS if m.log)
FRACTION_METRICS = tuple(m.attr for m in METRICS if not m.log)
METRIC_ALIASES = {m.name: m.attr for m in METRICS if m.name != m.attr}
METRIC_TITLES = {m.attr: m.title for m in METRICS}


# --- small readers ------------------------------------------------------------------------------

def _positive(v: Any) -> float | None:
    """v as a float when it can sit on a log axis (finite and > 0), else None."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _fraction(v: Any) -> float:
    """v as a float for a [0, 1] axis; NaN when missing or not finite."""
    if v is None:
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _ratios(values: Sequence[Any]) -> tuple[list[float], float | None]:
    """Each value divided by the first usable one; NaN where a value cannot sit on a log axis."""
    usable = [_positive(v) for v in values]
    first = next((v for v in usable if v is not None), None)
    if first is None:
        return [math.nan] * len(values), None
    return [math.nan if v is None else v / first for v in usable], first


def _is_zero(v: Any) -> bool:
    try:
        return v is not None and float(v) == 0.0
    except (TypeError, ValueError):
        return False


def _thin_ticks(n: int, most: int = MAX_TICK_LABELS) -> list[int]:
    """At most `most` evenly spaced positions out of range(n), always starting at 0."""
    if n <= 0:
        return []
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def _label_axis(ax: Axes, labels: Sequence[str], axis: str = "x") -> None:
    """Name the categorical ticks, at most MAX_TICK_LABELS and about three per inch of axis."""
    width, height = ax.get_figure().get_size_inches()
    room = int(3.2 * (width if axis == "x" else height))
    ticks = _thin_ticks(len(labels), max(4, min(MAX_TICK_LABELS, room)))
    names = [str(labels[i]) for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks)
        rotate = len(labels) > 8 or max((len(s) for s in names), default=0) > 6
        ax.set_xticklabels(names, rotation=50 if rotate else 0, ha="right" if rotate else "center",
                           rotation_mode="anchor", fontsize=8)
    else:
        ax.set_yticks(ticks)
        ax.set_yticklabels(names, fontsize=8)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --- the depth profile --------------------------------------------------------------------------

def _fired_rows(diag, position: dict[str, int], suffix: str) -> list[dict]:
    """One row per fired code: its severity (the worst), the plotted positions of its layers."""
    rows: dict[str, dict] = {}
    for f in diag.findings:
        if f.severity not in SEVERITY_MARKER:
            continue
        row = rows.setdefault(f.code, {"code": f.code, "name": f.name, "severity": f.severity,
                                       "x": set(), "suffix": suffix})
        if f.severity == "error":
            row["severity"] = "error"
        row["x"].update(position[name] for name in f.layers if name in position)
    return [dict(r, x=sorted(r["x"])) for _, r in sorted(rows.items())]


def _draw_curves(ax: Axes, layers, position: dict[str, int], kind: str) -> None:
    """kind: "" (a lone diagnosis), "before" or "after"."""
    xs = [position[lay.name] for lay in layers]
    dots = len(xs) <= 50  # beyond that the markers merge into a thick line
    if kind == "after":
        style = dict(ls="--", lw=1.5, marker="o" if dots else None, ms=3.5, mfc="white")
    else:
        style = dict(ls="-", lw=1.8, marker="o" if dots else None, ms=3.5)
    tag = f" ({kind})" if kind else ""
    for metric, attr in (("signal", "signal"), ("gradient", "grad_q")):
        values = [getattr(lay, attr) for lay in layers]
        ys, first = _ratios(values)
        if first is None:
            continue
        (line,) = ax.plot(xs, ys, color=COLORS[metric], label=f"{metric}{tag}  (÷ {first:.3g})", **style)
        line.set_gid(f"{metric}-after" if kind == "after" else metric)
        zeros = [x for x, v in zip(xs, values) if _is_zero(v)]
        if zeros:  # vanished to exactly 0 (underflow): no place on a log axis, so mark the floor
            (z,) = ax.plot(zeros, [0.0] * len(zeros), ls="none", marker="v", ms=6, color=COLORS[metric],
                           mfc="white" if kind == "after" else COLORS[metric], clip_on=False,
                           transform=ax.get_xaxis_transform(), label=f"{metric}{tag} = 0 (underflow)")
            z.set_gid(f"{metric}-zero-after" if kind == "after" else f"{metric}-zero")


def _draw_fractions(ax: Axes, layers, position: dict[str, int], after: bool) -> list[str]:
    xs = [position[lay.name] for lay in layers]
    present = [m for m in FRACTION_METRICS if any(getattr(lay, m) is not None for lay in layers)]
    width = 0.8 / max(1, len(present))
    for k, metric in enumerate(present):
        ys = [_fraction(getattr(lay, metric)) for lay in layers]
        if after:  # a white halo under the dashed line keeps it readable over bars of its own colour
            ax.plot(xs, ys, ls="-", lw=3.4, color="white", label="_halo", zorder=2.4)
            (line,) = ax.plot(xs, ys, ls="--", lw=1.4, marker="o" if len(xs) <= 50 else None, ms=3.5,
                              mfc="white", color=COLORS[metric], label=f"{metric} (after)", zorder=2.5)
            line.set_gid(f"{metric}-after")
        else:
            offset = (k - (len(present) - 1) / 2) * width
            ax.bar([x + offset for x in xs], [0.0 if math.isnan(y) else y for y in ys], width=width,
                   color=COLORS[metric], alpha=0.85, label=metric, linewidth=0)
    return present


def depth_profile(diag, after=None, *, title: str | None = None) -> Figure:
    """Per weight layer, in execution order: how signal, gradient, saturation and death change.

    Top: the input-dependent signal and the gradient G on a log scale, each divided by its first
    usable value (so both read "ratio to the first layer"), over the variance-preserving band
    [TREND_WARN, 1/TREND_WARN]. Middle (when anything fired): one row per warning/error code with a
    marker at each layer it names. Bottom: saturated and dead shares as bars, with the warning
    thresholds dashed. With `after` (the Diagnosis after a fix), its curves are drawn dashed in the
    same axes. Missing, zero or non-finite values are left out of the log axis; exact zeros are
    marked with a triangle on its floor.
    """
    layers = diag.stats.ran()
    names = [lay.name for lay in layers]
    position = {name: i for i, name in enumerate(names)}
    after_layers = [lay for lay in after.stats.ran() if lay.name in position] if after is not None else []
    n = len(names)

    rows = _fired_rows(diag, position, "")
    if after is not None:
        rows += _fired_rows(after, position, " (after)")

    width = min(15.0, max(9.0, 6.0 + 0.05 * n))
    track_h = 0.28 * len(rows) + 0.35 if rows else 0.0
    fig = _new_figure(width, 3.4 + track_h + 2.0 + (0.5 if n > 8 else 0.0))
    ratios = [3.4] + ([track_h] if rows else []) + [2.0]
    axes = fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    top, bottom = axes[0], axes[-1]
    track = axes[1] if rows else None

    # top: ratio to the first layer on a log scale
    top.set_yscale("log")
    top.axhspan(T.TREND_WARN, 1 / T.TREND_WARN, color=COLORS["band"], alpha=0.6, lw=0, zorder=0,
                label=f"variance-preserving band [{T.TREND_WARN:g}, {1 / T.TREND_WARN:g}]")
    top.axhline(1.0, color="#999999", lw=0.8, zorder=0)
    _draw_curves(top, layers, position, "" if after is None else "before")
    if after is not None:
        _draw_curves(top, after_layers, position, "after")
    top.set_ylabel("ratio to first layer")
    top.grid(True, which="major", axis="y", color="#EEEEEE", lw=0.6)
    if title is None:
        title = f"initdoctor depth profile: {diag.target}" + ("  —  before / after" if after is not None else "")
    top.set_title(title, loc="left", fontsize=11)
    if not n:
        top.text(0.5, 0.5, "no weight layer ran", transform=top.transAxes, ha="center", va="center")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    # middle: the findings track
    if track is not None:
        for i, row in enumerate(rows):
            sev = row["severity"]
            hollow = bool(row["suffix"])
            track.plot(row["x"], [i] * len(row["x"]), ls="none", marker=SEVERITY_MARKER[sev], ms=6,
                       color=COLORS[sev], mfc="white" if hollow else COLORS[sev], mew=1.2,
                       gid=f"finding-{row['code']}{'-after' if hollow else ''}")
        track.set_yticks(range(len(rows)))
        labels = track.set_yticklabels([f"{r['code']} {r['name']}{r['suffix']}" for r in rows], fontsize=8)
        for label, row in zip(labels, rows):
            label.set_color(COLORS[row["severity"]])
        track.set_ylim(len(rows) - 0.5, -0.5)
        track.tick_params(axis="y", length=0)
        track.grid(True, axis="y", color="#EEEEEE", lw=0.6)
        for side in ("top", "right"):
            track.spines[side].set_visible(False)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="none", marker=SEVERITY_MARKER[s], color=COLORS[s], label=s)
                   for s in ("error", "warning") if any(r["severity"] == s for r in rows)]
        if any(r["suffix"] for r in rows):
            handles.append(Line2D([], [], ls="none", marker="o", color="#666666", mfc="white",
                                  label="hollow: after the fix"))
        track.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    # bottom: saturated and dead shares
    present = _draw_fractions(bottom, layers, position, after=False)
    if after is not None:
        for m in _draw_fractions(bottom, after_layers, position, after=True):
            if m not in present:
                present.append(m)
    warn = {"saturated": T.SAT_SHARE_WARN, "dead": T.DEAD_WARN}
    for metric in FRACTION_METRICS:
        if metric in present:
            bottom.axhline(warn[metric], color=COLORS[metric], ls=(0, (4, 3)), lw=1.1,
                           label=f"{metric} warning > {warn[metric]:g}")
    if not present:
        bottom.text(0.5, 0.5, "no sigmoid/tanh-like or ReLU-family activation follows a layer",
                    transform=bottom.transAxes, ha="center", va="center", fontsize=8, color="#666666")
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("share of outputs")
    bottom.set_xlim(-0.6, max(n, 1) - 0.4)
    bottom.set_xlabel(f"weight layer, in execution order ({n} layer{'s' if n != 1 else ''})")
    _label_axis(bottom, names)
    if present:  # bars, then after lines, then thresholds
        handles, labels = bottom.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: ("warning" in labels[i], "after" in labels[i], i))
        bottom.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


# --- a watched run ------------------------------------------------------------------------------

def _metric_key(metric: str) -> str:
    key = METRIC_ALIASES.get(metric, metric)
    if key not in LOG_METRICS + FRACTION_METRICS:
        choices = ", ".join(LOG_METRICS + FRACTION_METRICS + tuple(METRIC_ALIASES))
        raise ValueError(f"unknown metric {metric!r}; choose one of {choices}")
    return key


def _history_layers(history: Sequence[dict]) -> list[str]:
    """Layer names in the first record's order, then any that later records add."""
    seen: dict[str, None] = {}
    for rec in history:
        for name in rec.get("layers", {}):
            seen.setdefault(name, None)
    return list(seen)


def history_matrix(history: Sequence[dict], metric: str) -> tuple[np.ndarray, list[str], list[Any]]:
    """(layers x steps) float array of what `history_heatmap` colours, NaN where nothing was measured.

    signal / q / grad_q: log10 of the value over the first layer's value at the same step (the
    first layer, in record order, with a usable value there), so a layer that falls behind the
    others changes colour even when the whole network drifts; saturated / dead: the raw share.
    """
    import numpy as np

    key = _metric_key(metric)
    names = _history_layers(history)
    steps = [rec.get("step", i) for i, rec in enumerate(history)]
    data = np.full((len(names), len(history)), np.nan)
    for j, rec in enumerate(history):
        raw = [(rec.get("layers", {}).get(name) or {}).get(key) for name in names]
        if key in FRACTION_METRICS:
            data[:, j] = [_fraction(v) for v in raw]
        else:
            ratios, first = _ratios(raw)
            if first is not None:
                data[:, j] = np.log10(np.asarray(ratios, dtype=float))
    return data, names, steps


def _draw_heatmap(fig: Figure, ax: Axes, history: Sequence[dict], metric: str):
    import numpy as np
    from matplotlib import colormaps

    key = _metric_key(metric)
    data, names, steps = history_matrix(history, key)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return None
    if key in FRACTION_METRICS:
        cmap, vmin, vmax = colormaps["cividis"], 0.0, 1.0
        label = "share (0..1)"
    else:  # diverging and symmetric: no change is the neutral middle
        span = max(2.0, float(np.abs(finite).max()))
        cmap, vmin, vmax = colormaps["PuOr_r"], -span, span
        label = "log10(value / first layer)"
    cmap = cmap.with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # not measured: the hatched background shows
    ax.patch.set_facecolor("white")
    ax.patch.set_hatch("////")
    ax.patch.set_edgecolor("#BBBBBB")
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap=cmap,
                      vmin=vmin, vmax=vmax, origin="upper")
    image.set_gid(f"heatmap-{key}")
    ax.set_title(METRIC_TITLES[key], loc="left", fontsize=10)
    ax.set_ylabel("layer")
    _label_axis(ax, names, axis="y")
    _label_axis(ax, [str(s) for s in steps], axis="x")
    ax.set_xlabel("step")
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=8)
    return image


def _heat_height(n_layers: int) -> float:
    return min(7.0, max(2.2, 1.3 + 0.11 * n_layers))


def _heat_width(n_steps: int) -> float:
    return min(15.0, max(7.0, 5.0 + 0.06 * n_steps))


def history_heatmap(history: Sequence[dict], metric: str) -> Figure:
    """One heatmap of a watched run: layers down, sampled steps across, one cell per measurement.

    In the spirit of fastai's "colourful dimension" plots: signal/q/grad_q are coloured by log10 of
    each layer's ratio to the first layer at the same step (a diverging map centred on "as the
    first layer"), saturated
    and dead by their raw share with fixed limits 0..1. Cells never measured are hatched.
    """
    key = _metric_key(metric)
    names = _history_layers(history)
    fig = _new_figure(_heat_width(len(history)), _heat_height(len(names)) + 0.4)
    ax = fig.add_subplot()
    if _draw_heatmap(fig, ax, history, key) is None:
        ax.set_title(METRIC_TITLES[key], loc="left", fontsize=10)
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#666666")
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_history(history: Sequence[dict], metrics: Iterable[str] = ("signal", "grad_q", "saturated", "dead"), *,
                 title: str = "initdoctor: watched run") -> Figure:
    """One heatmap per metric (see `history_heatmap`), stacked in one figure; metrics with no data
    are left out."""
    import numpy as np

    keys = list(dict.fromkeys(_metric_key(m) for m in metrics))
    keys = [k for k in keys if np.isfinite(history_matrix(history, k)[0]).any()]
    names = _history_layers(history)
    if not keys:
        fig = _new_figure(6.0, 2.0)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no data recorded yet", ha="center", va="center", color="#666666")
        return fig
    fig = _new_figure(_heat_width(len(history)), sum(_heat_height(len(names)) for _ in keys) + 0.4)
    axes = fig.subplots(len(keys), 1, squeeze=False, sharex=True)[:, 0]
    for ax, key in zip(axes, keys):
        _draw_heatmap(fig, ax, history, key)
    for ax in axes[:-1]:
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelbottom=False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    return fig


# --- export -------------------------------------------------------------------------------------

def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for TensorBoard images or a web page), rendered with Agg."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself as the figure's canvas
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The figure as an RGB uint8 array of shape (height, width, 3) (TensorBoard's HWC)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    old = fig.dpi
    fig.set_dpi(dpi)
    try:
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        fig.set_dpi(old)
