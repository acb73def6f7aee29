"""TensorBoard: scalars `initdoctor/<metric>/<module>`, a custom-scalars layout with one chart per
metric, the findings as a markdown table, the depth profile and history as images, histograms.

Reads statistics; never computes them. tensorboard is imported only here, and only when used.
"""

from __future__ import annotations

import math
from typing import Any

# metric -> (LayerStats/ActivationStats attribute, chart title)
LAYER_METRICS = {
    "signal": ("signal", "input-dependent signal variance (pre-activation)"),
    "scale": ("q", "second moment q of the pre-activation"),
    "gradient": ("grad_q", "gradient G = mean((dL/dy)^2)"),
    "weight_grad_ratio": ("weight_grad_ratio", "|dL/dW| / |W|"),
}
ACTIVATION_METRICS = {
    "saturation": ("saturated", "share of outputs on the flat tails"),
    "dead": ("dead", "share of units that output zero for every example"),
}


def layout() -> dict:
    """One chart per metric; each chart's regex picks every layer of that metric."""
    charts = {title: ["Multiline", [f"initdoctor/{metric}/.*"]]
              for metric, (_, title) in {**LAYER_METRICS, **ACTIVATION_METRICS}.items()}
    return {"initdoctor": charts}


def scalars(stats) -> dict[str, float]:
    """tag -> value for every finite statistic of one examination."""
    out: dict[str, float] = {}
    for lay in stats.ran():
        for metric, (attr, _) in LAYER_METRICS.items():
            v = getattr(lay, attr)
            if v is not None and math.isfinite(v):
                out[f"initdoctor/{metric}/{lay.name or 'model'}"] = float(v)
    for a in stats.activations:
        for metric, (attr, _) in ACTIVATION_METRICS.items():
            v = getattr(a, attr)
            if v is not None and math.isfinite(v):
                out[f"initdoctor/{metric}/{a.name}"] = float(v)
    return out


def open_writer(log_dir: str) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


def write_stats(writer: Any, diag, step: int, *, images: bool = True, histograms: bool = True,
                history: list | None = None, layout_written: bool = True) -> None:
    """Write one examination (a Diagnosis) at `step`: scalars and findings, then figures if asked."""
    if not layout_written:
        writer.add_custom_scalars(layout())
    for tag, value in scalars(diag.stats).items():
        writer.add_scalar(tag, value, step)
    from .markdown import findings_table

    writer.add_text("initdoctor/findings", findings_table(diag.findings), step)
    if images or histograms:
        write_figures(writer, diag, step, history=history, histograms=histograms, images=images)


def write_figures(writer: Any, diag, step: int, *, history: list | None = None, histograms: bool = True,
                  images: bool = True) -> None:
    """The depth profile, the history heatmap (from two samples on) and the histograms."""
    if histograms:
        for (kind, name), values in diag.stats.values.items():
            v = values[values.isfinite()]
            if v.numel():
                writer.add_histogram(f"initdoctor/{kind}/{name or 'model'}", v, step)
    if images:
        from .plots import depth_profile, figure_to_array, plot_history

        writer.add_image("initdoctor/depth_profile", figure_to_array(depth_profile(diag)), step, dataformats="HWC")
        if history and len(history) > 1:
            writer.add_image("initdoctor/history", figure_to_array(plot_history(history)), step, dataformats="HWC")


def write_diagnosis(diag, log_dir: str) -> None:
    """`check --tensorboard`: the examination as step 0 and, after --fix, the cured model as step 1."""
    writer = open_writer(log_dir)
    try:
        write_stats(writer, diag, 0, layout_written=False)
        if diag.after is not None:
            write_stats(writer, diag.after, 1)
    finally:
        writer.close()
