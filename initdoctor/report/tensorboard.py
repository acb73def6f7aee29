"""TensorBoard: the diagnosis as `initdoctor` plugin data (read by initdoctor's own tab), and the
standard dashboards to DESIGN §2: scalars `initdoctor.<metric>/<NNN>.<module>`, per-run
`initdoctor.summary/...` scalars, a custom-scalars layout merged into the user's, the findings as
text when they change, figures and histograms.

Reads statistics; never computes them. tensorboard is imported only here, and only when used.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ..tensorboard_plugin.metadata import CONTENT_VERSION, DIAGNOSIS_TAG, PLUGIN_NAME

# metric -> (LayerStats attribute, chart title, written as log10). Activation metrics (saturation,
# dead) are read from the weight layer that feeds the activation, so both share one tag suffix.
LAYER_METRICS: dict[str, tuple[str, str, bool]] = {
    "signal": ("signal", "log10 signal: input-dependent variance of the pre-activation", True),
    "scale": ("q", "log10 scale q = mean(y²) of the pre-activation", True),
    "gradient": ("grad_q", "log10 gradient G = mean((dL/dy)²)", True),
    "saturation": ("saturated", "share of the next activation's outputs on its flat tails", False),
    "dead": ("dead", "share of units after the layer that output zero for every example", False),
    "weight_grad_ratio": ("weight_grad_ratio", "|dL/dW| / |W| under the training loss", False),
}
# Only a training loss gives |dL/dW| a meaning: `check` uses a random cotangent whose weight
# gradients grow with sqrt(batch), so it does not write this metric.
TRAINING_ONLY = {"weight_grad_ratio"}
SUMMARY_TITLES = {
    "log10_signal_ratio": "log10 signal ratio, last / first weight layer",
    "log10_gradient_ratio": "log10 gradient ratio, first / last weight layer",
    "errors": "findings of severity error",
    "warnings": "findings of severity warning",
}
FINDINGS_TAG = "initdoctor.findings"
# stats.values kind -> histogram group. The probe samples each weight layer's output (before the
# nonlinearity); "outputs" says so, and sorts after the log10 scalars in Time Series.
HISTOGRAM_GROUPS = {"weights": "weights", "activations": "outputs", "weight_gradients": "weight_gradients"}
LAYOUT_CATEGORY = "initdoctor"


def metric_prefix(metric: str) -> str:
    """`initdoctor.log10_gradient` for a log metric, `initdoctor.dead` otherwise."""
    _, _, log = LAYER_METRICS[metric]
    return f"initdoctor.{'log10_' if log else ''}{metric}"


def layer_key(lay, width: int = 3) -> str:
    """`007.blocks.2.conv1`: execution index first, so tags sort in execution order."""
    return f"{lay.index:0{width}d}.{lay.name or 'model'}"


def _width(layers) -> int:
    return max(3, len(str(max((lay.index for lay in layers), default=0))))


def _log10(v: Any) -> float | None:
    if v is None or not math.isfinite(v) or v <= 0:
        return None
    return math.log10(v)


def scalars(diag, *, training: bool = False) -> dict[str, float]:
    """tag -> value for every finite statistic of one examination, plus the run's summary."""
    out: dict[str, float] = {}
    layers = diag.stats.ran()
    width = _width(layers)
    for lay in layers:
        for metric, (attr, _, log) in LAYER_METRICS.items():
            if metric in TRAINING_ONLY and not training:
                continue
            v = getattr(lay, attr)
            v = _log10(v) if log else (float(v) if v is not None and math.isfinite(v) else None)
            if v is not None:
                out[f"{metric_prefix(metric)}/{layer_key(lay, width)}"] = v
    out.update({f"initdoctor.summary/{k}": v for k, v in summary(diag).items()})
    return out


def summary(diag) -> dict[str, float]:
    """Per-run numbers that compare runs at a glance: depth ratios (log10) and finding counts."""
    out: dict[str, float] = {}
    layers = diag.stats.ran()
    sig = [v for v in (_log10(lay.signal) for lay in layers) if v is not None]
    grad = [v for v in (_log10(lay.grad_q) for lay in layers) if v is not None]
    if len(sig) > 1:
        out["log10_signal_ratio"] = sig[-1] - sig[0]
    if len(grad) > 1:
        out["log10_gradient_ratio"] = grad[0] - grad[-1]
    out["errors"] = float(sum(f.severity == "error" for f in diag.findings))
    out["warnings"] = float(sum(f.severity == "warning" for f in diag.findings))
    return out


def layout() -> dict:
    """Our category: one chart per metric (each regex picks every layer of it) and the summary."""
    charts = {title: ["Multiline", [f"^{metric_prefix(m).replace('.', chr(92) + '.')}/"]]
              for m, (_, title, _) in LAYER_METRICS.items()}
    for key, title in SUMMARY_TITLES.items():
        charts[title] = ["Multiline", [rf"^initdoctor\.summary/{key}$"]]
    return {LAYOUT_CATEGORY: charts}


def merged_layout(existing: bytes | None) -> bytes:
    """The layout proto with our category added to (or replacing our own in) the user's layout."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard.summary import custom_scalars

    ours = custom_scalars(layout()).value[0].tensor.string_val[0]
    merged = layout_pb2.Layout()
    if existing:
        merged.ParseFromString(existing)
    theirs = [c for c in merged.category if c.title != LAYOUT_CATEGORY]
    del merged.category[:]
    merged.category.extend(theirs)
    new = layout_pb2.Layout()
    new.ParseFromString(ours)
    merged.category.extend(new.category)
    return merged.SerializeToString()


def _log_dir(writer: Any) -> str | None:
    get = getattr(writer, "get_logdir", None)
    return get() if callable(get) else getattr(writer, "log_dir", None)


def existing_layout(writer: Any) -> bytes | None:
    """The custom-scalars layout already in the writer's run (the latest one), if any."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.custom_scalar import metadata

    log_dir = _log_dir(writer)
    if not log_dir or not os.path.isdir(log_dir):
        return None
    writer.flush()
    acc = ea.EventAccumulator(log_dir, size_guidance={ea.TENSORS: 1, ea.SCALARS: 1, ea.HISTOGRAMS: 1,
                                                      ea.IMAGES: 1, ea.COMPRESSED_HISTOGRAMS: 1})
    acc.Reload()
    if metadata.CONFIG_SUMMARY_TAG not in acc.Tags().get("tensors", []):
        return None
    return acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0]


def _add_summary(writer: Any, summary_proto, step: int) -> None:
    writer._get_file_writer().add_summary(summary_proto, step)


def write_layout(writer: Any) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.plugins.custom_scalar import metadata

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME))
    tensor = TensorProto(dtype="DT_STRING", string_val=[merged_layout(existing_layout(writer))])
    _add_summary(writer, Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, metadata=meta,
                                                      tensor=tensor)]), 0)


def payload(diag, *, source: str, step: int, role: str | None = None) -> bytes:
    """The JSON the tab reads: DESIGN §2's diagnosis plus where it came from."""
    from . import _clean

    d = _clean(diag.to_dict())
    d["source"] = source  # "watch" or "check"
    d["step"] = step
    if role is not None:
        d["role"] = role  # "before" or "after" for check --tensorboard
    return json.dumps(d, allow_nan=False, separators=(",", ":")).encode("utf-8")


def write_plugin_data(writer: Any, diag, step: int, *, source: str, role: str | None = None) -> None:
    """The whole diagnosis as one string tensor of plugin `initdoctor` at `step`."""
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=CONTENT_VERSION),
                           data_class=DATA_CLASS_TENSOR)
    tensor = TensorProto(dtype="DT_STRING", string_val=[payload(diag, source=source, step=step, role=role)])
    _add_summary(writer, Summary(value=[Summary.Value(tag=DIAGNOSIS_TAG, metadata=meta, tensor=tensor)]), step)


def _findings_key(findings) -> tuple:
    # Info notes whose layer list flickers from sample to sample would rewrite the text each time:
    # they count by code only; warnings and errors by code, severity and layers.
    return tuple((f.code, f.severity, tuple(f.layers) if f.fired else ()) for f in findings)


class RunWriter:
    """One run's TensorBoard output. It remembers what it wrote: the layout goes in once (merged
    into the user's), the findings text only when the findings change."""

    def __init__(self, writer: Any, *, source: str, role: str | None = None) -> None:
        self.writer = writer
        self.source = source
        self.role = role
        self._layout_written = False
        self._findings: tuple | None = None

    def write(self, diag, step: int) -> None:
        """Scalars, summary, plugin data and (when they changed) the findings of one examination."""
        w = self.writer
        if not self._layout_written:
            write_layout(w)
            self._layout_written = True
        for tag, value in scalars(diag, training=self.source == "watch").items():
            w.add_scalar(tag, value, step)
        write_plugin_data(w, diag, step, source=self.source, role=self.role)
        key = _findings_key(diag.findings)
        if key != self._findings:
            from .markdown import findings_table

            w.add_text(FINDINGS_TAG, f"**step {step}**\n\n" + findings_table(diag.findings), step)
            self._findings = key

    def figures(self, diag, step: int, *, after=None, history: list | None = None, histograms: bool = True,
                images: bool = True, grads: dict | None = None) -> None:
        write_figures(self.writer, diag, step, after=after, history=history, histograms=histograms,
                      images=images, grads=grads, label=self.role or f"step {step}")


def write_figures(writer: Any, diag, step: int, *, after=None, history: list | None = None,
                  histograms: bool = True, images: bool = True, grads: dict | None = None,
                  label: str | None = None) -> None:
    """The depth profile, the history heatmap (from two samples on) and the histograms of weights,
    layer outputs and (given `grads`, layer name -> weight gradient) weight gradients."""
    layers = diag.stats.ran()
    width = _width(layers)
    keys = {lay.name: layer_key(lay, width) for lay in layers}
    if histograms:
        for (kind, name), values in diag.stats.values.items():
            v = values[values.isfinite()]
            if v.numel() and name in keys and kind in HISTOGRAM_GROUPS:
                writer.add_histogram(f"initdoctor.{HISTOGRAM_GROUPS[kind]}/{keys[name]}", v, step)
        kept = {name for kind, name in diag.stats.values if kind == "weight_gradients"}
        for name, g in (grads or {}).items():
            if g is None or name not in keys or name in kept:
                continue
            g = g.detach().reshape(-1)[:4096].float().cpu()
            g = g[g.isfinite()]
            if g.numel():
                writer.add_histogram(f"initdoctor.weight_gradients/{keys[name]}", g, step)
    if images:
        from .plots import depth_profile, figure_to_array, plot_history

        title = f"initdoctor depth profile: {diag.target} — step {step}" + (f", {label}" if label else "")
        if after is not None:
            title += " (dashed: after --fix)"
        fig = depth_profile(diag, after, title=title)
        writer.add_image("initdoctor.depth_profile", figure_to_array(fig, dpi=120), step, dataformats="HWC")
        if history and len(history) > 1:
            fig = plot_history(history, title=f"initdoctor: watched run up to step {step}")
            writer.add_image("initdoctor.history", figure_to_array(fig, dpi=120), step, dataformats="HWC")


def open_writer(log_dir: str) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


def write_diagnosis(diag, log_dir: str) -> list[str]:
    """`check --tensorboard DIR`: `DIR/before` and, after --fix, `DIR/after`, as two runs at step 0,
    so they compare side by side instead of sharing a step axis. Returns the run folders written."""
    runs = [("before", diag, diag.after)]
    if diag.after is not None:
        runs.append(("after", diag.after, None))
    written = []
    for role, d, after in runs:
        path = os.path.join(log_dir, role)
        writer = open_writer(path)
        try:
            run = RunWriter(writer, source="check", role=role)
            run.write(d, 0)  # the before run's payload holds the after examination too (DESIGN §2)
            run.figures(d, 0, after=after)
        finally:
            writer.close()
        written.append(path)
    return written
