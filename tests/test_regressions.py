"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch
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
