"""Properties over random MLPs (hypothesis, bounded and derandomized so CI is deterministic).

The analytic claims (He + ReLU and Xavier(5/3) + tanh stay silent up to depth 20; N(0, 1) ReLU nets
explode) are made only at widths >= 64, where a layer's factor is close to its expectation.
"""

from __future__ import annotations

import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import initdoctor
from initdoctor.report import _clean
from initdoctor.vocab import SCHEMES

BOUNDED = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def any_mlp(draw):
    """depth 2-30 at widths 8-128, or a 512-wide net of depth 2-3; any activation and init."""
    if draw(st.integers(0, 5)) == 0:
        depth, width = draw(st.integers(2, 3)), 512
    else:
        depth, width = draw(st.integers(2, 30)), draw(st.sampled_from([8, 16, 32, 64, 128]))
    act = draw(st.sampled_from(["sigmoid", "tanh", "relu", "gelu"]))
    init = draw(st.sampled_from(["xavier", "he", "normal"]))
    sigma = draw(st.floats(1e-3, 3.0)) if init == "normal" else 1.0
    bias = draw(st.sampled_from([0.0, None]))
    seed = draw(st.integers(0, 2**16))
    return dict(depth=depth, width=width, act=act, init=init, sigma=sigma, bias=bias, seed=seed)


@st.composite
def healthy_mlp(draw):
    act, init = draw(st.sampled_from([("relu", "he"), ("tanh", "xavier")]))
    return dict(depth=draw(st.integers(2, 20)), width=draw(st.sampled_from([64, 96, 128])), act=act, init=init,
                seed=draw(st.integers(0, 2**16)))


def _fired_id2(diag) -> list[tuple[str, str, float | None]]:
    return [(f.code, f.severity, f.evidence.get("ratio")) for f in diag.problems() if f.code.startswith("ID2")]


@BOUNDED
@given(spec=healthy_mlp())
def test_textbook_inits_never_fire_depth_trends(tiny, spec):
    """He for ReLU and Xavier with gain 5/3 for tanh keep signal and gradient within the band to depth 20."""
    model = tiny.mlp(**spec)
    d = initdoctor.check(model, tiny.batch(128, spec["width"], seed=spec["seed"] + 1))
    assert _fired_id2(d) == []


@settings(BOUNDED, max_examples=15)
@given(depth=st.integers(6, 30), width=st.sampled_from([64, 128]), seed=st.integers(0, 2**16))
def test_unit_normal_relu_always_explodes(tiny, depth, width, seed):
    model = tiny.mlp(depth, width, "relu", "normal", sigma=1.0, seed=seed)
    d = initdoctor.check(model, tiny.batch(64, width, seed=seed + 1))
    assert tiny.severity(d, "ID202") in ("warning", "error")


@BOUNDED
@given(spec=any_mlp())
def test_check_never_crashes_leaks_or_mutates(tiny, spec):
    model = tiny.mlp(**spec)
    x = tiny.batch(64, spec["width"], seed=spec["seed"] + 1)
    snap = tiny.snapshot(model)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    d = initdoctor.check(model, x, seed=spec["seed"])

    tiny.assert_no_hooks(model)
    tiny.assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)

    # the report is strict JSON and renders as text
    text = json.dumps(_clean(d.to_dict()), allow_nan=False)
    assert json.loads(text)["layers"][0]["name"] == "0"
    assert str(d)

    # statistics are self-consistent
    assert [lay.name for lay in d.layers] == [str(2 * i) for i in range(spec["depth"] + 1)]
    for lay in d.layers:
        assert lay.index >= 0 and lay.calls == 1
        if lay.q is not None and math.isfinite(lay.q) and lay.signal is not None and math.isfinite(lay.signal):
            assert 0.0 <= lay.signal <= lay.q * (1 + 1e-9) + 1e-300
        for share in (lay.saturated, lay.saturated_units, lay.dead):
            assert share is None or 0.0 <= share <= 1.0
        assert lay.grad_q is None or math.isnan(lay.grad_q) or lay.grad_q >= 0.0
    assert {p.scheme for p in d.plan} <= set(SCHEMES)
    assert all(f.severity in ("error", "warning", "info") for f in d.findings)


@settings(BOUNDED, max_examples=15)
@given(spec=any_mlp())
def test_fix_never_adds_a_finding(tiny, spec):
    model = tiny.mlp(**spec)
    x = tiny.batch(64, spec["width"], seed=spec["seed"] + 1)
    ids = [id(p) for p in model.parameters()]
    rng = torch.get_rng_state()
    result = initdoctor.fix(model, x, seed=spec["seed"])
    assert result.after.codes() - result.before.codes() <= {"ID906"}
    assert [id(p) for p in model.parameters()] == ids
    assert torch.equal(torch.get_rng_state(), rng)
    tiny.assert_no_hooks(model)
    json.dumps(_clean(result.before.to_dict()), allow_nan=False)
