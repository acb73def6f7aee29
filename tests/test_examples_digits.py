"""examples/train_digits.py, reduced: every fixed model learns the digits where its sick twin does not.

Measured at 300 steps (seeds 0-4): fixed models 0.924-0.973 test accuracy, sick twins 0.10-0.26, so
0.9 and 0.5 leave headroom on both sides. Scaling the fixed weights by 1 +- 1e-7 or 1 + 1e-6 (the size
of the float rounding a different torch build brings) moves no fixed model below 0.92. The 30-layer
demonstration (exempt from the goal) is left out here; the full script shows it.
"""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
pytest.importorskip("sklearn")

PATH = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
GRADED = ["relu12_default", "relu6_normal", "tanh10_uniform", "sigmoid10_xavier", "tanh3_constant"]
STEPS = 300


def _load():
    spec = importlib.util.spec_from_file_location("train_digits", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return _load()


@pytest.fixture(scope="module")
def results(example):
    return example.main(steps=STEPS, models=GRADED, seed=0, verbose=False)


def test_quick_includes_deep_relu_and_sigmoid(example):
    assert {"relu12_default", "sigmoid10_xavier"} <= set(example.QUICK)
    assert set(GRADED) == {n for n, (_, _, demo) in example.MODELS.items() if not demo}


@pytest.mark.parametrize("name", GRADED)
def test_fixed_model_learns_where_sick_twin_does_not(results, name):
    r = results["models"][name]
    sick, fixed = r["sick"]["acc"], r["fixed"]["acc"]
    assert fixed >= 0.9, (name, sick, fixed)
    assert sick <= 0.5, (name, sick, fixed)
    assert fixed - sick >= 0.4, (name, sick, fixed)


@pytest.mark.parametrize("name", GRADED)
def test_initdoctor_fires_before_and_is_silent_after(results, name):
    r = results["models"][name]
    assert r["before"], name  # the sick model is diagnosed
    assert r["after"] == [], (name, r["after"])  # and cured: no warning or error remains
    assert r["cured"], name


def test_sigmoid_prescription_is_gain_4_with_gain_1_at_the_ends(results):
    assert results["models"]["sigmoid10_xavier"]["gains"] == [1.0, 4.0]


def test_goal_and_config(results, example):
    assert results["goal_met"]
    c = results["config"]
    assert (c["lr"], c["momentum"], c["steps"]) == (example.LR, 0.9, STEPS)


def test_reproducible(example):
    a = example.main(steps=50, models=["tanh3_constant"], seed=1, verbose=False)["models"]["tanh3_constant"]
    b = example.main(steps=50, models=["tanh3_constant"], seed=1, verbose=False)["models"]["tanh3_constant"]
    assert (a["sick"], a["fixed"], a["before"]) == (b["sick"], b["fixed"], b["before"])
