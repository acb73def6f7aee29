"""The plan per nonlinearity, what apply draws, forced schemes, --keep, and honesty."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import initdoctor
from initdoctor.cli import main


def stack(act: type[nn.Module] | None, depth: int = 4, width: int = 64, std: float = 1.0, **act_kw) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, 0.0, std)  # sick on purpose, so the plan is applied
        layers += [lin] + ([act(**act_kw)] if act else [])
    return nn.Sequential(*layers, nn.Linear(width, 3))


def plan_of(model, x=None, **kw):
    d = initdoctor.check(model, torch.randn(128, 64) if x is None else x, **kw)
    return {p.layer: p for p in d.plan}


@pytest.mark.parametrize("act, kw, scheme, gain", [
    (nn.ReLU, {}, "kaiming_normal", math.sqrt(2)),
    (nn.LeakyReLU, {"negative_slope": 0.2}, "kaiming_normal", math.sqrt(2 / (1 + 0.2 ** 2))),
    (nn.GELU, {}, "kaiming_normal", math.sqrt(2)),
    (nn.SiLU, {}, "kaiming_normal", math.sqrt(2)),
    (nn.Tanh, {}, "xavier_uniform", 5 / 3),
    (nn.SELU, {}, "lecun_normal", 1.0),
])
def test_scheme_and_gain_follow_the_nonlinearity(act, kw, scheme, gain):
    plan = plan_of(stack(act, **kw))
    assert plan["2"].scheme == scheme and plan["2"].gain == pytest.approx(gain)
    assert plan["2"].mode == "fan_in" and plan["2"].bias == "zeros" and plan["2"].apply
    assert plan[str(2 * 4)].scheme == "xavier_uniform" and plan[str(2 * 4)].gain == 1.0  # output layer


def test_deep_tanh_gets_a_gain_nearer_one():
    plan = plan_of(stack(nn.Tanh, depth=25, std=0.01))
    assert plan["2"].gain == pytest.approx(1.0)
    assert "chaotic" in plan["2"].reason


def test_sigmoid_gain_four_and_centring_on_layers_fed_by_a_sigmoid():
    model = stack(nn.Sigmoid, depth=6, std=0.01)
    x = torch.randn(128, 64)
    plan = plan_of(model, x)
    assert (plan["0"].gain, plan["0"].bias) == (1.0, "zeros")  # fed by the standardized input
    assert all((plan[str(i)].gain, plan[str(i)].bias) == (4.0, "centred") for i in (2, 4, 6, 8, 10))
    assert plan["12"].bias == "centred"
    result = initdoctor.fix(model, x)
    w, b = model[2].weight.detach(), model[2].bias.detach()
    assert torch.allclose(b, -0.5 * w.sum(1), atol=1e-6)
    assert not {c for c in result.after.codes() if c.startswith("ID2")}


def test_apply_draws_the_documented_scale_and_keeps_identity():
    torch.manual_seed(0)
    model = stack(nn.ReLU, depth=4, width=512)
    ids = [id(p) for p in model.parameters()]
    initdoctor.fix(model, torch.randn(64, 512))
    assert [id(p) for p in model.parameters()] == ids
    assert float(model[2].weight.detach().std()) == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    assert float(model[2].bias.detach().abs().max()) == 0.0
    assert float(model[8].weight.detach().std()) == pytest.approx(math.sqrt(2 / (512 + 3)), rel=0.05)


def test_norm_layers_reset_to_identity_when_the_model_is_sick():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Tanh(), *stack(nn.Tanh, depth=5, std=0.01))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    result = initdoctor.fix(model, torch.randn(128, 64))
    assert "1.weight" in result.written
    assert torch.equal(model[1].weight.detach(), torch.ones(64))


def test_keep_pattern_and_frozen_layers_are_untouched():
    model = stack(nn.ReLU, depth=5)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = initdoctor.fix(model, torch.randn(128, 64), keep=("4", "6"))
    plan = {p.layer: p for p in result.plan}
    assert plan["0"].scheme == "keep" and "frozen" in plan["0"].reason
    assert plan["4"].scheme == "keep" and "--keep" in plan["4"].reason
    for name in ("0.weight", "4.weight", "6.weight"):
        assert torch.equal(model.state_dict()[name], before[name])
    assert not torch.equal(model.state_dict()["2.weight"], before["2.weight"])


def test_forced_orthogonal():
    model = stack(nn.ReLU, depth=4)
    result = initdoctor.fix(model, torch.randn(128, 64), scheme="orthogonal")
    assert {p.scheme for p in result.plan if p.apply} == {"orthogonal"}
    w = model[2].weight.detach()
    gram = w @ w.T / result.plan[1].gain ** 2
    assert torch.allclose(gram, torch.eye(64), atol=1e-4)


def test_forced_lsuv_gives_unit_output_variance():
    model = stack(nn.Tanh, depth=6, std=0.01)
    x = torch.randn(128, 64)
    result = initdoctor.fix(model, x, scheme="lsuv")
    assert any("LSUV" in n for n in result.fix_log)
    d = initdoctor.check(model, x)
    for lay in d.stats.ran()[:-1]:
        assert lay.q == pytest.approx(1.0, rel=0.05)


def test_unknown_forced_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        initdoctor.check(stack(nn.ReLU), torch.randn(8, 64), scheme="magic")


def test_a_deep_batchnorm_stack_is_not_reinitialized_for_nothing(capsys, tmp_path):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = initdoctor.fix(model, torch.randn(256, 64))
    assert result.written == [] and not result.cured
    assert "ID204" in result.before.codes()
    cannot = [f for f in result.after.findings if f.code == "ID906"]
    assert cannot and "residual connections" in cannot[0].message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_fixed_and_fix_exit_code(tmp_path, capsys):
    path = tmp_path / "m.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(*[l for _ in range(6) for l in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 2))\n"
        "    for l in m:\n"
        "        if isinstance(l, nn.Linear): nn.init.normal_(l.weight, 0, 1.0)\n"
        "    return m\n")
    out = tmp_path / "fixed.pt"
    assert main(["check", str(path), "--fail-on", "warning"]) == 1
    assert main(["check", str(path), "--fix", "--save-fixed", str(out), "--fail-on", "warning"]) == 0
    text = capsys.readouterr().out
    assert "Before and after the fix" in text and "resolved: ID202, ID204" in text
    state = torch.load(out, weights_only=True)
    assert float(state["2.weight"].std()) == pytest.approx(math.sqrt(2 / 32), rel=0.2)
