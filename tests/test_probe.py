"""The probe's guarantees (initdoctor.check never changes the model or the process) and its statistics
against a plain autograd re-implementation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initdoctor
from initdoctor.probe import cotangent_loss

# --- small models used below --------------------------------------------------------------------


class Boom(nn.Module):
    """Raises inside a child module, half-way through the forward pass."""

    def __init__(self, where: str = "child") -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.where = where
        self.b.register_forward_pre_hook(self._maybe_raise)

    def _maybe_raise(self, module, args):
        if self.where == "child":
            raise ValueError("boom in b")

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.where == "root":
            raise ValueError("boom in forward")
        return self.b(h)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = torch.relu(self.block(x))
        x = torch.relu(self.block(x))
        return self.out(x)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(16, 16) for _ in range(5))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = F.gelu(self.b(x))
        x = self.c(x).sigmoid()
        x = torch.tanh(self.d(x))
        x = F.leaky_relu(self.e(x), 0.2)
        return self.out(x)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    aux: torch.Tensor


class TwoHeads(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)
        self.aux = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        y, z = self.head(h), self.aux(h)
        if self.kind == "dict":
            return {"logits": y, "aux": z}
        if self.kind == "tuple":
            return y, z
        return Output(y, z)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


# --- hooks and function mode ---------------------------------------------------------------------


def test_hooks_removed_after_success(tiny):
    model = _bn_model()
    tiny.assert_no_hooks(model)
    initdoctor.check(model, tiny.batch(16, 8))
    tiny.assert_no_hooks(model)


@pytest.mark.parametrize("where", ["child", "root"])
def test_hooks_removed_after_forward_raises(tiny, where):
    model = Boom(where)
    own = tiny.hooks_of(model)  # the model's own pre-hook on b
    with pytest.raises(initdoctor.ProbeError, match="boom") as info:
        initdoctor.check(model, tiny.batch(4, 8))
    assert isinstance(info.value.__cause__, ValueError)
    tiny.assert_no_hooks(model, own)
    # and the model still works as before
    model.where = "none"
    assert model(tiny.batch(4, 8)).shape == (4, 8)


def test_hooks_removed_after_loss_raises(tiny):
    model = tiny.mlp(2, 8)

    def bad_loss(output, batch):
        raise RuntimeError("loss failed")

    with pytest.raises(initdoctor.ProbeError, match="loss failed"):
        initdoctor.check(model, tiny.batch(4, 8), loss_fn=bad_loss)
    tiny.assert_no_hooks(model)


def test_no_tensor_hooks_left_on_parameters(tiny):
    model = tiny.mlp(3, 8)
    initdoctor.check(model, tiny.batch(4, 8))
    for p in model.parameters():
        assert not p._backward_hooks
    # a fresh backward pass on the model works and puts gradients where they belong
    model(tiny.batch(4, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_user_hooks_fire_during_and_after(tiny):
    model = tiny.mlp(2, 8)
    seen = []
    h1 = model[0].register_forward_hook(lambda m, i, o: seen.append(("fwd", tuple(o.shape))))
    h2 = model[2].register_forward_pre_hook(lambda m, i: seen.append(("pre", tuple(i[0].shape))))
    h3 = model.register_forward_hook(lambda m, i, o: seen.append(("root", tuple(o.shape))))
    own = tiny.hooks_of(model)
    initdoctor.check(model, tiny.batch(5, 8))
    assert seen == [("fwd", (5, 8)), ("pre", (5, 8)), ("root", (5, 10))]
    model(tiny.batch(3, 8))
    assert seen[3:] == [("fwd", (3, 8)), ("pre", (3, 8)), ("root", (3, 10))]
    assert tiny.hooks_of(model) == own
    for h in (h1, h2, h3):
        h.remove()
    tiny.assert_no_hooks(model)


# --- the model is left exactly as it was ----------------------------------------------------------


def test_weights_and_buffers_untouched(tiny):
    model = _bn_model()
    model(tiny.batch(16, 8))  # running statistics away from their defaults
    snap = tiny.snapshot(model)
    assert int(model[1].num_batches_tracked) == 1
    initdoctor.check(model, tiny.batch(16, 8, seed=7))
    tiny.assert_unchanged(model, snap)
    assert int(model[1].num_batches_tracked) == 1


def test_grads_none_stay_none(tiny):
    model = tiny.mlp(3, 8)
    initdoctor.check(model, tiny.batch(4, 8))
    assert all(p.grad is None for p in model.parameters())


def test_existing_grads_untouched(tiny):
    model = tiny.mlp(3, 8)
    model(tiny.batch(4, 8, seed=3)).square().sum().backward()
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    initdoctor.check(model, tiny.batch(4, 8))
    for n, p in model.named_parameters():
        obj, val = grads[n]
        assert p.grad is obj
        assert torch.equal(p.grad, val)


def test_eval_mode_restored(tiny):
    model = _bn_model().eval()
    snap = tiny.snapshot(model)
    initdoctor.check(model, tiny.batch(16, 8))
    assert not any(m.training for m in model.modules())
    tiny.assert_unchanged(model, snap)


def test_mixed_modes_restored(tiny):
    model = _bn_model()
    model[1].eval()
    model[3].eval()
    model[5].train()
    model[7].eval()
    before = [m.training for m in model.modules()]
    assert len(set(before)) == 2
    initdoctor.check(model, tiny.batch(16, 8))
    assert [m.training for m in model.modules()] == before


def test_modes_restored_when_forward_raises(tiny):
    model = Boom("child").eval()
    model.a.train()
    before = [m.training for m in model.modules()]
    with pytest.raises(initdoctor.ProbeError):
        initdoctor.check(model, tiny.batch(4, 8))
    assert [m.training for m in model.modules()] == before


def test_batchnorm_buffers_restored_when_forward_raises(tiny):
    class BNBoom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            self.bn(self.fc(x))
            raise RuntimeError("after the norm layer")

    model = BNBoom()
    snap = tiny.snapshot(model)
    with pytest.raises(initdoctor.ProbeError):
        initdoctor.check(model, tiny.batch(16, 8))
    tiny.assert_unchanged(model, snap)


def test_global_rng_untouched(tiny):
    model = _bn_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    initdoctor.check(model, tiny.batch(16, 8), seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_model_gives_identical_outputs_afterwards(tiny):
    model = _bn_model().train()
    x = tiny.batch(16, 8)
    snap = tiny.snapshot(model)
    torch.manual_seed(42)
    expected = model(x)
    model.load_state_dict(snap)  # undo the running-statistics update of that pass
    torch.manual_seed(42)
    initdoctor.check(model, x)
    got = model(x)
    assert torch.equal(got, expected)


def test_dropout_is_off_during_the_probe(tiny):
    """A model with dropout (module or functional) gives the statistics of the same model without it."""

    class FunctionalDropout(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
            self.p = p

        def forward(self, x):
            return self.b(F.dropout(torch.relu(self.a(x)), self.p, training=True))

    x = tiny.batch(32, 8)
    with_dropout, without = FunctionalDropout(0.5), FunctionalDropout(0.0)
    without.load_state_dict(with_dropout.state_dict())
    d1, d2 = initdoctor.check(with_dropout, x), initdoctor.check(without, x)
    for a, b in zip(d1.layers, d2.layers):
        assert a.q == pytest.approx(b.q, rel=1e-9)
        assert a.grad_q == pytest.approx(b.grad_q, rel=1e-9)

    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    m2 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Identity(), nn.Linear(16, 4))
    m2.load_state_dict(m1.state_dict())
    d1, d2 = initdoctor.check(m1, x), initdoctor.check(m2, x)
    assert [lay.grad_q for lay in d1.layers] == pytest.approx([lay.grad_q for lay in d2.layers], rel=1e-9)


def test_check_is_deterministic(tiny):
    model = _bn_model()
    x = tiny.batch(16, 8)
    a, b = initdoctor.check(model, x, seed=3), initdoctor.check(model, x, seed=3)
    assert [lay.to_dict() for lay in a.layers] == [lay.to_dict() for lay in b.layers]
    c = initdoctor.check(model, x, seed=4)
    assert [lay.grad_q for lay in c.layers] != [lay.grad_q for lay in a.layers]


# --- what the probe sees ---------------------------------------------------------------------------


def test_inplace_relu_same_statistics(tiny):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True),
                      nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    x = tiny.batch(32, 8)
    da, db = initdoctor.check(a, x), initdoctor.check(b, x)
    assert [lay.activation for lay in da.layers] == ["relu", "relu", "identity"]
    for la, lb in zip(da.layers, db.layers):
        assert la.grad_q is not None and la.grad_q > 0
        assert la.grad_q == pytest.approx(lb.grad_q, rel=1e-6)
        assert la.q == pytest.approx(lb.q, rel=1e-6)
        assert la.dead == lb.dead
    tiny.assert_no_hooks(a)


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_structured_outputs(tiny, kind):
    torch.manual_seed(0)
    model = TwoHeads(kind)
    x = tiny.batch(16, 8)
    d = initdoctor.check(model, x)
    by = {lay.name: lay for lay in d.layers}
    assert by["head"].is_output and by["aux"].is_output and not by["body"].is_output
    for lay in d.layers:
        assert lay.grad_q is not None and lay.grad_q > 0
        assert lay.q is not None and lay.q > 0
    # the same model returning a tuple gives the same numbers: every floating output gets a cotangent
    ref = TwoHeads("tuple")
    ref.load_state_dict(model.state_dict())
    dr = initdoctor.check(ref, x)
    assert [lay.grad_q for lay in d.layers] == pytest.approx([lay.grad_q for lay in dr.layers], rel=1e-9)


def test_shared_module_counted_twice(tiny):
    model = Shared()
    d = initdoctor.check(model, tiny.batch(12, 8))
    by = {lay.name: lay for lay in d.layers}
    assert by["block"].calls == 2
    assert by["block"].samples == 24
    assert by["inp"].calls == 1 and by["inp"].samples == 12
    assert [lay.name for lay in d.layers].count("block") == 1


def test_shared_module_statistics_pool_both_calls(tiny):
    model = Shared()
    x = tiny.batch(12, 8)
    d = initdoctor.check(model, x)
    outs = []
    h = model.block.register_forward_hook(lambda m, i, o: outs.append(o.detach().double()))
    model(x)
    h.remove()
    y = torch.cat(outs)
    lay = {lay.name: lay for lay in d.layers}["block"]
    assert lay.q == pytest.approx(float(y.square().mean()), rel=1e-6)
    assert lay.signal == pytest.approx(float(y.var(0, unbiased=False).mean()), rel=1e-6)


def test_tied_weights_counted_once(tiny):
    model = Tied()
    with torch.no_grad():
        model.a.weight.fill_(0.1)
    d = initdoctor.check(model, tiny.batch(8, 16))
    by = {lay.name: lay for lay in d.layers}
    assert len(by["a"].symmetry) + len(by["b"].symmetry) == 1
    id101 = [f for f in d.findings if f.code == "ID101"]
    assert len(id101) == 1
    assert by["a"].grad_q is not None and by["b"].grad_q is not None


def test_bfloat16_model(tiny):
    model = tiny.mlp(3, 32, din=16).to(torch.bfloat16)
    d = initdoctor.check(model, tiny.batch(32, 16, dtype=torch.bfloat16))
    for lay in d.layers:
        assert lay.dtype == "bfloat16"
        for v in (lay.q, lay.signal, lay.grad_q, lay.weight_std):
            assert isinstance(v, float) and math.isfinite(v) and v > 0
    assert not d.problems("error")
    tiny.assert_no_hooks(model)


def test_functional_activations_identified(tiny):
    torch.manual_seed(0)
    d = initdoctor.check(Functional(), tiny.batch(16, 16))
    got = {lay.name: lay.activation for lay in d.layers}
    assert got == {"a": "relu", "b": "gelu", "c": "sigmoid", "d": "tanh", "e": "leaky_relu", "out": "identity"}
    assert {lay.name: lay.fed_by for lay in d.layers} == {
        "a": "input", "b": "relu", "c": "gelu", "d": "sigmoid", "e": "tanh", "out": "leaky_relu"}
    assert {lay.name: lay.activation_param for lay in d.layers}["e"] == pytest.approx(0.2)


def test_batchnorm_between_layer_and_relu(tiny):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    d = initdoctor.check(model, tiny.batch(16, 8))
    first = d.layers[0]
    assert first.activation == "relu"
    assert first.normalized is True
    assert d.layers[1].normalized is False


def test_sigmoid_and_tanh_statistics_are_read(tiny):
    model = tiny.mlp(2, 16, "sigmoid", "normal", sigma=3.0)
    d = initdoctor.check(model, tiny.batch(64, 16))
    hidden = d.layers[:2]
    for lay in hidden:
        assert lay.activation == "sigmoid"
        assert 0.0 <= lay.saturated <= 1.0 and 0.0 <= lay.saturated_units <= 1.0
        assert lay.preact_std > 1.0
    assert d.layers[2].saturated is None


def test_conv_units_are_channels(tiny):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU())
    x = tiny.batch(4, 3, 10, 10)
    d = initdoctor.check(model, x)
    assert [(lay.units, lay.samples) for lay in d.layers] == [(8, 4 * 10 * 10), (6, 4 * 8 * 8)]
    assert [(lay.fan_in, lay.fan_out) for lay in d.layers] == [(27, 72), (72, 54)]


# --- statistics against plain autograd --------------------------------------------------------------


def _reference(model, layers, x, loss):
    """Per-layer (q, per-unit variance averaged over units, G) by hand."""
    outs = []

    def keep(m, i, o):
        o.retain_grad()
        outs.append(o)

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        loss(model(x), x).backward()
    finally:
        for h in handles:
            h.remove()
    ref = []
    for y in outs:
        y64, g = y.detach().double(), y.grad.double()
        units = y64.movedim(1, -1).reshape(-1, y64.shape[1]) if y64.dim() > 2 else y64
        ref.append((float(y64.square().mean()), float(units.var(0, unbiased=False).mean()),
                    float(g.square().mean())))
    return ref


def _mlp3():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))


def test_statistics_match_autograd_with_loss_fn(tiny):
    model = _mlp3()
    x = tiny.batch(40, 12)
    w = torch.randn(40, 5, generator=torch.Generator().manual_seed(9))

    def loss_fn(output, batch):
        assert batch is x
        return (output * w).sum() + 0.5 * output.square().sum()

    d = initdoctor.check(model, x, loss_fn=loss_fn)
    ref = _reference(model, [model[0], model[2], model[4]], x, loss_fn)
    assert [lay.name for lay in d.layers] == ["0", "2", "4"]
    for lay, (q, var, g) in zip(d.layers, ref):
        assert lay.q == pytest.approx(q, rel=1e-4)
        assert lay.signal == pytest.approx(var, rel=1e-4)
        assert lay.r == pytest.approx(var / q, rel=1e-4)
        assert lay.grad_q == pytest.approx(g, rel=1e-4)
    # the readout's gradient is exactly w + output
    assert d.layers[-1].grad_q == pytest.approx(float((w + model(x).detach()).double().square().mean()), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 5])
def test_default_loss_is_the_seeded_cotangent(tiny, seed):
    model = _mlp3()
    x = tiny.batch(40, 12)
    d = initdoctor.check(model, x, seed=seed)
    ref = _reference(model, [model[0], model[2], model[4]], x, lambda out, b: cotangent_loss(out, seed))
    for lay, (q, var, g) in zip(d.layers, ref):
        assert lay.q == pytest.approx(q, rel=1e-4)
        assert lay.signal == pytest.approx(var, rel=1e-4)
        assert lay.grad_q == pytest.approx(g, rel=1e-4)
    # L = <y, eps> with eps ~ N(0, I): the readout's G is the mean square of eps, about 1
    assert 0.7 < d.layers[-1].grad_q < 1.3


def test_weight_statistics_match(tiny):
    model = _mlp3()
    x = tiny.batch(40, 12)
    d = initdoctor.check(model, x)
    model(x).sum()  # nothing retained
    for lay, idx in zip(d.layers, (0, 2, 4)):
        w = model[idx].weight.detach().double()
        assert lay.weight_mean == pytest.approx(float(w.mean()), rel=1e-6, abs=1e-12)
        assert lay.weight_std == pytest.approx(float(w.std(unbiased=False)), rel=1e-6)
        assert lay.fan_in == w.shape[1] and lay.fan_out == w.shape[0]
    loss = cotangent_loss(model(x), 0)
    grads = torch.autograd.grad(loss, [model[i].weight for i in (0, 2, 4)])
    for lay, gw in zip(d.layers, grads):
        assert lay.weight_grad_rms == pytest.approx(float(gw.double().square().mean().sqrt()), rel=1e-4)


def test_conv_statistics_match_autograd(tiny):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    x = tiny.batch(6, 3, 9, 9)
    d = initdoctor.check(model, x, seed=2)
    ref = _reference(model, [model[0], model[2], model[4]], x, lambda out, b: cotangent_loss(out, 2))
    for lay, (q, var, g) in zip(d.layers, ref):
        assert lay.q == pytest.approx(q, rel=1e-4)
        assert lay.signal == pytest.approx(var, rel=1e-4)
        assert lay.grad_q == pytest.approx(g, rel=1e-4)


def test_tiny_variance_next_to_large_mean(tiny):
    """Outputs 0.5 + 1e-4 * noise: a one-pass float32 variance would return rounding noise."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 16) * 1e-4 / 4.0)  # per-unit std of x @ w.T is about 1e-4
        lin.bias.fill_(0.5)
    model = nn.Sequential(lin, nn.Sigmoid(), nn.Linear(32, 2))
    x = tiny.batch(256, 16)
    d = initdoctor.check(model, x)
    y = lin(x).detach().double()
    expected = float(y.var(0, unbiased=False).mean())
    assert 0.5e-8 < expected < 2e-8
    assert d.layers[0].signal == pytest.approx(expected, rel=1e-2)
    assert d.layers[0].q == pytest.approx(0.25, rel=1e-3)


def test_float64_variance_of_1e_17(tiny):
    torch.manual_seed(0)
    lin = nn.Linear(16, 32).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 16, dtype=torch.float64) * 3e-9 / 4.0)
        lin.bias.fill_(0.5)
    model = nn.Sequential(lin, nn.Sigmoid(), nn.Linear(32, 2).double())
    x = tiny.batch(256, 16, dtype=torch.float64)
    d = initdoctor.check(model, x)
    y = lin(x).detach()
    expected = float(y.var(0, unbiased=False).mean())
    assert 1e-18 < expected < 1e-16
    assert d.layers[0].signal == pytest.approx(expected, rel=1e-2)


def test_hooks_removed_after_keyboard_interrupt(tiny):
    class Interrupted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            self.fc(x)
            raise KeyboardInterrupt

    model = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        initdoctor.check(model, tiny.batch(2, 4))
    tiny.assert_no_hooks(model)


def test_requires_grad_flags_untouched(tiny):
    model = tiny.mlp(3, 8)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    d = initdoctor.check(model, tiny.batch(8, 8))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(lay.grad_q is not None for lay in d.layers)


def test_root_module_is_the_only_layer(tiny):
    torch.manual_seed(0)
    d = initdoctor.check(nn.Linear(4, 3), tiny.batch(8, 4))
    (lay,) = d.layers
    assert (lay.name, lay.is_output, lay.activation, lay.calls) == ("", True, "identity", 1)
    assert lay.grad_q is not None and lay.grad_q > 0


def test_inplace_change_of_a_layer_output_is_measured_before_it(tiny):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            y = self.a(x)
            y.mul_(2.0)
            return self.b(torch.relu(y))

    torch.manual_seed(0)
    model = Scaled()
    x = tiny.batch(16, 8)
    d = initdoctor.check(model, x)
    y = model.a(x)
    y.retain_grad()
    cotangent_loss(model.b(torch.relu(2.0 * y)), 0).backward()
    assert d.layers[0].q == pytest.approx(float(y.detach().double().square().mean()), rel=1e-5)
    assert d.layers[0].grad_q == pytest.approx(float(y.grad.double().square().mean()), rel=1e-5)
    assert d.layers[0].activation == "relu"


def test_check_inside_no_grad_still_measures_gradients(tiny):
    model = tiny.mlp(3, 8)
    with torch.no_grad():
        d = initdoctor.check(model, tiny.batch(16, 8))
    assert all(lay.grad_q is not None for lay in d.layers)
    assert "ID904" not in {f.code for f in d.findings}
