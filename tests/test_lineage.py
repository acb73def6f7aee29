"""lineage.py: which weight layer feeds which nonlinearity, followed by tensor identity."""

from __future__ import annotations

import torch

from initdoctor.lineage import Graph


def _graph(*layers: str, leaves: tuple[str, ...] = ()) -> Graph:
    return Graph(set(layers), set(leaves))


def test_a_functional_nonlinearity_is_attributed_through_reshapes():
    g = _graph("fc")
    y = torch.randn(4, 6)
    g.layer_output("fc", y)
    v = y.view(4, 2, 3)
    assert g.on_function("view", (y, 4, 2, 3), {}, v, inner=None) == (None, None)
    out = torch.tanh(v)
    call, _ = g.on_function("tanh", (v,), {}, out, inner=None)
    assert call is not None and call.kind == "tanh" and call.layer == "fc"
    assert call.record == "fc:tanh" and call.module == "fc"
    assert g.follows["fc"].kind == "tanh" and g.follows["fc"].record == "fc:tanh"


def test_leaky_slope_and_an_activation_module():
    g = _graph("fc", leaves=("act",))
    y = torch.randn(3, 5)
    g.layer_output("fc", y)
    call, _ = g.on_function("leaky_relu", (y, 0.2), {}, torch.nn.functional.leaky_relu(y, 0.2), inner="act")
    assert call.record == "act" and call.module == "act"
    assert g.follows["fc"].kind == "leaky_relu" and g.follows["fc"].param == 0.2


def test_a_weight_op_learns_what_feeds_it():
    g = _graph("a", "b")
    y = torch.randn(2, 4)
    g.layer_output("a", y)
    h = torch.sigmoid(y)
    g.on_function("sigmoid", (y,), {}, h, inner=None)
    g.on_function("linear", (h, torch.randn(3, 4)), {}, torch.randn(2, 3), inner="b")
    assert g.fed_by["b"] == "sigmoid"


def test_norms_residuals_and_unknown_consumers():
    g = _graph("a", "b", "c")
    ya, yb, yc = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    for name, y in (("a", ya), ("b", yb), ("c", yc)):
        g.layer_output(name, y)
    g.on_function("layer_norm", (ya, (4,)), {}, torch.randn(2, 4), inner=None)
    assert "a" in g.normalized
    g.on_function("add", (yb, yc), {}, yb + yc, inner=None)
    assert g.residual_adds == 1
    # one signal added to a function of itself is no skip connection: GELU's x + c x^3, RoPE's rotation
    cube = torch.pow(yb, 3.0)
    g.on_function("pow", (yb, 3.0), {}, cube, inner=None)
    scaled = cube * 0.044715
    g.on_function("mul", (cube, 0.044715), {}, scaled, inner=None)
    g.on_function("add", (yb, scaled), {}, yb + scaled, inner=None)
    assert g.residual_adds == 1 and g.residual_writers == {"b", "c"}
    g.on_function("cumsum", (yc, 0), {}, yc.cumsum(0), inner=None)
    assert g.unknown == {"c": "cumsum"} and g.follows["c"].kind == "unknown"


def test_model_outputs_are_identity():
    g = _graph("head")
    y = torch.randn(2, 3)
    g.layer_output("head", y)
    g.mark_outputs({"logits": y})
    assert g.outputs == {"head"} and g.follows["head"].kind == "identity"


def test_hand_written_rmsnorm_and_tanh_gelu_are_recognised():
    """LLaMA/T5's x * rsqrt(mean(x^2) + eps) normalizes; GPT-2's gelu_new is GELU, not tanh."""
    import math

    import initdoctor

    class RMSNorm(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(d))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    class NewGELU(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), RMSNorm(32), torch.nn.Linear(32, 64), NewGELU(),
                                torch.nn.Linear(64, 8))
    d = initdoctor.check(model, torch.randn(64, 16))
    assert not [f for f in d.findings if f.code in ("ID902", "ID302", "ID301")]
    assert d.stats.layer("0").normalized and d.stats.layer("0").activation == "identity"
    assert d.stats.layer("2").activation == "gelu" and d.stats.layer("4").fed_by == "gelu"
    (act,) = d.stats.activations
    assert act.kind == "gelu" and act.name == "3" and act.dead == 0.0
    assert d.plan[1].recommended == "kaiming_normal"  # GELU: He, not Xavier with tanh's gain


def test_other_powers_stay_unknown_consumers():
    g = _graph("fc")
    y = torch.randn(3, 4)
    g.layer_output("fc", y)
    g.on_function("pow", (y, 4), {}, y.pow(4), inner=None)
    assert g.unknown == {"fc": "pow"}


def test_fast_gelu_written_with_x_times_x_is_gelu_not_a_norm():
    """HF's FastGELU: 0.5 x (1 + tanh(x * 0.7978845608 * (1 + 0.044715 x x)))."""
    import initdoctor

    class FastGELU(torch.nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), FastGELU(), torch.nn.Linear(32, 4))
    d = initdoctor.check(model, torch.randn(64, 16))
    first = d.stats.layer("0")
    assert first.activation == "gelu" and not first.normalized
    assert d.stats.layer("2").fed_by == "gelu" and d.plan[0].recommended == "kaiming_normal"
