"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initdoctor
from initdoctor.cli import main


def test_one_activation_module_shared_by_layers_of_different_widths():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 2)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.c(self.act(self.b(self.act(self.a(x)))))

    d = initdoctor.check(Net(), torch.randn(64, 8))
    dead = {a.name: a.layer for a in d.stats.activations}
    assert dead == {"act": "a", "act@b": "b"}
    assert d.stats.layer("a").dead is not None and d.stats.layer("b").dead is not None


def test_layernorm_over_two_dims_is_not_a_weight_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (2, 4)), nn.LayerNorm([2, 4]), nn.Flatten(),
                          nn.Linear(8, 2))
    d = initdoctor.check(model, torch.randn(32, 8))
    assert "2" not in {lay.name for lay in d.layers}
    assert d.problems() == []


def test_check_leaves_every_buffer_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initdoctor.check(model, torch.randn(16, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fix_cures_a_nan_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias[3] = float("nan")
    result = initdoctor.fix(model, torch.randn(32, 8))
    assert "ID401" in result.before.codes() and "ID401" not in result.after.codes()
    assert torch.isfinite(model[0].bias).all()


def test_duplicates_reported_once_each():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
        model[2].weight[:, 1] = model[2].weight[:, 0]  # units 0 and 1 can never separate
        model[0].weight[3] = model[0].weight[2]
        model[0].bias[3] = model[0].bias[2]  # units 2 and 3 can
    d = initdoctor.check(model, torch.randn(32, 4))
    groups = {f.code: f.evidence["groups"] for f in d.findings if f.code in ("ID102", "ID103")}
    assert groups == {"ID103": [[0, 1]], "ID102": [[2, 3]]}


def test_fix_lstm_with_projections():
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, proj_size=5, batch_first=True)
    with torch.no_grad():
        for p in lstm.parameters():
            p.normal_(0, 3.0)
    x = torch.randn(8, 10, 8)
    result = initdoctor.fix(lstm, x)  # crashed while splitting weight_hr_l0 into gates
    assert result.plan[0].scheme != "keep" or not result.written


def test_forward_that_raises_under_watch_leaves_no_function_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with initdoctor.watch(model, every=1, warn=False) as doctor:
        with pytest.raises(RuntimeError):
            model(torch.randn(3, 5))
        assert not torch._C._is_torch_function_mode_enabled()
        model(torch.randn(3, 4)).sum().backward()
        assert doctor.step() is not None


def test_input_inferred_from_the_layer_that_runs_first(tmp_path, capsys):
    path = tmp_path / "m.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(s):\n"
        "        super().__init__()\n"
        "        s.head = nn.Linear(8 * 30 * 30, 10)\n"
        "        s.conv = nn.Conv2d(3, 8, 3)\n"
        "    def forward(s, x):\n"
        "        return s.head(torch.relu(s.conv(x)).flatten(1))\n")
    assert main(["check", str(path), "--format", "json", "--fail-on", "never"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input"] == {"shape": [64, 3, 32, 32], "dtype": "float32", "inferred": True}


def test_tuple_input_with_a_non_tensor(tmp_path, capsys):
    path = tmp_path / "m.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(4, 2)\n"
        "    def forward(self, x, mask=None):\n"
        "        return self.lin(x)\n"
        "def example_input():\n"
        "    return (torch.randn(8, 4), None)\n")
    assert main(["check", str(path), "--dtype", "float64", "--fail-on", "never"]) == 0
    assert "internal error" not in capsys.readouterr().err


def test_constant_recurrent_weights_are_named_with_their_own_value_and_shape():
    gru = nn.GRU(4, 6)
    with torch.no_grad():
        gru.weight_hh_l0.fill_(0.5)
    d = initdoctor.check(gru, torch.randn(5, 3, 4))
    (f,) = [f for f in d.findings if f.code == "ID101"]
    assert f.layers == ["weight_hh_l0"]
    assert "constant 0.5" in f.message and "18x6" in f.message


def test_cli_forceable_schemes_are_the_plans():
    from initdoctor import cli, plan

    assert cli.FORCEABLE == plan.FORCEABLE


# --- found in the review of the split probe and the modern-model work ---------------------------


def test_a_weight_reused_as_x_at_w_outside_its_layer_is_not_its_output():
    """A decoder tied to its encoder (`h @ enc.weight`): another product with other units."""

    class TiedAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(20, 20)
            with torch.no_grad():
                self.enc.weight[1] = self.enc.weight[0]
                self.enc.bias[1] = self.enc.bias[0]

        def forward(self, x):
            return torch.relu(self.enc(x)) @ self.enc.weight

    torch.manual_seed(0)
    d = initdoctor.check(TiedAE(), torch.randn(16, 20))
    enc = d.stats.layer("enc")
    assert not enc.transposed and enc.calls == 1
    assert enc.symmetry[0].duplicate_groups == [[0, 1]]


def test_buffers_a_forward_reassigns_are_put_back():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("steps", torch.zeros(()))
            self.register_buffer("ema", torch.zeros(4))

        def forward(self, x):
            y = self.lin(x)
            if self.training:
                self.steps = self.steps + 1
                self.ema = 0.9 * self.ema + 0.1 * y.detach().mean(0)
            return y

    m = Counting()
    steps, ema = m.steps, m.ema
    initdoctor.check(m, torch.randn(8, 4))
    assert m.steps is steps and m.ema is ema
    assert float(m.steps) == 0.0 and bool((m.ema == 0).all())


def test_one_functional_record_over_growing_concatenations():
    """A dense block: F.relu of a concatenation whose width grows at each layer."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(8 + 4 * i, 4, 3, padding=1) for i in range(3))

        def forward(self, x):
            for conv in self.convs:
                x = torch.cat([x, conv(F.relu(x))], 1)
            return x

    d = initdoctor.check(Dense(), torch.randn(4, 8, 8, 8))
    assert sorted(a.units for a in d.stats.activations) == [8, 12, 16]


def test_a_narrow_layer_killed_by_its_bias_is_dead_not_pooled():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        m[0].bias.fill_(-3.0)
    d = initdoctor.check(m, torch.randn(128, 32))
    assert d.stats.layer("0").r < 0.05  # small r, from the bias, not from pooled inputs
    assert "ID303" in d.codes()


def test_conv1d_is_prescribed_as_its_linear_twin():
    from tests.test_anatomy import Conv1D

    def stack(layer):
        torch.manual_seed(0)
        return nn.Sequential(layer(64, 64), nn.Sigmoid(), layer(64, 64), nn.Sigmoid(), layer(10, 64))

    conv = initdoctor.check(stack(Conv1D), torch.randn(32, 64))
    lin = initdoctor.check(stack(lambda o, i: nn.Linear(i, o)), torch.randn(32, 64))
    assert [lay.fed_by for lay in conv.layers] == [lay.fed_by for lay in lin.layers] == ["input", "sigmoid", "sigmoid"]
    assert [p.recommended for p in conv.plan] == [p.recommended for p in lin.plan]


def test_rmsnorm_written_with_the_statistic_first():
    class RMS(nn.Module):
        def forward(self, x):
            return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x

    m = nn.Sequential(nn.Linear(16, 32), RMS(), nn.Linear(32, 4))
    d = initdoctor.check(m, torch.randn(8, 16))
    assert d.stats.layer("0").normalized and d.stats.layer("2").fed_by == "other"
    assert not [f for f in d.findings if f.code == "ID902"]


def test_id906_names_layers_kept_from_the_cure():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        m[2].bias.fill_(-5.0)
    r = initdoctor.fix(m, torch.randn(128, 32), keep=("2",))
    (note,) = [f for f in r.after.findings if f.code == "ID906"]
    assert "--keep" in note.message and "2" in note.message


def test_a_kept_plan_says_whom_each_reason_is_about():
    """The terminal's "keep" plan names a layer per kind of reason, with how many more share it
    (it printed three unnamed reasons, cut alphabetically, before)."""
    from initdoctor.report.text import plan_block

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    d = initdoctor.check(model, torch.randint(0, 50, (32,)))
    assert not any(p.apply for p in d.plan)
    lines = plan_block(d.plan, color=False)
    assert lines[0] == "Plan: keep the current initialization."
    text = "\n".join(lines)
    assert "0: embeddings have no fan-in" in text
    # the three linear layers share one kind of reason (their gains differ: 5/3 before a tanh, 1 at the output)
    assert [p.layer for p in d.plan] == ["0", "1", "3", "5"]
    assert "1 and 2 more: no curable finding: kept" in text
    assert len(lines) == 3
