"""initdoctor's TensorBoard tab, seen in a real browser: TensorBoard serves event files of a sick and
a cured watched run and of a `check --fix` run on 127.0.0.1, headless Chromium (the system's, driven
by Playwright) loads the tab, and the test checks what a person would look at.

INITDOCTOR_SCREENSHOTS=docs/img makes it save the screenshots that docs/tensorboard.md shows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from tests.tensorboard_server import get, serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install chromium): the TensorBoard tab's browser test "
                "is skipped", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytest.importorskip("sklearn")


def _write_runs(log_dir: Path) -> None:
    import initdoctor
    from initdoctor.cli import main

    spec = importlib.util.spec_from_file_location("watch_training", ROOT / "examples" / "watch_training.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", initdoctor.InitDoctorWarning)
        example.main(steps=9, every=4, log_dir=str(log_dir))  # sick/ and cured/, samples at 0, 4, 8
    assert main(["check", str(ROOT / "examples" / "xavier_classic.py"), "--fix", "--tensorboard",
                 str(log_dir / "check"), "--fail-on", "never", "--output", os.devnull]) == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("runs")
    _write_runs(log_dir)
    with serve(log_dir, runs=4) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def tab(server, browser):
    """The initdoctor tab inside TensorBoard's own page, as a person opens it."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server}/?darkMode=false#initdoctor")
    frame = page.frame_locator("iframe")
    frame.locator("body[data-ready=true]").wait_for(timeout=60_000)
    yield page, frame
    page.close()
    assert not errors, errors


def _screenshot(target, name: str) -> None:
    out = os.environ.get("INITDOCTOR_SCREENSHOTS")
    if out:
        target.screenshot(path=str(Path(out) / name))


def test_plugin_is_listed(server):
    listing = json.loads(get(f"{server}/data/plugins_listing"))
    assert listing["initdoctor"]["enabled"] is True
    assert listing["initdoctor"]["loading_mechanism"] == {"type": "IFRAME",
                                                         "module_path": "/data/plugin/initdoctor/index.js"}


def test_tab_shows_the_sick_runs_findings_layers_and_charts(tab):
    page, frame = tab
    assert "initdoctor" in page.locator("body").inner_text().lower()  # the tab in TensorBoard's bar
    assert frame.locator(".run").evaluate_all("els => els.map(e => e.dataset.run)") == [
        "check/before", "check/after", "cured", "sick"]
    sick = frame.locator('.run[data-run="sick"]')
    cured = frame.locator('.run[data-run="cured"]')
    # findings, errors first, with code, layers and fix
    codes = sick.locator(".finding").evaluate_all("els => els.map(e => e.dataset.code)")
    assert codes and codes[0] == "ID203", codes
    severities = sick.locator(".finding .sev").all_inner_texts()
    assert severities == sorted(severities, key=lambda s: ["ERROR", "WARNING", "INFO"].index(s.upper()))
    first = sick.locator(".finding").first.inner_text()
    assert "vanishing-gradients" in first and "fix:" in first
    assert cured.locator(".finding").count() == 0 and "healthy" in cured.locator(".badge").inner_text()
    # layer names: on the table and on the chart's axis, in execution order
    names = [str(i) for i in range(0, 21, 2)]
    assert sick.locator("table.layers tbody tr td:nth-child(2)").all_inner_texts() == names
    assert sick.locator("svg.depth-profile text.layer-name").all_text_contents() == names
    # a chart with data points drawn: signal and gradient of each of the 11 layers
    assert sick.locator("svg.depth-profile circle.point.signal").count() == 11
    assert sick.locator("svg.depth-profile circle.point.gradient").count() == 11
    assert sick.locator("svg.depth-profile rect.mark.error").count() >= 10  # ID203 marked where it fires
    # 16 decades on the axis, at most ~10 of them labelled so that they stay readable
    assert 4 <= sick.locator("svg.depth-profile text.tick").count() <= 11
    # the heatmap: 11 layers x 3 sampled steps per panel
    assert sick.locator("svg.heatmap-signal rect.cell").count() == 33
    assert sick.locator("svg.heatmap-grad_q rect.cell").count() == 33
    # check --fix: before and after curves in one chart
    before = frame.locator('.run[data-run="check/before"]')
    assert before.locator("svg.depth-profile path.curve").count() == 4
    # the run picker: hiding the check runs puts the sick and the cured run side by side
    for run in ("check/before", "check/after"):
        frame.locator(f'input[data-run="{run}"]').uncheck()
        assert frame.locator(f'.run[data-run="{run}"]').is_hidden()
    box_sick, box_cured = sick.bounding_box(), cured.bounding_box()
    assert abs(box_sick["y"] - box_cured["y"]) < 1 and box_cured["x"] < box_sick["x"]
    _screenshot(page, "tensorboard-tab.png")


def test_a_narrow_window_stacks_the_runs(server, browser):
    # the plugin's own page (what TensorBoard puts in its iframe), at the width of a laptop split screen
    page = browser.new_page(viewport={"width": 820, "height": 900})
    try:
        page.goto(f"{server}/data/plugin_entry.html?name=initdoctor")
        page.locator("body[data-ready=true]").wait_for(timeout=60_000)
        boxes = [page.locator(f'.run[data-run="{r}"]').bounding_box() for r in ("cured", "sick")]
        assert boxes[1]["y"] > boxes[0]["y"] + boxes[0]["height"] - 1  # one under the other
        profile = page.locator('.run[data-run="sick"] svg.depth-profile').bounding_box()
        assert 600 < profile["width"] <= 820
        _screenshot(page.locator('.run[data-run="sick"]'), "tensorboard-tab-sick.png")
        _screenshot(page.locator('.run[data-run="check/before"]'), "tensorboard-tab-check.png")
    finally:
        page.close()


def test_time_series_groups_cards_by_metric(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{server}/?darkMode=false#timeseries")
        page.get_by_text("initdoctor.log10_gradient").first.wait_for(timeout=60_000)
        text = page.locator("body").inner_text()
        for group in ("initdoctor.log10_signal", "initdoctor.log10_gradient", "initdoctor.summary",
                      "initdoctor.weight_gradients", "train"):
            assert group in text, group
        # one regex picks a metric: the gradient of every layer of every run, with the summary
        page.goto(f"{server}/?darkMode=false&tagFilter=%5Einitdoctor%5C.(log10_gradient%7Csummary)#timeseries")
        page.get_by_text("initdoctor.log10_gradient/000.0").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)  # let the charts draw their lines
        _screenshot(page, "tensorboard-time-series.png")
    finally:
        page.close()


def test_step_selector_changes_what_is_shown(tab):
    _, frame = tab
    sick = frame.locator('.run[data-run="sick"]')
    select = sick.locator("select.step-select")
    assert select.input_value() == "8"  # the latest by default
    assert sick.locator("option").all_inner_texts() == ["step 0", "step 4", "step 8"]
    signal_at_8 = sick.locator("table.layers tbody tr td:nth-child(7)").all_inner_texts()
    select.select_option("0")
    frame.locator('.run[data-run="sick"][data-step="0"]').wait_for()
    signal_at_0 = sick.locator("table.layers tbody tr td:nth-child(7)").all_inner_texts()
    assert len(signal_at_0) == len(signal_at_8) == 11
    assert signal_at_0 != signal_at_8


def test_table_sorts_and_a_finding_opens_its_rule_page(tab):
    _, frame = tab
    sick = frame.locator('.run[data-run="sick"]')
    header = sick.locator("table.layers th").nth(8)
    assert header.inner_text() == "G"
    header.click()
    g = [float(v) for v in sick.locator("table.layers tbody tr td:nth-child(9)").all_inner_texts()]
    assert g == sorted(g) and g != [float(v) for v in sorted(g, reverse=True)]
    sick.locator('.finding[data-code="ID203"]').click()
    panel = frame.locator("#explain.open")
    panel.wait_for()
    panel.locator("pre.page").wait_for()
    text = panel.inner_text()
    assert "ID203 vanishing-gradients" in text and "What it does" in text


def test_a_finding_whose_layers_the_plan_keeps_says_keep_not_fix(tmp_path, browser):
    # a GPT drawn at its own std 0.02: ID501 notes the MLP layers (He would be 0.088), and the plan
    # keeps all of them as the model's deliberate scale; the tab must say so, not "fix: ..."
    import torch

    import initdoctor
    from initdoctor.report.tensorboard import RunWriter, open_writer, write_diagnosis
    from tests.models.zoo import GPT

    torch.manual_seed(0)
    diag = initdoctor.check(GPT(), torch.randint(0, 100, (4, 16)))
    note = next(f for f in diag.findings if f.code == "ID501")
    plan = {p.layer: p for p in diag.plan}
    assert note.layers and all(plan[n].scheme == "keep" for n in note.layers)
    write_diagnosis(diag, str(tmp_path / "runs"))
    # the same note from a watch, which computes no plan: no advice under it either
    writer = open_writer(str(tmp_path / "runs" / "watch"))
    RunWriter(writer, source="watch").write(dataclasses.replace(diag, plan=[]), 0)
    writer.close()
    with serve(tmp_path / "runs", runs=2) as url:
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        try:
            page.goto(f"{url}/?darkMode=false#initdoctor")
            frame = page.frame_locator("iframe")
            frame.locator("body[data-ready=true]").wait_for(timeout=60_000)
            watched = frame.locator('.run[data-run="watch"] .finding[data-code="ID501"]').inner_text()
            assert "fix:" not in watched and "plan:" not in watched
            item = frame.locator('.run:not([data-run="watch"]) .finding[data-code="ID501"]')
            text = item.inner_text()
            assert "plan: keep — " + plan[note.layers[0]].reason in text
            assert f"{note.layers[0]} and {len(note.layers) - 1} more" in text
            assert "fix:" not in text  # (a finding with layers to re-draw keeps it: the sick run above)
            _screenshot(item, "tensorboard-kept.png")
        finally:
            page.close()
