"""Fuzzing: random architectures and inits, random command lines. Bounded and derandomized for CI."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import initdoctor
from initdoctor.cli import main
from initdoctor.report import to_json

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ACTS = {
    "relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(inplace=True), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU, "leaky": nn.LeakyReLU, "selu": nn.SELU, "elu": nn.ELU, "softplus": nn.Softplus,
    "hardtanh": nn.Hardtanh, "softsign": nn.Softsign, "silu": nn.SiLU, "none": nn.Identity,
}
INITS = ["default", "zeros", "constant", "tiny", "huge", "xavier", "he", "nan", "inf"]


class Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Functional(nn.Module):
    """An activation applied functionally in forward."""

    def __init__(self, width: int, fn: str):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.fn = fn

    def forward(self, x):
        y = self.fc(x)
        return {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[self.fn](y)


def _init(lin: nn.Linear, how: str) -> None:
    with torch.no_grad():
        if how == "zeros":
            lin.weight.zero_()
        elif how == "constant":
            lin.weight.fill_(0.3)
        elif how == "tiny":
            lin.weight.normal_(0, 1e-4)
        elif how == "huge":
            lin.weight.normal_(0, 10.0)
        elif how == "xavier":
            nn.init.xavier_uniform_(lin.weight)
        elif how == "he":
            nn.init.kaiming_normal_(lin.weight)
        elif how == "nan":
            lin.weight[0, 0] = float("nan")
        elif how == "inf":
            lin.weight[0, 0] = float("inf")


@st.composite
def architectures(draw):
    width = draw(st.sampled_from([4, 8, 16]))
    torch.manual_seed(draw(st.integers(0, 1000)))
    blocks: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["plain", "norm", "residual", "functional", "dropout"]))
        lin = nn.Linear(width, width)
        _init(lin, draw(st.sampled_from(INITS)))
        act = ACTS[draw(st.sampled_from(sorted(ACTS)))]()
        if kind == "plain":
            blocks += [lin, act]
        elif kind == "norm":
            blocks += [lin, draw(st.sampled_from([nn.BatchNorm1d, nn.LayerNorm]))(width), act]
        elif kind == "residual":
            blocks.append(Residual(nn.Sequential(lin, act)))
        elif kind == "functional":
            blocks.append(Functional(width, draw(st.sampled_from(["relu", "tanh", "sigmoid"]))))
        else:
            blocks += [lin, act, nn.Dropout(0.5)]
    blocks.append(nn.Linear(width, 3))
    model = nn.Sequential(*blocks)
    if draw(st.booleans()):
        model.eval()
    return model, width


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@FUZZ
@given(architectures(), st.integers(2, 12), st.integers(0, 3))
def test_check_never_crashes_leaks_or_mutates(arch, batch, seed):
    model, width = arch
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(seed))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    d = initdoctor.check(model, x, seed=seed)
    assert _hooks(model) == 0 and not torch._C._is_torch_function_mode_enabled()
    assert all(torch.equal(state[k], v) or (v.isnan().any() and torch.equal(state[k].isnan(), v.isnan()))
               for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    report = json.loads(to_json(d))
    assert {"initdoctor", "target", "input", "findings", "layers", "plan"} <= set(report)
    assert all(f["severity"] in ("error", "warning", "info") for f in report["findings"])


MODEL_FILE = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
"""

VALUES = {
    "--model": ["build_model", "nope", ""],
    "--input-shape": ["4,6", "4x6", "a,b", "0,6", "4,5", "-1", ""],
    "--input-dtype": ["float32", "long", "bfloat16", "complex7"],
    "--batch-size": ["8", "0", "-3", "x"],
    "--seed": ["0", "7", "-1", "x"],
    "--device": ["cpu", "cuda:7", "tpu", ""],
    "--format": ["text", "json", "markdown", "yaml"],
    "--fail-on": ["error", "warning", "info", "never", "sometimes"],
    "--select": ["ID2", "ID1,ID3", "", "XX"],
    "--ignore": ["ID5", "ID9", ""],
    "--scheme": ["xavier_uniform", "lsuv", "orthogonal", "magic"],
    "--keep": ["0", "*"],
    "--output": ["{tmp}/out.txt", "{tmp}/missing/out.txt", "{tmp}"],
    "--plot": ["{tmp}/p.png", "{tmp}/p.jpg"],
    "--save-fixed": ["{tmp}/fixed.pt"],
    "--data": ["{tmp}/none.pt"],
    "--arch": ["{tmp}/m.py:build_model"],
}
FLAGS = ["--fix", "--no-color", "--version", "--help-me"]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(sorted(VALUES)), st.sampled_from(FLAGS)), max_size=4, unique=True),
       st.data(), st.sampled_from(["model", "missing", "dir"]))
def test_command_line_never_tracebacks(tmp_path, capsys, options, data, target):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    argv = ["check", {"model": str(tmp_path / "m.py"), "missing": str(tmp_path / "x.py"),
                      "dir": str(tmp_path)}[target]]
    for opt in options:
        argv.append(opt)
        if opt in VALUES:
            argv.append(data.draw(st.sampled_from(VALUES[opt])).format(tmp=tmp_path))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits (--help, --version, bad choices)
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, argv
    if code == 2 and err:
        assert err.strip().count("\n") == 0, (argv, err)
        assert err.startswith("initdoctor: ")
