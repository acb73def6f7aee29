"""Layer anatomy read from the operation: (in, out) weights multiplied from the right (Hugging Face's
Conv1D), weights used through `F.linear` outside their module, and parametrized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import initdoctor


class Conv1D(nn.Module):
    """As in transformers.pytorch_utils: weight (nx, nf), out = x @ W + b through addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


def test_conv1d_fans_and_units_are_read_from_the_operation():
    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(64, 32), nn.ReLU(), Conv1D(16, 64))
    with torch.no_grad():  # output units 0 and 1 of the first layer: columns of its (in, out) weight
        m[0].weight[:, 1] = m[0].weight[:, 0]
    d = initdoctor.check(m, torch.randn(8, 5, 32))
    first = d.stats.layer("0")
    assert (first.fan_in, first.fan_out, first.transposed) == (32, 64, True)
    assert first.symmetry[0].duplicate_groups == [[0, 1]]
    assert {f.code for f in d.problems()} == {"ID102"}


def test_conv1d_is_fixed_in_its_own_layout():
    torch.manual_seed(0)
    m = nn.Sequential(*[x for _ in range(8) for x in (Conv1D(64, 64), nn.ReLU())], Conv1D(10, 64))
    with torch.no_grad():
        for layer in m[:-1:2]:
            layer.weight.normal_(0, 1.0)  # N(0, 1): exploding
    r = initdoctor.fix(m, torch.randn(64, 64))
    assert r.cured and "ID202" in r.before.codes()
    std = float(m[0].weight.detach().std())
    assert std == pytest.approx((2 / 64) ** 0.5, rel=0.1)  # He with fan_in = 64 rows of x @ W
    assert (m[0].weight.shape, m[-1].weight.shape) == ((64, 64), (64, 10))


class WithIdleHead(nn.Module):
    """An exploding Conv1D stack, and a second (in, out) head that this forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[x for _ in range(8) for x in (Conv1D(64, 64), nn.ReLU())])
        self.head = Conv1D(10, 64)
        self.idle = Conv1D(10, 64)  # (in=64, out=10) stored (64, 10): torch would read fan_in 10
        self.idle_linear = nn.Linear(64, 10)  # torch defines this one's layout

    def forward(self, x):
        return self.head(self.body(x))


def test_a_layer_whose_layout_was_never_observed_is_not_redrawn():
    """A non-torch weight that never ran may be (out, in) or (in, out): no fans are guessed, the plan
    keeps it and ID901 says why; a torch layer that never ran keeps torch's fans."""
    torch.manual_seed(0)
    m = WithIdleHead()
    with torch.no_grad():
        for layer in m.body[::2]:
            layer.weight.normal_(0, 1.0)
    before = m.idle.weight.detach().clone()
    r = initdoctor.fix(m, torch.randn(64, 64))
    assert r.cured and "ID202" in r.before.codes()
    idle = r.before.stats.layer("idle")
    assert (idle.fan_in, idle.fan_out, idle.transposed) == (None, None, None)
    assert r.before.stats.layer("idle_linear").fan_in == 64
    (entry,) = [p for p in r.plan if p.layer == "idle"]
    assert not entry.apply and "(in, out)" in entry.reason
    assert torch.equal(m.idle.weight, before)
    (note,) = [f for f in r.before.findings if f.code == "ID901"]
    assert note.evidence["unknown_layout"] == ["idle"]


def test_patchify_conv_is_drawn_at_its_own_fan_out():
    """A stride = kernel conv with nothing after it: Xavier from fan_in 48 and fan_out 8 (8 outputs per
    input element), not torch's 8 * 16 = 128; the plan draws it so, and its re-examination agrees."""
    torch.manual_seed(0)
    patch = nn.Conv2d(3, 8, 4, stride=4)
    m = nn.Sequential(patch, nn.Flatten(), *[x for _ in range(6) for x in (nn.Linear(128, 128), nn.ReLU())],
                      nn.Linear(128, 10))
    with torch.no_grad():
        for layer in m[2:-1:2]:
            layer.weight.normal_(0, 1.0)
    r = initdoctor.fix(m, torch.randn(32, 3, 16, 16))
    assert r.cured
    lay = r.before.stats.layer("0")
    assert (lay.fan_in, lay.fan_out) == (48, 8)
    (entry,) = [p for p in r.plan if p.layer == "0"]
    assert entry.scheme == "xavier_uniform" and entry.fans == (48, 8)
    assert float(patch.weight.detach().std()) == pytest.approx((2 / (48 + 8)) ** 0.5, rel=0.1)  # 0.19, torch's 0.11
    assert not [f for f in r.after.findings if f.code == "ID501" and "0" in f.layers]


class WindowAttention(nn.Module):
    """torchvision's Swin attention calls F.linear with its layers' weights."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-2, -1) / 32 ** 0.5, -1)
        return F.linear(a @ v, self.proj.weight, self.proj.bias)


def test_weights_used_through_f_linear_are_measured():
    torch.manual_seed(0)
    d = initdoctor.check(WindowAttention(), torch.randn(4, 7, 32))
    assert not [f for f in d.findings if f.code == "ID901"]
    qkv, proj = d.stats.layer("qkv"), d.stats.layer("proj")
    assert (qkv.index, proj.index) == (0, 1)
    assert qkv.q > 0 and qkv.grad_q > 0 and proj.grad_q > 0 and proj.is_output


def test_spectral_norm_is_measured_and_named_as_the_cause():
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        layers += [spectral_norm(nn.Linear(64, 64)), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    x = torch.randn(64, 64)
    buffers = [b.clone() for b in model.buffers()]
    d = initdoctor.check(model, x)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # power iteration not advanced
    assert len(d.stats.ran()) == 11 and d.stats.layer("0").parametrization == "spectral_norm"
    assert {"ID201", "ID203"} <= d.codes()
    (grad,) = [f for f in d.findings if f.code == "ID203"]
    assert grad.evidence["ratio"] < 1e-4 and "spectral_norm" in grad.message
    assert all(p.scheme == "keep" for p in d.plan if p.layer != "20")
    r = initdoctor.fix(model, x)
    assert not r.written  # initialization cannot change a spectrally normalized weight
    (note,) = [f for f in r.after.findings if f.code == "ID906"]
    assert "spectral_norm" in note.message


def test_normal_draws_are_not_called_pytorch_default():
    torch.manual_seed(0)
    deep = nn.Sequential(*[x for _ in range(12) for x in (nn.Linear(256, 256), nn.ReLU())])
    d = initdoctor.check(deep, torch.randn(128, 256))
    (f,) = [f for f in d.findings if f.code == "ID203"]
    assert f.evidence.get("pytorch_default")
    with torch.no_grad():
        for m in deep[::2]:
            m.weight.normal_(0, 1 / (3 * 256) ** 0.5)  # the default's std, but normal
    d = initdoctor.check(deep, torch.randn(128, 256))
    (f,) = [f for f in d.findings if f.code == "ID203"]
    assert not f.evidence.get("pytorch_default") and "default" not in f.message


def test_weights_passed_to_f_linear_by_keyword_are_measured():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, x):
            return F.linear(input=x, weight=self.proj.weight, bias=self.proj.bias)

    d = initdoctor.check(Head(), torch.randn(16, 8))
    assert d.stats.layer("proj").index == 0 and d.stats.layer("proj").grad_q > 0


def test_pytorch_default_recognised_on_transposed_convolutions():
    """torch draws a ConvTranspose's default from the fan of its stored (in, out, k, k) tensor."""
    from initdoctor.schemes import Prescriber

    torch.manual_seed(0)
    m = nn.Sequential(nn.ConvTranspose2d(64, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 64, 3))
    d = initdoctor.check(m, torch.randn(4, 64, 6, 6))
    assert all(Prescriber().looks_default(lay) for lay in d.layers)
    with torch.no_grad():
        m[0].weight.normal_(0, float(m[0].weight.std()))
    d = initdoctor.check(m, torch.randn(4, 64, 6, 6))
    assert not Prescriber().looks_default(d.stats.layer("0"))


def test_old_style_weight_norm_is_measured():
    """torch.nn.utils.weight_norm (weight_g, weight_v, a pre-hook recomputing .weight) is a layer too."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations.weight_norm
        layers = [torch.nn.utils.weight_norm(nn.Linear(32, 32)) for _ in range(3)]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    d = initdoctor.check(model, torch.randn(64, 32))
    assert [lay.name for lay in d.stats.ran()] == ["0", "2", "4"]
    assert all(lay.parametrization == "weight_norm" and lay.q > 0 for lay in d.layers)
    assert all(p.scheme == "keep" for p in d.plan)
