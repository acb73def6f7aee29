"""Hardening: the models people write, and the inputs they give."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import initdoctor
from initdoctor.cli import main
from initdoctor.report import to_json

from .models.zoo import DC, GPT, MHA, Dec, ResNet


def fired(d) -> set[str]:
    return {f.code for f in d.problems()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resnet_with_batchnorm_is_healthy_and_kept():
    model = ResNet()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    d = initdoctor.check(model, x)
    assert fired(d) == set()
    acts = {lay.name: lay.activation for lay in d.layers}
    assert acts["layer1.0.conv2"] == "relu"  # relu(bn2(conv2) + identity), through the in-place add
    assert d.stats.layer("layer1.0.conv1").normalized
    result = initdoctor.fix(model, x)
    assert result.written == [] and unchanged(model, before)


def test_zero_init_residual_norms_are_deliberate():
    model = ResNet(zero_init_residual=True)
    d = initdoctor.check(model, torch.randn(8, 3, 16, 16))
    assert fired(d) == set()
    assert "layer1.0.bn2" not in d.stats.norms  # a zero gamma is not a norm to reset


def test_nanogpt_init_is_recognized_as_deliberate():
    model = GPT()
    x = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    d = initdoctor.check(model, x)
    assert fired(d) == set()
    assert all(not p.apply for p in d.plan)
    acts = {lay.name: lay.activation for lay in d.layers}
    assert acts["h.0.mlp.c_fc"] == "gelu" and acts["h.0.attn.c_attn"] == "identity"
    result = initdoctor.fix(model, x)
    assert result.written == [] and unchanged(model, before)
    assert model.wte.weight is model.lm_head.weight


@dataclasses.dataclass
class _Output(collections.OrderedDict):
    """A stand-in for transformers' ModelOutput: a dataclass that is also an ordered dict."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            self[f.name] = getattr(self, f.name)


class _ModelOutputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return _Output(logits=self.b(h), hidden=h)


@pytest.mark.parametrize("model", [DC(), _ModelOutputNet()], ids=["dataclass", "model-output"])
def test_structured_outputs(model):
    d = initdoctor.check(model, torch.randn(16, 8))
    assert d.stats.layer("b").grad_q > 0
    assert d.stats.layer("a").grad_q > 0  # the backward reached through every output tensor
    assert d.stats.layer("b").is_output


def test_transformers_model_output_when_installed():
    outputs = pytest.importorskip("transformers.modeling_outputs")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            return outputs.SequenceClassifierOutput(logits=self.lin(x))

    d = initdoctor.check(Net(), torch.randn(8, 8))
    assert d.stats.layer("lin").grad_q > 0


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_layers_fix_saturated_gates(cls):
    torch.manual_seed(0)
    rnn = cls(8, 32, batch_first=True)
    with torch.no_grad():
        for p in rnn.parameters():
            p.normal_(0, 2.0)
    x = torch.randn(16, 12, 8)
    d = initdoctor.check(rnn, x)
    assert "ID301" in fired(d)
    result = initdoctor.fix(rnn, x)
    assert "ID301" not in result.after.codes()
    hh = rnn.weight_hh_l0.detach()[:32]
    assert torch.allclose(hh @ hh.T, torch.eye(32), atol=1e-4)  # recurrent weights orthogonal per gate


def test_transposed_grouped_depthwise_and_1d_3d_convolutions():
    model = Dec()
    d = initdoctor.check(model, torch.randn(4, 16, 8, 8))
    up1 = d.stats.layer("up1")
    # ConvTranspose stores (in, out, k, k): the forward fan-in is in_channels * k * k
    assert (up1.fan_in, up1.fan_out) == (16 * 16, 8 * 16)
    plan = {p.layer: p for p in d.plan}
    assert plan["up1"].mode == "fan_out" and plan["g"].mode == "fan_in"
    assert d.stats.layer("g").fan_in == 1 * 9 and d.stats.layer("dw").fan_in == 9
    assert {"c1", "c3"} <= {lay.name for lay in d.stats.ran()}
    json.loads(to_json(d))


def test_transposed_conv_fix_uses_its_forward_fan():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.ConvTranspose2d(8, 8, 3, 1, 1), nn.ReLU())])
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.normal_(0, 1.0)
    x = torch.randn(4, 8, 8, 8)
    assert "ID202" in fired(initdoctor.check(model, x))
    result = initdoctor.fix(model, x)
    assert not {"ID202", "ID204"} & result.after.codes()


def test_multihead_attention_out_proj_is_observed():
    d = initdoctor.check(MHA(), torch.randn(8, 10, 32))
    out_proj = d.stats.layer("mha.out_proj")
    assert out_proj.index >= 0 and out_proj.signal > 0 and out_proj.grad_q > 0
    assert [s.param for s in d.stats.layer("mha").symmetry] == [
        "in_proj_weight[q]", "in_proj_weight[k]", "in_proj_weight[v]"]
    assert fired(d) == set()


def test_compiled_model_is_examined_through_the_module_it_wraps():
    model = DC()
    compiled = torch.compile(model)
    d = initdoctor.check(compiled, torch.randn(16, 8))
    assert [lay.name for lay in d.layers] == ["a", "b"]  # watch() on it: tests/test_compile.py


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_model():
    model = ResNet().cuda()
    d = initdoctor.check(model, torch.randn(8, 3, 16, 16, device="cuda"))
    assert fired(d) == set()
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_check_and_watch_agree_with_the_cpu():
    """The device path (sums reduced on the GPU, one packed copy to the host) gives the CPU's numbers."""
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 32),
                        nn.ReLU(), nn.Linear(32, 4))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(64, 16)
    def loss(out, _):  # the default cotangent draws from each device's own generator: not the same numbers
        return out.square().mean()

    a, b = initdoctor.check(cpu, x, loss_fn=loss), initdoctor.check(gpu, x.cuda(), loss_fn=loss)
    assert [f.code for f in a.findings] == [f.code for f in b.findings]
    for la, lb in zip(a.layers, b.layers):
        for attr in ("q", "signal", "grad_q", "weight_std", "weight_absmax", "preact_std", "saturated", "dead"):
            va, vb = getattr(la, attr), getattr(lb, attr)
            assert (va is None) == (vb is None), (la.name, attr)
            if va is not None:
                # shares of samples or units: a value at a threshold may fall on either side on the GPU
                share = attr in ("saturated", "dead")
                assert vb == pytest.approx(va, rel=1e-4, abs=0.02 if share else 1e-9), (la.name, attr, va, vb)
    histories = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with initdoctor.watch(model, every=1, warn=False) as doctor:
            for _ in range(3):
                opt.zero_grad()
                model(x.to(dev)).square().mean().backward()
                doctor.step(wait=False)
                opt.step()
        histories.append(doctor.history)
    for ra, rb in zip(*histories):
        assert ra["layers"].keys() == rb["layers"].keys()
        for name, la in ra["layers"].items():
            for key in ("signal", "grad_q"):
                if la.get(key) is not None:
                    assert rb["layers"][name][key] == pytest.approx(la[key], rel=1e-3), (name, key)


# --- inputs -------------------------------------------------------------------------------------

ARCH = """
import torch
from torch import nn

def factory():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 2))
"""


def test_checkpoint_with_arch(tmp_path, capsys):
    arch = tmp_path / "arch.py"
    arch.write_text(ARCH)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 2))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1.0)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    assert main(["check", str(ckpt), "--arch", f"{arch}:factory", "--format", "json", "--fail-on", "warning"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert "ID202" in {f["code"] for f in report["findings"]}  # the checkpoint's weights, not the factory's
    assert report["input"]["inferred"] is True


def test_checkpoint_without_arch_and_pickled_module_are_refused(tmp_path, capsys):
    arch = tmp_path / "arch.py"
    arch.write_text(ARCH)
    ckpt = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), ckpt)  # a pickled module: loading it would run arbitrary code
    assert main(["check", str(ckpt)]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["check", str(ckpt), "--arch", f"{arch}:factory"]) == 2
    err = capsys.readouterr().err
    assert "arbitrary code" in err and err.count("\n") == 1


def test_real_batch_from_pt_and_npy(tmp_path, capsys):
    arch = tmp_path / "m.py"
    arch.write_text(ARCH.replace("def factory", "def build_model"))
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "batch.pt")
    np.save(tmp_path / "batch.npy", x.numpy())
    shapes = []
    for name in ("batch.pt", "batch.npy"):
        assert main(["check", str(arch), "--data", str(tmp_path / name), "--format", "json", "--fail-on", "never"]) == 0
        shapes.append(json.loads(capsys.readouterr().out)["input"]["shape"])
    assert shapes == [[48, 32], [48, 32]]
    (tmp_path / "bad.pt").write_bytes(pickle.dumps({"x": object()}))
    assert main(["check", str(arch), "--data", str(tmp_path / "bad.pt")]) == 2


# --- scale --------------------------------------------------------------------------------------


def test_wide_layer_of_16384_units_with_planted_duplicates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16384), nn.ReLU(), nn.Linear(16384, 4))
    with torch.no_grad():
        model[0].weight[100] = model[0].weight[7]
        model[0].bias[100] = model[0].bias[7]
    d = initdoctor.check(model, torch.randn(16, 32))
    (sym,) = d.stats.layer("0").symmetry
    assert sym.duplicate_groups == [[7, 100]]
    assert "ID102" in fired(d)


def test_a_few_hundred_layers():
    model = nn.Sequential(*[m for _ in range(300) for m in (nn.Linear(16, 16), nn.ReLU())])
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    d = initdoctor.check(model, torch.randn(32, 16))
    assert len(d.stats.ran()) == 300
    assert [lay.index for lay in d.stats.ran()] == list(range(300))


class _ResidualMLP(nn.Module):
    def __init__(self, depth: int = 32, width: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for fc in self.blocks:
            x = x + torch.relu(fc(x)) * 0.1
        return x


def test_deep_plain_stack_is_named_and_skips_or_norms_silence_it():
    plain = nn.Sequential(*[m for _ in range(32) for m in (nn.Linear(16, 16), nn.ReLU())])
    for m in plain:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    x = torch.randn(32, 16)
    d = initdoctor.check(plain, x)
    (note,) = [f for f in d.findings if f.code == "ID907"]
    assert note.severity == "info" and note.evidence["depth"] == 32
    assert initdoctor.check(_ResidualMLP(), x).stats.residual_adds == 32
    assert "ID907" not in {f.code for f in initdoctor.check(_ResidualMLP(), x).findings}
    normed = nn.Sequential(*[m for _ in range(32) for m in (nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU())])
    assert "ID907" not in {f.code for f in initdoctor.check(normed, x).findings}
    assert initdoctor.check(ResNet(), torch.randn(4, 3, 16, 16)).stats.residual_adds == 4


class _NewGELU(nn.Module):
    """Hugging Face's GPT-2 activation, written out: it adds x to a multiple of x^3."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def test_a_plain_stack_whose_activation_adds_x_to_itself_is_still_plain():
    # x + 0.044715 x^3 adds one signal to a function of itself: no skip connection (it once counted 32)
    plain = nn.Sequential(*[m for _ in range(32) for m in (nn.Linear(16, 16), _NewGELU())])
    d = initdoctor.check(plain, torch.randn(32, 16))
    assert d.stats.residual_adds == 0
    assert [f.evidence["depth"] for f in d.findings if f.code == "ID907"] == [32]
