"""TensorBoard output read back with EventAccumulator: the diagnosis as `initdoctor` plugin data at
every sampled step, the tags of DESIGN §2, a user's layout kept, check's before/after runs; and the
tab's backend routes. The browser test is in test_tensorboard_browser.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import initdoctor
from initdoctor.cli import main
from initdoctor.report import tensorboard as tb
from initdoctor.tensorboard_plugin.metadata import DIAGNOSIS_TAG, PLUGIN_NAME
from tests import test_watch as watch_tests

EA = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def tanh_mlp(depth: int = 4, width: int = 16, std: float | None = None) -> nn.Sequential:
    return watch_tests.tanh_mlp(depth, width, std)


def train(model: nn.Module, steps: int, doctor=None, writer=None) -> None:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, y = torch.randn(16, model[0].in_features), torch.randint(0, 4, (16,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
        if doctor is not None:
            doctor.step()


def accumulate(log_dir) -> EA.EventAccumulator:
    acc = EA.EventAccumulator(str(log_dir), size_guidance={EA.SCALARS: 0, EA.IMAGES: 0, EA.TENSORS: 0,
                                                           EA.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def diagnoses(acc) -> list[tuple[int, dict]]:
    return [(e.step, json.loads(e.tensor_proto.string_val[0])) for e in acc.Tensors(DIAGNOSIS_TAG)]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A watched run of a sick (tiny-init) tanh net: samples at steps 0, 2, 4."""
    log_dir = tmp_path_factory.mktemp("watched")
    model = tanh_mlp(std=0.02)
    with initdoctor.watch(model, log_dir=str(log_dir), every=2, images_every=1, warn=False) as doctor:
        train(model, 6, doctor)
    return accumulate(log_dir), doctor


def test_watch_writes_the_whole_diagnosis_as_plugin_data_at_every_sampled_step(watched):
    acc, doctor = watched
    points = diagnoses(acc)
    assert [s for s, _ in points] == [0, 2, 4]
    meta = acc.SummaryMetadata(DIAGNOSIS_TAG)
    assert meta.plugin_data.plugin_name == PLUGIN_NAME
    for step, d in points:
        assert d["step"] == step and d["source"] == "watch"
        assert {"initdoctor", "findings", "layers", "plan", "target"} <= set(d)
        assert [lay["name"] for lay in d["layers"] if lay["index"] >= 0] == ["0", "2", "4", "6", "8"]
    # the payload is the diagnosis the watcher returned, not a summary of it
    last = doctor.last.to_dict()
    assert points[-1][1]["findings"] == json.loads(json.dumps(last["findings"]))
    assert {f["code"] for f in points[0][1]["findings"] if f["severity"] != "info"} >= {"ID203"}


def test_scalar_tags_follow_the_contract(watched):
    acc, doctor = watched
    scalars = acc.Tags()["scalars"]
    pattern = re.compile(r"^initdoctor\.([a-z0-9_]+)/(\d{3})\.(.+)$")
    layer_tags = [t for t in scalars if not t.startswith("initdoctor.summary/")]
    assert layer_tags and all(pattern.match(t) for t in layer_tags), layer_tags
    groups = {pattern.match(t).group(1) for t in layer_tags}
    assert groups == {"log10_signal", "log10_scale", "log10_gradient", "saturation", "weight_grad_ratio"}
    # execution order in the index, the module path after it
    assert sorted(t for t in layer_tags if t.startswith("initdoctor.log10_gradient/")) == [
        f"initdoctor.log10_gradient/{i:03d}.{name}" for i, name in enumerate(["0", "2", "4", "6", "8"])]
    # log10 of what was measured
    first = doctor.history[0]["layers"]["2"]
    assert acc.Scalars("initdoctor.log10_signal/001.2")[0].value == pytest.approx(math.log10(first["signal"]), rel=1e-5)
    assert acc.Scalars("initdoctor.log10_gradient/001.2")[0].value == pytest.approx(math.log10(first["grad_q"]), rel=1e-5)
    # the activation metric is named after the weight layer that feeds the tanh (module "1")
    assert acc.Scalars("initdoctor.saturation/000.0")[0].value == pytest.approx(first_saturated(doctor, "0"))
    assert not [t for t in scalars if t.endswith(".1") or t.endswith(".3")]
    # one regex picks a metric, one a layer
    assert len([t for t in scalars if re.search(r"^initdoctor\.log10_gradient/", t)]) == 5
    assert len([t for t in scalars if re.search(r"/\d+\.4$", t)]) == 5


def first_saturated(doctor, name: str) -> float:
    return doctor.history[0]["layers"][name]["saturated"]


def test_summary_scalars_compare_runs(watched):
    acc, doctor = watched
    for key in ("log10_signal_ratio", "log10_gradient_ratio", "errors", "warnings"):
        assert [e.step for e in acc.Scalars(f"initdoctor.summary/{key}")] == [0, 2, 4]
    layers = doctor.history[0]["layers"]
    grad = acc.Scalars("initdoctor.summary/log10_gradient_ratio")[0].value
    assert grad == pytest.approx(math.log10(layers["0"]["grad_q"] / layers["8"]["grad_q"]), rel=1e-5)
    assert grad < -2  # the sick net's gradient vanishes toward the input
    assert acc.Scalars("initdoctor.summary/errors")[0].value >= 1


def test_histograms_of_weights_outputs_and_gradients(watched):
    acc, _ = watched
    hist = acc.Tags()["histograms"]
    for kind in ("weights", "outputs", "weight_gradients"):
        assert f"initdoctor.{kind}/000.0" in hist, hist
    assert "initdoctor.depth_profile" in acc.Tags()["images"]
    assert "initdoctor.history" in acc.Tags()["images"]


def test_findings_text_only_when_findings_change(tmp_path):
    # a healthy start, then the weights are blown up so saturation appears and stays
    model = tanh_mlp(std=0.4)
    with initdoctor.watch(model, log_dir=str(tmp_path), every=1, images_every=100, warn=False) as doctor:
        train(model, 3, doctor)
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(30)
        train(model, 3, doctor)
    acc = accumulate(tmp_path)
    (tag,) = [t for t in acc.Tags()["tensors"] if t.startswith(tb.FINDINGS_TAG)]
    steps = [e.step for e in acc.Tensors(tag)]
    fired = [tuple(sorted((f["code"], f["severity"], tuple(f["layers"])) for f in d["findings"]
                          if f["severity"] != "info")) for _, d in diagnoses(acc)]
    changes = [0] + [i for i in range(1, len(fired)) if fired[i] != fired[i - 1]]
    assert len(fired) == 6 and len(changes) < 6  # otherwise this test proves nothing
    assert set(changes) <= set(steps) and len(steps) < 6
    assert "ID301" in acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()


def test_user_layout_survives_watch_writer(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    writer.add_custom_scalars({"training": {"loss": ["Multiline", ["train/loss"]]}})
    model = tanh_mlp()
    with initdoctor.watch(model, writer=writer, every=2, warn=False) as doctor:
        train(model, 4, doctor, writer)
    writer.close()
    acc = accumulate(tmp_path)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {cat.title: {c.title: list(c.multiline.tag) for c in cat.chart} for cat in layout.category}
    assert charts["training"] == {"loss": ["train/loss"]}
    ours = charts["initdoctor"]
    assert any(tags == [r"^initdoctor\.log10_gradient/"] for tags in ours.values())
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [s for s, _ in diagnoses(acc)] == [0, 2]


def test_merged_layout_replaces_only_its_own_category():
    from tensorboard.plugins.custom_scalar import layout_pb2

    first = tb.merged_layout(None)
    again = layout_pb2.Layout()
    again.ParseFromString(tb.merged_layout(first))
    assert [c.title for c in again.category] == ["initdoctor"]


SICK_MODEL = (
    "import torch\nfrom torch import nn\n"
    "def build_model():\n"
    "    torch.manual_seed(0)\n"
    "    layers = []\n"
    "    for _ in range(6):\n"
    "        lin = nn.Linear(32, 32); nn.init.normal_(lin.weight, 0, 1.0); layers += [lin, nn.ReLU()]\n"
    "    return nn.Sequential(*layers, nn.Linear(32, 2))\n"
    "def example_input():\n    return torch.randn(64, 32)\n")


def test_check_tensorboard_writes_before_and_after_runs_and_says_where(tmp_path, capsys):
    model_file = tmp_path / "m.py"
    model_file.write_text(SICK_MODEL)
    out = tmp_path / "tb"
    assert main(["check", str(model_file), "--fix", "--tensorboard", str(out), "--fail-on", "never",
                 "--format", "json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays the JSON report
    assert str(out / "before") in captured.err and f"tensorboard --logdir {out}" in captured.err
    before, after = accumulate(out / "before"), accumulate(out / "after")
    b_scale = before.Scalars("initdoctor.log10_scale/000.0")
    a_scale = after.Scalars("initdoctor.log10_scale/000.0")
    assert [e.step for e in b_scale] == [0] and [e.step for e in a_scale] == [0]
    # N(0, 1) weights blow the scale up; the cure brings it down by more than a decade
    assert b_scale[0].value > a_scale[0].value + 1
    # a synthetic loss gives |dW|/|W| no meaning: check does not write it
    assert not [t for t in before.Tags()["scalars"] if "weight_grad_ratio" in t]
    (step, d), = diagnoses(before)
    assert d["role"] == "before" and d["source"] == "check" and "after" in d
    (_, d_after), = diagnoses(after)
    assert d_after["role"] == "after"
    assert before.Tags()["images"] == ["initdoctor.depth_profile"]


def test_check_tensorboard_without_fix_writes_one_run(tmp_path, capsys):
    model_file = tmp_path / "m.py"
    model_file.write_text(SICK_MODEL)
    assert main(["check", str(model_file), "--tensorboard", str(tmp_path / "tb"), "--fail-on", "never"]) == 0
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["before"]


# --- the tab's backend, without a browser -----------------------------------------------------

def test_history_route_lines_up_layers_and_steps():
    from initdoctor.tensorboard_plugin.plugin import history

    d0 = {"step": 0, "layers": [{"name": "a", "index": 0, "signal": 1.0, "grad_q": 2.0},
                                {"name": "b", "index": 1, "signal": 0.5, "grad_q": None}]}
    d1 = {"step": 5, "layers": [{"name": "b", "index": 1, "signal": 0.25, "grad_q": 1.0},
                                {"name": "c", "index": 2, "signal": 3.0},
                                {"name": "never", "index": -1, "signal": 9.0}]}
    h = history([d0, d1])
    assert h["steps"] == [0, 5] and h["layers"] == ["a", "b", "c"]
    assert h["signal"] == [[1.0, None], [0.5, 0.25], [None, 3.0]]
    assert h["grad_q"] == [[2.0, None], [None, 1.0], [None, None]]


def test_plugin_routes_serve_runs_diagnoses_and_rule_pages(watched, tmp_path):
    from tensorboard import errors
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from initdoctor.tensorboard_plugin.plugin import InitDoctorPlugin

    model = tanh_mlp(std=0.02)
    with initdoctor.watch(model, log_dir=str(tmp_path / "sick"), every=2, warn=False) as doctor:
        train(model, 4, doctor)
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    ctx = base_plugin.TBContext(logdir=str(tmp_path), multiplexer=mux,
                                data_provider=data_provider.MultiplexerDataProvider(mux, str(tmp_path)))
    plugin = InitDoctorPlugin(ctx)
    assert plugin.is_active()
    assert plugin.frontend_metadata().es_module_path == "/index.js"
    empty = plugin_event_multiplexer.EventMultiplexer()
    assert not InitDoctorPlugin(base_plugin.TBContext(multiplexer=empty)).is_active()
    apps = plugin.get_plugin_apps()

    def get(route: str, query: str = ""):
        try:
            resp = Client(apps[route]).get(route, query_string=query)
        except errors.PublicError as e:  # TensorBoard's middleware turns these into responses
            return e.http_code, str(e).encode()
        return resp.status_code, resp.get_data()

    status, body = get("/runs")
    listing = json.loads(body)
    assert status == 200 and listing["runs"]["sick"]["steps"] == [0, 2] and listing["band"] == [0.01, 100.0]
    status, body = get("/diagnosis", "run=sick&step=2")
    assert status == 200 and json.loads(body)["step"] == 2
    assert json.loads(get("/diagnosis", "run=sick")[1])["step"] == 2  # the latest by default
    assert get("/diagnosis", "run=sick&step=1")[0] == 404
    assert get("/diagnosis", "run=nope")[0] == 404
    assert get("/diagnosis", "run=sick&step=x")[0] == 400
    assert json.loads(get("/history", "run=sick")[1])["steps"] == [0, 2]
    status, body = get("/explain", "code=id203")
    assert status == 200 and json.loads(body)["page"].startswith("# ID203 vanishing-gradients")
    assert get("/explain", "code=ID999")[0] == 404
    status, body = get("/index.js")
    assert status == 200 and b"export async function render" in body


def test_figures_are_titled_with_step_and_role(monkeypatch):
    from initdoctor.report import plots

    titles, images = [], []
    real = plots.depth_profile
    monkeypatch.setattr(plots, "depth_profile", lambda *a, **kw: titles.append(kw["title"]) or real(*a, **kw))

    class Recorder:
        def add_image(self, tag, img, step, dataformats):
            images.append((tag, img.shape, step))

        def add_histogram(self, *a, **kw):
            pass

    diag = initdoctor.fix(tanh_mlp(std=0.02), torch.randn(32, 16)).before
    tb.RunWriter(Recorder(), source="check", role="before").figures(diag, 0, after=diag.after)
    tb.RunWriter(Recorder(), source="watch").figures(diag, 40)
    assert titles[0].endswith("step 0, before (dashed: after --fix)")
    assert titles[1].endswith("step 40")
    # large enough to read at page width: at least 1000 pixels wide
    assert all(tag == "initdoctor.depth_profile" and shape[1] >= 1000 for tag, shape, _ in images)


def test_loader_keeps_more_steps_unless_told(tmp_path):
    import argparse

    from initdoctor.tensorboard_plugin.plugin import KEEP_STEPS, InitDoctorLoader

    flags = argparse.Namespace(samples_per_plugin={})
    InitDoctorLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {PLUGIN_NAME: KEEP_STEPS} and KEEP_STEPS > 10
    flags = argparse.Namespace(samples_per_plugin={PLUGIN_NAME: 5})
    InitDoctorLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {PLUGIN_NAME: 5}


def test_tensorboard_serves_every_sampled_step_of_a_long_run(tmp_path):
    # 12 samples: more than the 10 TensorBoard keeps of a plugin's data unless the plugin asks
    from tests.tensorboard_server import get, serve

    model = tanh_mlp(depth=2, width=8)
    with initdoctor.watch(model, log_dir=str(tmp_path / "runs" / "long"), every=1, histograms=False,
                          warn=False) as doctor:
        train(model, 12, doctor)
    with serve(tmp_path / "runs", runs=1) as url:
        listing = json.loads(get(f"{url}/data/plugins_listing"))
        assert listing[PLUGIN_NAME]["enabled"] is True  # found through the entry point
        runs = json.loads(get(f"{url}/data/plugin/initdoctor/runs"))["runs"]
        assert runs["long"]["steps"] == list(range(12))
        history = json.loads(get(f"{url}/data/plugin/initdoctor/history?run=long"))
        assert history["steps"] == list(range(12)) and history["layers"] == ["0", "2", "4"]


def test_check_writes_weight_gradient_histograms(tmp_path):
    from initdoctor.cli import main

    f = tmp_path / "m.py"
    f.write_text("import torch\nfrom torch import nn\n"
                 "def build_model():\n    torch.manual_seed(0)\n"
                 "    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))\n"
                 "def example_input():\n    return torch.randn(32, 8)\n")
    assert main(["check", str(f), "--tensorboard", str(tmp_path / "tb"), "--fail-on", "never"]) == 0
    acc = EA.EventAccumulator(str(tmp_path / "tb" / "before"), size_guidance={EA.HISTOGRAMS: 0})
    acc.Reload()
    grads = [t for t in acc.Tags()["histograms"] if t.startswith("initdoctor.weight_gradients/")]
    assert len(grads) == 2
    h = acc.Histograms(grads[0])[0].histogram_value
    assert h.num == 8 * 16 and h.max > h.min  # every entry of the first layer's gradient, not constant
