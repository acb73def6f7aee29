"""Figures: depth profile, history heatmaps, PNG/array export, and `check --plot`.

Every figure is rendered with warnings turned into errors, and its axes are read back to check
that they hold the numbers of the diagnosis they were drawn from.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import initdoctor
from initdoctor import thresholds as T
from initdoctor.cli import main
from initdoctor.diagnosis import Diagnosis
from initdoctor.report.plots import (
    MAX_TICK_LABELS,
    depth_profile,
    figure_to_array,
    figure_to_png,
    history_heatmap,
    history_matrix,
    plot_history,
)
from initdoctor.rules import Finding
from initdoctor.stats import LayerStats, ModelStats

PNG = b"\x89PNG\r\n\x1a\n"


def mlp(depth: int, act=nn.ReLU, std: float | None = None, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(depth):
        mods += [nn.Linear(width, width), act()]
    model = nn.Sequential(*mods[:-1])
    if std is not None:
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
    return model


@pytest.fixture(scope="module")
def batch():
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def small(batch):
    return initdoctor.check(mlp(3), batch)


@pytest.fixture(scope="module")
def deep(batch):
    return initdoctor.check(mlp(100), batch)


@pytest.fixture(scope="module")
def fixed(batch):
    return initdoctor.fix(mlp(20, std=1.0), batch)


@pytest.fixture(scope="module")
def sigmoid(batch):
    return initdoctor.check(mlp(6, act=nn.Sigmoid, std=1.0), batch)


def render(fig, path) -> bytes:
    """Draw and save with every warning an error; return the file's bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(path, dpi=80, bbox_inches="tight")
    return path.read_bytes()


def profile(diag, after=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return depth_profile(diag, after)


def line(ax, gid):
    found = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, f"expected one line {gid!r}, got {[ln.get_gid() for ln in ax.get_lines()]}"
    return found[0]


def normalized(values):
    usable = [v if v is not None and math.isfinite(v) and v > 0 else None for v in values]
    first = next(v for v in usable if v is not None)
    return np.array([np.nan if v is None else v / first for v in usable])


def visible_labels(labels):
    return [t.get_text() for t in labels if t.get_text()]


# --- depth profile ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["small", "deep"])
def test_profile_curves_are_ratios_to_first_layer(which, request, tmp_path):
    diag = request.getfixturevalue(which)
    fig = profile(diag)
    assert render(fig, tmp_path / "p.png").startswith(PNG)
    top = fig.axes[0]
    layers = diag.stats.ran()
    assert top.get_yscale() == "log"
    sig, grad = line(top, "signal"), line(top, "gradient")
    np.testing.assert_array_equal(sig.get_xdata(), np.arange(len(layers)))
    np.testing.assert_allclose(sig.get_ydata(), normalized([lay.signal for lay in layers]), equal_nan=True)
    np.testing.assert_allclose(grad.get_ydata(), normalized([lay.grad_q for lay in layers]), equal_nan=True)
    assert sig.get_linestyle() == "-"
    assert "before / after" not in top.get_title(loc="left")


def test_profile_shades_the_variance_preserving_band(small):
    top = profile(small).axes[0]
    bands = [p for p in top.patches if p.get_label().startswith("variance-preserving band")]
    assert len(bands) == 1
    band = bands[0]  # a Rectangle in recent matplotlib, a Polygon in older ones
    ys = [band.get_y(), band.get_y() + band.get_height()] if hasattr(band, "get_y") else band.get_xy()[:, 1]
    assert min(ys) == pytest.approx(T.TREND_WARN) and max(ys) == pytest.approx(1 / T.TREND_WARN)


@pytest.mark.parametrize("which", ["small", "deep"])
def test_profile_bars_one_per_layer_with_warning_lines(which, request):
    diag = request.getfixturevalue(which)
    bottom = profile(diag).axes[-1]
    layers = diag.stats.ran()
    (dead,) = [c for c in bottom.containers if c.get_label() == "dead"]
    assert len(dead) == len(layers)
    expect = [0.0 if lay.dead is None else lay.dead for lay in layers]
    np.testing.assert_allclose([b.get_height() for b in dead], expect)
    assert all(0.0 <= b.get_height() <= 1.0 for b in dead)
    assert bottom.get_ylim() == (0.0, 1.05)
    warn = [ln for ln in bottom.get_lines() if ln.get_label().startswith("dead warning")]
    assert len(warn) == 1 and warn[0].get_ydata()[0] == T.DEAD_WARN and warn[0].get_linestyle() != "-"
    assert not [c for c in bottom.containers if c.get_label() == "saturated"]  # ReLU: nothing saturates


def test_profile_saturation_bars_for_sigmoid(sigmoid, tmp_path):
    fig = profile(sigmoid)
    render(fig, tmp_path / "s.png")
    bottom = fig.axes[-1]
    layers = sigmoid.stats.ran()
    (sat,) = [c for c in bottom.containers if c.get_label() == "saturated"]
    assert len(sat) == len(layers)
    np.testing.assert_allclose([b.get_height() for b in sat],
                               [0.0 if lay.saturated is None else lay.saturated for lay in layers])
    assert any(ln.get_label().startswith("saturated warning") and ln.get_ydata()[0] == T.SAT_SHARE_WARN
               for ln in bottom.get_lines())


def test_profile_thins_tick_labels_for_100_layers(deep, small):
    bottom = profile(deep).axes[-1]
    labels = visible_labels(bottom.get_xticklabels())
    assert 20 <= len(labels) <= MAX_TICK_LABELS
    names = [lay.name for lay in deep.stats.ran()]
    assert labels[0] == names[0] and set(labels) <= set(names)
    assert all(t.get_rotation() > 0 for t in bottom.get_xticklabels())
    small_labels = visible_labels(profile(small).axes[-1].get_xticklabels())
    assert small_labels == [lay.name for lay in small.stats.ran()]


def test_profile_marks_fired_findings_at_their_layers(deep):
    fired = {f.code: f for f in deep.problems()}
    assert "ID203" in fired  # a 100-layer ReLU MLP with PyTorch's default init loses its gradient
    fig = profile(deep)
    track = fig.axes[1]
    position = {lay.name: i for i, lay in enumerate(deep.stats.ran())}
    for code, f in fired.items():
        marks = line(track, f"finding-{code}")
        assert sorted(marks.get_xdata()) == sorted({position[n] for n in f.layers if n in position})
    labels = [t.get_text() for t in track.get_yticklabels()]
    assert len(labels) == len(fired) and all(any(lab.startswith(code) for lab in labels) for code in fired)
    assert not any(g.startswith("finding-ID9") for g in (ln.get_gid() or "" for ln in track.get_lines()))


def test_profile_without_findings_has_no_track(small):
    assert not small.problems()
    assert len(profile(small).axes) == 2


def test_profile_before_after(fixed, tmp_path):
    before, after = fixed.before, fixed.after
    fig = profile(before, after)
    assert render(fig, tmp_path / "fix.png").startswith(PNG)
    top = fig.axes[0]
    assert "before / after" in top.get_title(loc="left")
    for gid, attr in (("signal-after", "signal"), ("gradient-after", "grad_q")):
        ln = line(top, gid)
        assert ln.get_linestyle() == "--"
        np.testing.assert_allclose(ln.get_ydata(), normalized([getattr(lay, attr) for lay in after.stats.ran()]),
                                   equal_nan=True)
    assert line(top, "signal").get_linestyle() == "-"
    dead_after = line(fig.axes[-1], "dead-after")
    assert dead_after.get_linestyle() == "--"
    assert len(dead_after.get_xdata()) == len(after.stats.ran())


def test_cli_plot_uses_after_of_the_same_diagnosis(fixed):
    # cli.py calls depth_profile(diag, diag.after): fix() stores the cure on the before diagnosis
    fig = profile(fixed.before, fixed.before.after)
    assert any(ln.get_gid() == "signal-after" for ln in fig.axes[0].get_lines())


def _hand_made(signal, grad, dead=None, saturated=None, findings=()):
    n = len(signal)
    layers = [LayerStats(name=f"blocks.{i}.fc", type="Linear", index=i, signal=signal[i], grad_q=grad[i],
                         dead=None if dead is None else dead[i],
                         saturated=None if saturated is None else saturated[i]) for i in range(n)]
    layers.append(LayerStats(name="never", type="Linear"))  # never ran: not plotted
    return Diagnosis(ModelStats(layers, [], []), list(findings), [], target="hand-made")


def test_profile_survives_none_nan_inf_and_zero(tmp_path):
    nan, inf = math.nan, math.inf
    diag = _hand_made([None, nan, 0.0, 2.0, inf, 4.0, -1.0], [None] * 7,
                      dead=[None, nan, 0.0, 0.5, 1.0, None, 0.25],
                      findings=[Finding("ID201", "error", ["blocks.3.fc", "blocks.5.fc", "gone"], "m"),
                                Finding("ID902", "info", ["blocks.0.fc"], "note")])
    fig = profile(diag)
    render(fig, tmp_path / "odd.png")
    render(fig, tmp_path / "odd.svg")
    top = fig.axes[0]
    np.testing.assert_allclose(line(top, "signal").get_ydata(), [nan, nan, nan, 1.0, nan, 2.0, nan], equal_nan=True)
    assert not [ln for ln in top.get_lines() if ln.get_gid() == "gradient"]  # nothing usable: no line
    np.testing.assert_array_equal(line(top, "signal-zero").get_xdata(), [2])
    np.testing.assert_array_equal(line(fig.axes[1], "finding-ID201").get_xdata(), [3, 5])
    (dead,) = [c for c in fig.axes[-1].containers if c.get_label() == "dead"]
    assert len(dead) == 7
    assert len(visible_labels(fig.axes[-1].get_xticklabels())) == 7


def test_profile_of_nothing_renders(tmp_path):
    diag = Diagnosis(ModelStats([], [], []), [], [])
    assert render(profile(diag, diag), tmp_path / "empty.png").startswith(PNG)


# --- a watched run ------------------------------------------------------------------------------

def synthetic_history(n_layers: int, n_steps: int) -> list[dict]:
    """Layer i's signal shrinks by 10**(-i/10) per step; a late layer appears halfway."""
    hist = []
    for s in range(n_steps):
        layers = {f"layer{i}": {"signal": 0.5 * 10 ** (-s * i / 10), "q": 1.0, "grad_q": 2.0 ** s,
                                "saturated": None, "dead": min(1.0, s * i / 100)} for i in range(n_layers)}
        if s >= n_steps // 2:
            layers["late"] = {"signal": 3.0, "grad_q": None, "saturated": None, "dead": 0.5}
        hist.append({"step": 10 * s, "layers": layers})
    return hist


def image(fig, metric):
    (im,) = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == f"heatmap-{metric}"]
    return im


def test_heatmap_holds_log_ratios_to_first_layer(tmp_path):
    hist = synthetic_history(5, 8)
    hist[3]["layers"]["layer2"]["signal"] = None  # missing samples stay blank
    hist[0]["layers"]["layer4"]["signal"] = 0.0  # unusable: blank, not -inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = history_heatmap(hist, "signal")
    render(fig, tmp_path / "h.png")
    arr = image(fig, "signal").get_array()
    assert arr.shape == (6, 8)  # 5 layers + the late one, 8 steps
    # layer0 holds 0.5 at every step: each cell is log10(value / 0.5)
    expect = np.array([[-s * i / 10 for s in range(8)] for i in range(5)]
                      + [[np.nan] * 4 + [math.log10(3.0 / 0.5)] * 4])
    expect[2, 3] = np.nan
    expect[4, 0] = np.nan
    np.testing.assert_allclose(np.ma.filled(arr.astype(float), np.nan), expect, atol=1e-12, equal_nan=True)
    lo, hi = image(fig, "signal").get_clim()
    assert lo == -hi and hi >= 2
    ax = fig.axes[0]
    assert visible_labels(ax.get_yticklabels()) == [f"layer{i}" for i in range(5)] + ["late"]
    assert visible_labels(ax.get_xticklabels()) == [str(10 * s) for s in range(8)]
    assert len(fig.axes) == 2  # the heatmap and its colourbar


def test_heatmap_fractions_are_raw_with_fixed_limits():
    hist = synthetic_history(4, 6)
    fig = history_heatmap(hist, "dead")
    im = image(fig, "dead")
    assert im.get_clim() == (0.0, 1.0)
    data, names, steps = history_matrix(hist, "dead")
    assert names[-1] == "late" and steps == [0, 10, 20, 30, 40, 50]
    np.testing.assert_allclose(np.ma.filled(im.get_array().astype(float), np.nan), data, equal_nan=True)
    assert data[3, 5] == pytest.approx(0.15)


def test_heatmap_aliases_and_unknown_metric():
    hist = synthetic_history(3, 4)
    assert image(history_heatmap(hist, "gradient"), "grad_q").get_array().shape == (4, 4)
    with pytest.raises(ValueError, match="unknown metric 'loss'.*signal"):
        history_heatmap(hist, "loss")


def test_heatmap_thins_labels_for_many_layers_and_steps(tmp_path):
    hist = synthetic_history(100, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = history_heatmap(hist, "signal")
    render(fig, tmp_path / "big.png")
    ax = fig.axes[0]
    assert image(fig, "signal").get_array().shape == (101, 120)
    assert len(visible_labels(ax.get_yticklabels())) <= MAX_TICK_LABELS
    assert len(visible_labels(ax.get_xticklabels())) <= MAX_TICK_LABELS


def test_plot_history_skips_metrics_without_data(tmp_path):
    hist = synthetic_history(6, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_history(hist)  # signal, gradient, saturated (never measured), dead
    render(fig, tmp_path / "history.png")
    gids = [im.get_gid() for ax in fig.axes for im in ax.get_images()]
    assert gids == ["heatmap-signal", "heatmap-grad_q", "heatmap-dead"]
    assert initdoctor.plot_history is plot_history
    empty = plot_history([])
    assert render(empty, tmp_path / "empty.png").startswith(PNG)


def test_history_from_real_diagnoses(batch):
    # what the watcher records, taken here from real examinations of a model that drifts
    model = mlp(4)
    hist = []
    for step in range(3):
        d = initdoctor.check(model, batch)
        hist.append({"step": step, "layers": {lay.name: {"signal": lay.signal, "q": lay.q, "grad_q": lay.grad_q,
                                                         "saturated": lay.saturated, "dead": lay.dead}
                                              for lay in d.stats.ran()}})
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(0.5)
    fig = plot_history(hist, ("signal", "grad_q", "saturated", "dead"))
    assert [im.get_gid() for ax in fig.axes for im in ax.get_images()] == [
        "heatmap-signal", "heatmap-grad_q", "heatmap-dead"]
    sig = np.ma.filled(image(fig, "signal").get_array().astype(float), np.nan)
    first = np.array([r["layers"]["0"]["signal"] for r in hist])
    last = np.array([r["layers"]["6"]["signal"] for r in hist])
    np.testing.assert_allclose(sig[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(sig[-1], np.log10(last / first))
    # halving every weight shrinks the last layer's signal faster than the first's
    assert sig[-1, 2] < sig[-1, 1] < sig[-1, 0]


# --- export -------------------------------------------------------------------------------------

def test_figure_to_png_and_array(small):
    fig = profile(small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = figure_to_png(fig)
        arr = figure_to_array(fig, dpi=50)
    assert png.startswith(PNG)
    w, h = fig.get_size_inches()
    assert arr.dtype == np.uint8 and arr.shape == (round(h * 50), round(w * 50), 3)
    assert arr.min() < 100 < 250 <= arr.max()  # something was drawn on white


def test_plots_import_matplotlib_lazily():
    code = "import sys, initdoctor, initdoctor.report.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the command line ---------------------------------------------------------------------------

MODEL_FILE = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0)
    return model

def example_input():
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
"""


@pytest.mark.parametrize("suffix, magic", [(".png", PNG), (".svg", b"<?xml")])
@pytest.mark.parametrize("fix", [False, True])
def test_cli_check_plot(tmp_path, capsys, suffix, magic, fix):
    src = tmp_path / "model.py"
    src.write_text(MODEL_FILE)
    out = tmp_path / f"profile{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = main(["check", str(src), "--plot", str(out), "--fail-on", "never"] + (["--fix"] if fix else []))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = out.read_bytes()
    assert data.startswith(magic)
    if suffix == ".svg":
        assert b"<svg" in data and b"signal" in data
        assert (b"signal-after" in data) == fix


def test_cli_plot_rejects_other_formats(tmp_path, capsys):
    src = tmp_path / "model.py"
    src.write_text(MODEL_FILE)
    assert main(["check", str(src), "--plot", str(tmp_path / "p.jpg")]) == 2
    assert "--plot" in capsys.readouterr().err
