"""Every rule: a small model that must fire it, a benign look-alike that must not, and hand-built
statistics at the exact boundaries of initdoctor/thresholds.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initdoctor
from initdoctor import thresholds as T
from initdoctor.codes import CODES
from initdoctor.diagnosis import judge
from initdoctor.plan import make_plan
from initdoctor.rules import RULES, Finding
from initdoctor.stats import ActivationStats, LayerStats, ModelStats, SymmetryStats
from initdoctor.weights import duplicate_groups

# --- hand-built statistics ---------------------------------------------------------------------------


def layer(name: str, index: int, *, q: float | None = 1.0, r: float | None = 0.5, g: float | None = 1.0,
          shape=(8, 8), type_: str = "Linear", normalized: bool = False, weight_rms: float | None = 0.5,
          activation: str = "relu", symmetry=()) -> LayerStats:
    return LayerStats(name=name, type=type_, index=index, calls=1 if index >= 0 else 0, weight_shape=list(shape),
                      fan_in=shape[1], fan_out=shape[0], activation=activation, weight_mean=0.0,
                      weight_std=weight_rms, weight_rms=weight_rms, q=q, signal=None if q is None or r is None
                      else q * r, r=r, grad_q=g, normalized=normalized, units=shape[0], samples=64,
                      symmetry=list(symmetry))


def group(metric: str, ratio: float, n: int = 3, **kw) -> ModelStats:
    """n homologous layers whose `metric` changes by `ratio` from the first to the last (as the rules read it)."""
    values = [ratio ** (i / (n - 1)) for i in range(n)]
    layers = []
    for i, v in enumerate(values):
        args = dict(kw)
        if metric == "signal":
            args["q"] = v
        elif metric == "collapse":
            args["r"] = v
        elif metric == "gradient":
            args["g"] = values[n - 1 - i]  # G_first / G_last = ratio
        layers.append(layer(f"blocks.{i}.fc", i, **args))
    return ModelStats(layers, [], [])


def findings_of(stats: ModelStats, select: list[str] | None = None, ignore: list[str] | None = None) -> list[Finding]:
    return judge(stats, select, ignore)[0]


def act(kind: str, **kw) -> ActivationStats:
    return ActivationStats(name="1", kind=kind, layer="0", index=0, calls=1, units=8, **kw)


def stats_with(*acts: ActivationStats) -> ModelStats:
    return ModelStats([layer("0", 0)], list(acts), [])


def severities(stats: ModelStats, code: str) -> list[str]:
    return [f.severity for f in findings_of(stats, select=[code]) if f.code == code]


def sev(stats: ModelStats, code: str) -> str | None:
    s = severities(stats, code)
    assert len(s) <= 1, s
    return s[0] if s else None


# --- the registry ----------------------------------------------------------------------------------


def test_every_code_has_a_rule_and_a_page():
    for code in CODES:
        if code in ("ID906",):  # written by fix(), not by a rule
            continue
        assert code in RULES, code
    for code in RULES:
        assert initdoctor.codes.page(code).startswith(f"# {code}")


def test_finding_to_dict_contract():
    f = Finding("ID203", "error", ["0"], "msg", {"ratio": 1e-9})
    assert f.to_dict() == {"code": "ID203", "name": "vanishing-gradients", "severity": "error", "layers": ["0"],
                           "message": "msg", "evidence": {"ratio": 1e-9}}
    assert f.fired and not Finding("ID903", "info", [], "").fired


def test_healthy_statistics_fire_nothing():
    assert findings_of(group("signal", 1.0)) == []


def test_select_and_ignore_by_prefix():
    stats = ModelStats(group("signal", 1e-6).layers, [act("relu", dead=1.0)], [])
    assert {f.code for f in findings_of(stats)} == {"ID201", "ID303"}
    assert {f.code for f in findings_of(stats, select=["ID2"])} == {"ID201"}
    assert {f.code for f in findings_of(stats, select=["id3"])} == {"ID303"}
    assert {f.code for f in findings_of(stats, ignore=["ID2"])} == {"ID303"}
    assert findings_of(stats, select=["ID2"], ignore=["ID201"]) == []


def test_findings_sorted_errors_first():
    stats = ModelStats(group("signal", 0.5e-2).layers, [act("relu", dead=1.0)], [])
    sevs = [f.severity for f in findings_of(stats)]
    assert sevs == ["error", "warning"]


# --- depth trends at the boundaries --------------------------------------------------------------------


@pytest.mark.parametrize("ratio, expected", [
    (1.0, None), (1.1e-2, None), (1e-2, None), (0.9e-2, "warning"), (1.1e-4, "warning"), (1e-4, "warning"),
    (0.9e-4, "error"), (1e-12, "error"),
])
def test_vanishing_signal_boundaries(ratio, expected):
    stats = group("signal", ratio)
    assert sev(stats, "ID201") == expected
    assert sev(stats, "ID202") is None


@pytest.mark.parametrize("ratio, expected", [
    (1.0, None), (1 / 1.1e-2, None), (1e2, None), (1 / 0.9e-2, "warning"), (1e4, "warning"),
    (1 / 0.9e-4, "error"), (1e12, "error"),
])
def test_exploding_signal_boundaries(ratio, expected):
    stats = group("signal", ratio)
    assert sev(stats, "ID202") == expected
    assert sev(stats, "ID201") is None


@pytest.mark.parametrize("ratio, expected", [(1.1e-2, None), (0.9e-2, "warning"), (1.1e-4, "warning"),
                                             (0.9e-4, "error")])
def test_collapse_boundaries(ratio, expected):
    stats = group("collapse", ratio)
    assert sev(stats, "ID201") == expected
    if expected:
        f = findings_of(stats, select=["ID201"])[0]
        assert f.evidence["metric"] == "collapse"


@pytest.mark.parametrize("ratio, vanishing, exploding", [
    (1.1e-2, None, None), (0.9e-2, "warning", None), (0.9e-4, "error", None),
    (1 / 1.1e-2, None, None), (1 / 0.9e-2, None, "warning"), (1 / 0.9e-4, None, "error"),
])
def test_gradient_boundaries(ratio, vanishing, exploding):
    stats = group("gradient", ratio)
    assert sev(stats, "ID203") == vanishing
    assert sev(stats, "ID204") == exploding


def test_trend_evidence_and_layers():
    stats = group("gradient", 1e-6, n=5)
    (f,) = findings_of(stats, select=["ID203"])
    assert f.layers == [f"blocks.{i}.fc" for i in range(5)]
    assert f.evidence["ratio"] == pytest.approx(1e-6)
    assert f.evidence["per_layer"] == pytest.approx(1e-6 ** 0.25)
    assert f.evidence["members"] == 5


def test_two_layers_are_not_a_trend():
    assert findings_of(group("signal", 1e-9, n=2)) == []
    assert findings_of(group("gradient", 1e9, n=2)) == []


def test_unlike_layers_are_not_compared():
    # same path pattern, different shapes: three groups of one
    layers = [layer(f"blocks.{i}.fc", i, q=10.0 ** (-4 * i), shape=(8, 8 + i)) for i in range(3)]
    assert findings_of(ModelStats(layers, [], [])) == []
    # same shapes, different paths that are not the same once numbers are replaced
    layers = [layer(name, i, q=10.0 ** (-4 * i)) for i, name in enumerate(["enc", "mid", "dec"])]
    assert findings_of(ModelStats(layers, [], [])) == []
    # conv1 and conv2 of the same blocks are kept apart (each group has only two members)
    layers = [layer(f"blocks.{b}.conv{c}", 2 * b + c, q=10.0 ** (-4 * (2 * b + c)), type_="Conv2d")
              for b in range(2) for c in (1, 2)]
    assert findings_of(ModelStats(layers, [], [])) == []


def test_zero_weight_layers_left_out_of_trends():
    stats = group("signal", 1e-9, n=3)
    stats.layers[2].weight_rms = 0.0
    stats.layers[2].weight_std = 0.0
    assert sev(stats, "ID201") is None


def test_layers_that_did_not_run_left_out_of_trends():
    stats = group("signal", 1e-9, n=4)
    stats.layers[3].index = -1
    assert sev(stats, "ID201") == "error"  # 1 -> 1e-6 over the three that ran
    stats = group("signal", 1e-9, n=3)
    stats.layers[0].index = -1
    assert sev(stats, "ID201") is None


def test_normalized_gradient_compares_g_times_q():
    # G grows 1e6 toward the input while q shrinks 1e6: G*q is flat, nothing to report
    layers = [layer(f"blocks.{i}.fc", i, q=10.0 ** (-3 * (2 - i)), g=10.0 ** (3 * (2 - i)), normalized=True)
              for i in range(3)]
    stats = ModelStats(layers, [], [])
    assert sev(stats, "ID204") is None and sev(stats, "ID203") is None
    for lay in layers:
        lay.normalized = False
    assert sev(stats, "ID204") == "error"


# --- saturation, linear regime, dead units at the boundaries ----------------------------------------------


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("s, expected", [(0.0, None), (0.19, None), (0.2, None), (0.21, "warning"),
                                         (0.5, "warning"), (0.51, "error"), (1.0, "error")])
def test_saturated_share_boundaries(kind, s, expected):
    assert sev(stats_with(act(kind, saturated=s, saturated_units=0.0)), "ID301") == expected


@pytest.mark.parametrize("u, expected", [(0.04, None), (0.05, None), (0.06, "warning"), (0.2, "warning"),
                                         (0.21, "error")])
def test_saturated_units_boundaries(u, expected):
    assert sev(stats_with(act("tanh", saturated=0.0, saturated_units=u)), "ID301") == expected


def test_saturation_worst_layer_decides_severity():
    a = act("tanh", saturated=0.3, saturated_units=0.0)
    b = ActivationStats(name="3", kind="tanh", layer="2", index=1, calls=1, units=8, saturated=0.6,
                        saturated_units=0.0)
    (f,) = findings_of(ModelStats([layer("0", 0), layer("2", 1)], [a, b], []), select=["ID301"])
    assert f.severity == "error"
    assert f.layers == ["0", "2"]
    assert f.evidence["saturated"] == {"1": 0.3, "3": 0.6}


def _tied_lm(emb_std: float, pinned: float) -> ModelStats:
    """An embedding (std `emb_std`) tied to an output head whose softmax has `pinned` share of positions
    on one class; three blocks of layers drawn at 0.02."""
    emb = LayerStats(name="emb", type="Embedding", kind="embedding", index=0, calls=1, weight_shape=[50, 8],
                     fan_out=8, weight_std=emb_std, weight_rms=emb_std, residual=True, tied=["head"])
    body = [layer(f"blocks.{i}.fc", i + 1, weight_rms=0.02) for i in range(3)]
    head = layer("head", 4, shape=(50, 8), weight_rms=emb_std, activation="identity")
    head.is_output, head.tied, head.tied_embedding = True, ["emb"], "emb"
    soft = ActivationStats(name="head:softmax", kind="softmax", layer="head", module="head", index=5, calls=1,
                           units=50, saturated=pinned, preact_std=3.0)
    return ModelStats([emb, *body, head], [soft], [])


@pytest.mark.parametrize("pinned, expected", [(0.0, None), (0.2, None), (0.21, "warning"), (0.51, "error")])
def test_pinned_output_softmax_boundaries(pinned, expected):
    assert sev(_tied_lm(0.2, pinned), "ID301") == expected


def test_pinned_output_softmax_names_the_embedding_and_its_cure():
    (f,) = findings_of(_tied_lm(0.2, 1.0), select=["ID301"])
    assert f.layers == ["head"] and f.evidence["own_std"] == 0.02
    assert f.evidence["redraw"] == {"emb": pytest.approx(0.02)}
    plan = {p.layer: p for p in make_plan(_tied_lm(0.2, 1.0), [f])}
    assert plan["emb"].apply and plan["emb"].scheme == "xavier_normal"
    assert plan["head"].apply and "tied to emb" in plan["head"].reason
    assert not any(plan[f"blocks.{i}.fc"].apply for i in range(3))  # only the cause is re-drawn
    # an embedding at the model's own scale is not the cause: nothing to re-draw, and the text says so
    (g,) = findings_of(_tied_lm(0.02, 1.0), select=["ID301"])
    assert g.evidence["redraw"] == {} and "cannot cure" in g.message


@pytest.mark.parametrize("d, expected", [(0.0, None), (0.45, None), (0.5, None), (0.51, "warning"),
                                         (0.98, "warning"), (0.99, "error"), (1.0, "error")])
def test_dead_units_boundaries(d, expected):
    assert sev(stats_with(act("relu", dead=d)), "ID303") == expected


def test_dead_units_not_read_for_saturating_kinds():
    assert sev(stats_with(act("tanh", saturated=0.0, saturated_units=0.0, preact_std=1.0)), "ID303") is None


def _linear_regime(kind: str, stds: list[float], **kw) -> ModelStats:
    acts = [ActivationStats(name=f"a{i}", kind=kind, layer=f"blocks.{i}.fc", index=i, calls=1, units=8,
                            saturated=0.0, saturated_units=0.0, preact_std=s) for i, s in enumerate(stds)]
    layers = [layer(f"blocks.{i}.fc", i, activation=kind, **kw) for i in range(len(stds))]
    return ModelStats(layers, acts, [])


@pytest.mark.parametrize("kind, limit", [("tanh", 0.25), ("sigmoid", 0.5)])
def test_linear_regime_boundaries(kind, limit):
    assert T.LINEAR_STD[kind] == limit
    assert sev(_linear_regime(kind, [limit * 1.01] * 4), "ID302") is None
    assert sev(_linear_regime(kind, [limit * 0.99] * 4), "ID302") == "info"
    # at least half of that activation's layers
    assert sev(_linear_regime(kind, [limit * 0.5, limit * 0.5, limit * 2, limit * 2]), "ID302") == "info"
    assert sev(_linear_regime(kind, [limit * 0.5, limit * 2, limit * 2, limit * 2]), "ID302") is None


def test_linear_regime_is_a_warning_only_with_collapse_or_vanishing():
    stats = _linear_regime("tanh", [0.1, 0.1, 0.1])
    assert sev(stats, "ID302") == "info"
    for i, lay in enumerate(stats.layers):
        lay.grad_q = 10.0 ** (-3 * (2 - i))  # G_first / G_last = 1e-6
    assert sev(stats, "ID302") == "warning"


# --- symmetry on hand-built statistics ---------------------------------------------------------------


def _sym(**kw) -> ModelStats:
    base = dict(param="weight", rows=4, constant=False, zero=False, grad_constant=False, grad_rows_differ=True)
    base.update(kw)
    return ModelStats([layer("0", 0, symmetry=[SymmetryStats(**base)])], [], [])


def test_constant_weights_severities():
    assert severities(_sym(constant=True, zero=True, grad_constant=True, grad_rows_differ=False),
                      "ID101") == ["error"]
    assert severities(_sym(constant=True, zero=True, grad_constant=False, grad_rows_differ=True),
                      "ID101") == ["info"]
    assert severities(_sym(constant=True, grad_constant=None, grad_rows_differ=None), "ID101") == ["warning"]
    assert severities(_sym(constant=True, grad_constant=True, grad_rows_differ=False), "ID101") == ["error"]
    assert severities(_sym(), "ID101") == []


def test_duplicates_with_differing_gradients_warn():
    stats = _sym(duplicate_groups=[[0, 1]], frozen_groups=[])
    assert severities(stats, "ID102") == ["warning"]
    assert severities(stats, "ID103") == []
    (f,) = findings_of(stats, select=["ID102"])
    assert f.evidence["duplicate_units"] == 2 and f.evidence["groups"] == [[0, 1]]


def test_duplicates_with_equal_gradients_are_unbreakable():
    stats = _sym(duplicate_groups=[[0, 1, 2]], frozen_groups=[[0, 1, 2]], grad_rows_differ=True)
    assert severities(stats, "ID103") == ["error"]
    assert severities(stats, "ID102") == []
    stats = _sym(duplicate_groups=[[0, 1], [2, 3]], frozen_groups=[[0, 1]])
    assert severities(stats, "ID103") == ["error"]
    assert severities(stats, "ID102") == ["warning"]


def test_a_zero_tensor_with_zero_gradient_is_unbreakable():
    """DESIGN, "Symmetry, precisely": a zero tensor whose gradient is zero too can never move (ID103)."""
    stats = _sym(constant=True, zero=True, grad_constant=True, grad_rows_differ=False,
                 duplicate_groups=[[0, 1, 2, 3]], frozen_groups=[[0, 1, 2, 3]])
    assert {(f.code, f.severity) for f in findings_of(stats)} == {("ID101", "error"), ("ID103", "error")}
    (f,) = [f for f in findings_of(stats) if f.code == "ID103"]
    assert "zero and so is its gradient" in f.message and f.evidence["zero"]


def test_a_deliberate_zero_init_is_only_noted():
    stats = _sym(constant=True, zero=True, grad_constant=False, grad_rows_differ=True,
                 duplicate_groups=[[0, 1, 2, 3]], frozen_groups=[])
    assert {(f.code, f.severity) for f in findings_of(stats)} == {("ID101", "info")}


def test_zero_attention_projections_are_unbreakable():
    """W_Q = W_K = 0: each leaves the other's gradient at zero, so neither ever moves."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
            for m in (self.q, self.k):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4, -1)
            return self.o(a @ self.v(x))

    d = initdoctor.check(Attn(), torch.randn(4, 8, 16))
    assert [f.layers for f in d.findings if f.code == "ID103"] == [["q", "k"]]
    (f,) = [f for f in d.findings if f.code == "ID103"]
    assert "The same holds for 1 more: k." in f.message and set(f.evidence["also"]) == {"k"}
    assert all(f.severity == "error" for f in d.findings if f.code == "ID103")


# --- non-finite on hand-built statistics --------------------------------------------------------------


@pytest.mark.parametrize("field", ["weight_nonfinite", "output_nonfinite", "grad_nonfinite"])
def test_nonfinite_layer_fields(field):
    stats = group("signal", 1.0)
    setattr(stats.layers[1], field, 3)
    (f,) = findings_of(stats, select=["ID4"])
    assert (f.code, f.severity) == ("ID401", "error")
    assert "blocks.1.fc" in f.layers


def test_nonfinite_model_output_and_other_parameters():
    stats = group("signal", 1.0)
    stats.output_nonfinite = 2
    assert severities(stats, "ID401") == ["error"]
    stats = group("signal", 1.0)
    stats.nonfinite_params.append(("norm.weight", 1))
    (f,) = findings_of(stats, select=["ID401"])
    assert "norm.weight" in f.layers


# --- models that must fire each rule ------------------------------------------------------------------


def _p01():
    m = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
    for lin in (m[0], m[2]):
        nn.init.constant_(lin.weight, 0.3)
        nn.init.zeros_(lin.bias)
    return m


def _duplicate_hidden(frozen: bool):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        m[0].weight[1] = m[0].weight[0]
        m[0].bias[1] = m[0].bias[0]
        if frozen:
            m[2].weight[:, 1] = m[2].weight[:, 0]
    return m


def test_id101_zero_layer_that_cannot_move(tiny):
    m = tiny.mlp(3, 16, din=8)
    nn.init.zeros_(m[0].weight)  # W1 = 0 feeding a ReLU with zero bias: its gradient is zero too
    d = initdoctor.check(m, tiny.batch(32, 8))
    f = [f for f in d.findings if f.code == "ID101"]
    assert [(x.severity, x.layers) for x in f] == [("error", ["0"])]


def test_id101_constant_weights_frozen(tiny):
    d = initdoctor.check(_p01(), tiny.batch(64, 2))
    assert ("ID101", "error", ["2"]) in [(f.code, f.severity, f.layers) for f in d.findings]


def test_id101_zero_query_and_key_projections(tiny):
    """W_Q = W_K = 0: uniform attention, and neither projection gets a gradient."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 4)
            with torch.no_grad():
                self.mha.in_proj_weight[:32] = 0.0

        def forward(self, x):
            return self.out(self.mha(x, x, x)[0])

    d = initdoctor.check(Attn(), tiny.batch(4, 6, 16))
    got = [(f.code, f.severity, tuple(f.layers)) for f in d.findings if f.code in ("ID101", "ID103")]
    # one finding per kind, naming both projections (DESIGN: a zero tensor with zero gradient is ID103)
    assert got == [("ID101", "error", ("mha.in_proj_weight[q]", "mha.in_proj_weight[k]")),
                   ("ID103", "error", ("mha.in_proj_weight[q]", "mha.in_proj_weight[k]"))]


def test_id101_info_message_does_not_contradict_the_evidence(tiny):
    d = initdoctor.check(_p01(), tiny.batch(64, 2))
    sym = d.layers[0].symmetry[0]
    assert sym.constant and sym.grad_rows_differ is False
    (f,) = [f for f in d.findings if f.code == "ID101" and f.layers == ["0"]]
    assert "rows differ" not in f.message


def test_id102_duplicates_that_separate(tiny):
    d = initdoctor.check(_duplicate_hidden(frozen=False), tiny.batch(64, 8))
    assert tiny.severity(d, "ID102") == "warning"
    assert "ID103" not in tiny.codes(d, "info")
    (f,) = [f for f in d.findings if f.code == "ID102"]
    assert f.evidence["groups"] == [[0, 1]] and f.layers == ["0"]


def test_id103_unbreakable_symmetry(tiny):
    d = initdoctor.check(_duplicate_hidden(frozen=True), tiny.batch(64, 8))
    assert tiny.severity(d, "ID103") == "error"
    assert "ID102" not in tiny.codes(d, "info")
    d = initdoctor.check(_p01(), tiny.batch(64, 2))
    (f,) = [f for f in d.findings if f.code == "ID103"]
    assert f.severity == "error" and f.layers == ["0"] and f.evidence["groups"] == [[0, 1, 2]]


def test_id201_id203_relu_with_xavier_deep(tiny):
    d = initdoctor.check(tiny.mlp(30, 64, "relu", "xavier", gain=1.0), tiny.batch(128, 64))
    assert tiny.severity(d, "ID201") == "error"
    assert tiny.severity(d, "ID203") == "error"
    assert not {"ID202", "ID204", "ID301", "ID101", "ID102", "ID103"} & tiny.codes(d)


def test_id202_id204_relu_with_unit_normal(tiny):
    d = initdoctor.check(tiny.mlp(8, 64, "relu", "normal", sigma=1.0), tiny.batch(128, 64))
    assert tiny.severity(d, "ID202") == "error"
    assert tiny.severity(d, "ID204") == "error"
    assert not {"ID201", "ID203", "ID301", "ID302"} & tiny.codes(d)


def test_id202_id204_warning_level(tiny):
    d = initdoctor.check(tiny.mlp(6, 64, "relu", "normal", sigma=0.3), tiny.batch(128, 64))
    assert tiny.severity(d, "ID202") == "warning"
    assert tiny.severity(d, "ID204") == "warning"


def test_id203_sigmoid_with_tiny_weights(tiny):
    d = initdoctor.check(tiny.mlp(12, 64, "sigmoid", "normal", sigma=0.01), tiny.batch(128, 64))
    assert tiny.severity(d, "ID203") == "error"
    assert tiny.severity(d, "ID302") == "warning"
    assert not {"ID301", "ID202", "ID204"} & tiny.codes(d)


def test_id301_sigmoid_saturated(tiny):
    d = initdoctor.check(tiny.mlp(6, 64, "sigmoid", "normal", sigma=1.0), tiny.batch(128, 64))
    assert tiny.severity(d, "ID301") == "error"
    assert not {"ID302", "ID303"} & tiny.codes(d, "info")


def test_id301_tanh_warning(tiny):
    d = initdoctor.check(tiny.mlp(6, 64, "tanh", "normal", sigma=0.3), tiny.batch(128, 64))
    assert tiny.severity(d, "ID301") == "warning"


def test_id302_functional_tanh_tiny(tiny):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.hidden = nn.ModuleList(nn.Linear(64, 64) for _ in range(10))
            self.out = nn.Linear(64, 10)
            for fc in self.hidden:
                nn.init.normal_(fc.weight, 0.0, 0.01)
                nn.init.zeros_(fc.bias)

        def forward(self, x):
            for fc in self.hidden:
                x = torch.tanh(fc(x))
            return self.out(x)

    d = initdoctor.check(Net(), tiny.batch(128, 64))
    assert tiny.severity(d, "ID302") == "warning"
    assert tiny.severity(d, "ID203") == "error"
    assert not {"ID202", "ID204", "ID301"} & tiny.codes(d)


def test_id302_info_without_a_trend(tiny):
    d = initdoctor.check(_p01(), tiny.batch(64, 2))
    assert tiny.severity(d, "ID302") == "info"


def test_id303_dead_relu_bias(tiny):
    d = initdoctor.check(tiny.mlp(4, 64, "relu", "he", bias=-3.0), tiny.batch(128, 64))
    assert tiny.severity(d, "ID303") == "error"
    assert not {"ID301", "ID302", "ID101", "ID102", "ID103"} & tiny.codes(d, "info")


@pytest.mark.parametrize("where", ["weight_inf", "weight_nan", "bias_nan", "input_nan"])
def test_id401_non_finite(tiny, where):
    m = tiny.mlp(3, 16, din=8)
    x = tiny.batch(32, 8)
    with torch.no_grad():
        if where == "weight_inf":
            m[2].weight[0, 0] = float("inf")
        elif where == "weight_nan":
            m[2].weight[3] = float("nan")
        elif where == "bias_nan":
            m[2].bias[3] = float("nan")
        else:
            x[0, 0] = float("nan")
    d = initdoctor.check(m, x)
    assert tiny.severity(d, "ID401") == "error"
    (f,) = [f for f in d.findings if f.code == "ID401"]
    if where != "input_nan":
        assert any(name.startswith("2") for name in f.layers)


def test_id501_is_info_only(tiny):
    m = tiny.mlp(2, 64, "relu", "normal", sigma=5 * (2 / 64) ** 0.5)  # 5x He, too shallow for a trend
    d = initdoctor.check(m, tiny.batch(64, 64))
    assert tiny.severity(d, "ID501") == "info"
    (f,) = [f for f in d.findings if f.code == "ID501"]
    assert f.evidence["scales"]["0"]["ratio"] == pytest.approx(5.0, rel=0.1)
    assert not d.problems()


def test_id9xx_notes(tiny):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.sin(self.a(x)))

    d = initdoctor.check(Net(), tiny.batch(16, 8))
    got = {(f.code, f.severity, tuple(f.layers)) for f in d.findings}
    assert got == {("ID901", "info", ("unused",)), ("ID902", "info", ("a",))}
    assert [f for f in d.findings if f.code == "ID902"][0].evidence["op"] == "sin"


def test_id903_zero_output_layer_blocks_one_step(tiny):
    m = tiny.mlp(3, 64)
    nn.init.zeros_(m[6].weight)
    nn.init.zeros_(m[6].bias)
    d = initdoctor.check(m, tiny.batch(64, 64))
    assert {(f.code, f.severity) for f in d.findings} == {("ID101", "info"), ("ID903", "info")}
    (f,) = [f for f in d.findings if f.code == "ID903"]
    assert f.layers == ["0", "2", "4"]


def test_id903_only_for_layers_before_the_zero_layer(tiny):
    m = tiny.mlp(3, 16, din=8)
    nn.init.zeros_(m[0].weight)
    d = initdoctor.check(m, tiny.batch(32, 8))
    assert "ID903" not in tiny.codes(d, "info")


def test_id904_no_backward(tiny):
    m = tiny.mlp(3, 16, din=8)
    for p in m.parameters():
        p.requires_grad_(False)
    d = initdoctor.check(m, tiny.batch(16, 8))
    assert [(f.code, f.severity) for f in d.findings] == [("ID904", "info")]
    assert all(lay.grad_q is None for lay in d.layers)


def test_id905_recurrent_layers(tiny):
    torch.manual_seed(0)
    d = initdoctor.check(nn.GRU(8, 16, batch_first=True), tiny.batch(4, 5, 8))
    assert ("ID905", "info") in {(f.code, f.severity) for f in d.findings}
    assert not d.problems()


class _LSTMNet(nn.Module):
    def __init__(self, scale: float | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(8, 32, batch_first=True)
        self.out = nn.Linear(32, 3)
        if scale is not None:
            for name, p in self.rnn.named_parameters():
                if "weight" in name:
                    nn.init.normal_(p, 0.0, scale)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def test_id301_lstm_gates_saturated(tiny):
    d = initdoctor.check(_LSTMNet(scale=3.0), tiny.batch(16, 10, 8))
    assert tiny.severity(d, "ID301") == "error"
    (f,) = [f for f in d.findings if f.code == "ID301"]
    assert f.layers == ["rnn"]  # module paths; the gates are named in the evidence
    assert {"rnn:i", "rnn:f", "rnn:g", "rnn:o"} <= set(f.evidence["saturated"])
    d = initdoctor.check(_LSTMNet(), tiny.batch(16, 10, 8))
    assert d.problems() == []


# --- benign look-alikes must stay silent at warning/error ------------------------------------------------


class _TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
                                    for _ in range(3))
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50)

    def forward(self, x):
        h = self.emb(x)
        for lay in self.layers:
            h = lay(h)
        return self.head(self.ln(h))


class _EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 32)  # N(0, 1): no fan-in, not a scale problem
        self.fc = nn.Linear(32, 32)
        nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.emb(x)))).mean(1)


class _FixupResidual(nn.Module):
    def __init__(self, depth=6):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(32, 64)
        self.f1 = nn.ModuleList(nn.Linear(64, 64) for _ in range(depth))
        self.f2 = nn.ModuleList(nn.Linear(64, 64) for _ in range(depth))
        self.out = nn.Linear(64, 10)
        for f in self.f1:
            nn.init.kaiming_normal_(f.weight, nonlinearity="relu")
        for f in self.f2:
            nn.init.zeros_(f.weight)
            nn.init.zeros_(f.bias)

    def forward(self, x):
        x = self.inp(x)
        for a, b in zip(self.f1, self.f2):
            x = x + b(torch.relu(a(x)))
        return self.out(x)


class _BatchNormDeep(nn.Module):
    def __init__(self, depth=10):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.ModuleList(nn.Linear(64, 64) for _ in range(depth))
        self.bn = nn.ModuleList(nn.BatchNorm1d(64) for _ in range(depth))
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        for f, b in zip(self.fc, self.bn):
            x = torch.relu(b(f(x)))
        return self.out(x)


class _NanoGPT(nn.Module):
    """nanoGPT's deliberate scheme: N(0, 0.02), scaled residual projections, tied embeddings."""

    def __init__(self, vocab=64, d=32, layers=2, block=16):
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.attn = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.fc = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
        self.fc_proj = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02 / (math.sqrt(2 * layers) if "proj" in name else 1.0))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for ln1, attn, proj, ln2, fc, fc_proj in zip(self.ln1, self.attn, self.proj, self.ln2, self.fc,
                                                    self.fc_proj):
            q, k, v = attn(ln1(x)).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, 2, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
            x = x + proj(y)
            x = x + fc_proj(F.gelu(fc(ln2(x))))
        return self.head(self.ln_f(x))


def _zero_output_tanh():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    for lin in (m[0], m[2]):
        nn.init.xavier_uniform_(lin.weight, gain=nn.init.calculate_gain("tanh"))
        nn.init.zeros_(lin.bias)
    nn.init.zeros_(m[4].weight)
    nn.init.zeros_(m[4].bias)
    return m


def _tokens(vocab: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


# name -> (build(tiny), input(tiny))
BENIGN = {
    "zero_output_layer": (lambda t: _zero_output_tanh(), lambda t: t.batch(128, 20)),
    "layernorm_transformer": (lambda t: _TinyTransformer(), lambda t: _tokens(50, (8, 12))),
    "embeddings": (lambda t: _EmbeddingNet(), lambda t: _tokens(100, (16, 8))),
    "he_relu_depth_20": (lambda t: t.mlp(20, 64, "relu", "he"), lambda t: t.batch(128, 64)),
    "xavier_tanh_depth_10": (lambda t: t.mlp(10, 64, "tanh", "xavier"), lambda t: t.batch(128, 64)),
    "default_shallow": (lambda t: t.mlp(3, 64, "relu", "default", bias=None), lambda t: t.batch(128, 64)),
    "fixup_zero_residual": (lambda t: _FixupResidual(), lambda t: t.batch(128, 32)),
    "batchnorm_deep_default": (lambda t: _BatchNormDeep(), lambda t: t.batch(128, 64)),
    "nanogpt_deliberate_init": (lambda t: _NanoGPT(), lambda t: _tokens(64, (8, 16))),
}


@pytest.mark.parametrize("name", sorted(BENIGN))
def test_benign_look_alikes_are_silent(tiny, name):
    build, make_input = BENIGN[name]
    d = initdoctor.check(build(tiny), make_input(tiny))
    assert d.problems() == [], [(f.code, f.severity, f.message) for f in d.problems()]
    assert all(p.scheme == "keep" or not p.apply for p in d.plan)
    if name == "layernorm_transformer":  # norm weights of 1 are not constant weights
        assert "ID101" not in tiny.codes(d, "info")
    if name == "nanogpt_deliberate_init":  # a healthy model: fix() keeps the deliberate scheme
        assert initdoctor.fix(build(tiny), make_input(tiny)).written == []


# --- duplicate detection at scale ----------------------------------------------------------------------


@pytest.mark.parametrize("n, dim", [(4096, 64), (16384, 32)])
def test_duplicate_groups_finds_exactly_the_planted_groups(n, dim):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, dim, generator=gen)
    planted = [[5, 100, n - 1], [7, 8], [200, 3000], [n // 2, n // 2 + 1, n // 2 + 2, 11]]
    for grp in planted:
        for i in grp[1:]:
            w[i] = w[grp[0]]
    got = duplicate_groups(w, T.DUP_TOL["default"])
    assert got == sorted((sorted(g) for g in planted), key=lambda g: g[0])
    # a row moved by far more than the tolerance is no longer a duplicate
    w[8] += 1e-3
    got = duplicate_groups(w, T.DUP_TOL["default"])
    assert [7, 8] not in got and len(got) == len(planted) - 1


def test_duplicate_groups_edge_cases():
    assert duplicate_groups(torch.randn(1, 4), 1e-5) == []
    assert duplicate_groups(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), 1e-5) == []
    assert duplicate_groups(torch.zeros(5, 3), 1e-5) == [[0, 1, 2, 3, 4]]
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    w[4] = w[1] * (1 + 1e-7)  # float32 rounding of the same row: still a duplicate
    assert duplicate_groups(w, 1e-5) == [[1, 4]]


def test_zero_tensor_whose_rows_move_together_is_unbreakable():
    # W1 = 0 feeding a tanh: its gradient rows are equal (the next layer's columns are), not constant
    stats = _sym(constant=True, zero=True, grad_constant=False, grad_rows_differ=False,
                 duplicate_groups=[[0, 1, 2, 3]], frozen_groups=[[0, 1, 2, 3]])
    assert {(f.code, f.severity) for f in findings_of(stats)} == {("ID101", "info"), ("ID103", "error")}


def test_fix_weights_do_not_copy_the_probe_batch():
    # the CLI draws its batch from --seed; the prescription must draw from another stream
    from initdoctor.loading import make_batch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(128, 128), torch.nn.ReLU())])
    for m in model[::2]:
        torch.nn.init.normal_(m.weight, 0.0, 1.0)  # exploding: the plan re-draws every layer
    x = make_batch((64, 128), torch.float32, 0)
    assert initdoctor.fix(model, x, seed=0).written
    w = model[0].weight.detach()[:64]
    corr = torch.corrcoef(torch.stack([w.flatten(), x.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05


def test_duplicate_groups_find_every_twin_even_when_rows_interleave():
    # 8192 rows each present twice: rounding in the projection lets another row's projection fall
    # between twins now and then; neighbours up to three apart are compared, so none is lost
    torch.manual_seed(0)
    x = torch.randn(8192, 64).repeat(2, 1)
    groups = duplicate_groups(x, 1e-5)
    assert len(groups) == 8192 and all(g[1] - g[0] == 8192 for g in groups)


def test_advice_names_the_plans_init_and_spots_a_prescribed_scale():
    def relu_stack(init):
        torch.manual_seed(0)
        layers = []
        for _ in range(12):
            lin = nn.Linear(128, 128)
            init(lin.weight)
            layers += [lin, nn.ReLU()]
        return nn.Sequential(*layers)

    x = torch.randn(256, 128)
    # Xavier on ReLU is half of He's variance: the advice is He, not "already prescribed"
    d = initdoctor.check(relu_stack(nn.init.xavier_uniform_), x)
    (f,) = [f for f in d.findings if f.code == "ID201"]
    assert "kaiming_normal_(w, nonlinearity='relu')" in f.message and "already" not in f.message
    # He weights with biases of -1: the weights are fine, the biases are named
    model = relu_stack(lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    for m in model[::2]:
        nn.init.constant_(m.bias, -1.0)
    msgs = [f.message for f in initdoctor.check(model, x).findings if f.code.startswith("ID20")]
    assert msgs and all("already have the prescribed scale" in m and "biases (mean -1)" in m for m in msgs)


@pytest.mark.parametrize("units", [1, 2, 7, 64, 255, 256, 1000])
def test_chance_of_dead_is_the_binomial_tail(units):
    """P(Binomial(units, 1/2) >= dead), against the exact sum of binomial coefficients."""
    from fractions import Fraction

    from initdoctor.rules.regime import chance_of_dead

    for dead in sorted({0, 1, units // 3, units // 2, units // 2 + 1, (3 * units) // 4, units - 1, units}):
        exact = Fraction(sum(math.comb(units, k) for k in range(max(dead, 0), units + 1)), 2 ** units)
        got = chance_of_dead(units, dead)
        assert got == pytest.approx(float(exact), rel=1e-9, abs=1e-300), (units, dead)
    assert chance_of_dead(units, units + 1) == 0.0
