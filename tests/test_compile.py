"""watch() on a torch.compile'd model: sampled steps replayed eagerly, unsampled steps left compiled.

The tests compile with the `aot_eager` backend: dynamo's tracing, guards and the OptimizedModule
wrapper are those of the default backend, which is all the watch meets, without inductor's C++ build
(about 30 s on a cold cache here). benchmarks/compile_watch.py runs the default backend (inductor).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import optimizer

import initdoctor

from .conftest import assert_no_hooks

torch._dynamo.config.cache_size_limit = 64


def compile_(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="aot_eager")


def net(std: float | None = None, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Dropout(dropout),
                          nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    if std is not None:
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
    return model


def batches(n: int):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(n)]


def train(model, data, doctor=None, accumulate: int = 1):
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(data):
        loss = nn.functional.cross_entropy(model(x), y) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            if doctor is not None:
                doctor.step()
            opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


@pytest.fixture(scope="module")
def runs():
    """One bare and one watched compiled run of the same model on the same batches."""
    from torch._dynamo.utils import counters

    data = batches(6)
    bare_model = net()
    bare = train(compile_(bare_model), data)
    model = net()
    compiled = compile_(model)
    counters.clear()
    with initdoctor.watch(compiled, every=2, warn=False) as doctor:
        watched = train(compiled, data, doctor)
        graphs = counters["stats"]["unique_graphs"]
    return dict(bare=bare, watched=watched, doctor=doctor, model=model,
                compiled=compiled, graphs=graphs)


def test_compiled_training_is_bit_identical_and_leaves_no_hook(runs):
    assert all(torch.equal(a, b) for a, b in zip(runs["bare"], runs["watched"]))
    assert_no_hooks(runs["compiled"])
    assert not optimizer._global_optimizer_pre_hooks
    # hooks on the wrapper only, the graph's modules untouched: the graph compiled for the bare twin
    # serves the watched model, sampled steps included (a recompilation would count a new graph)
    assert runs["graphs"] == 0


def test_compiled_samples_match_the_eager_watch(runs):
    assert [h["step"] for h in runs["doctor"].history] == [0, 2, 4]
    data = batches(4)
    eager_model = net(dropout=0.0)
    with initdoctor.watch(eager_model, every=2, warn=False) as eager:
        train(eager_model, data, eager)
    with initdoctor.watch(compile_(net(dropout=0.0)), every=2, warn=False) as doctor:
        train(doctor.compiled, data, doctor)
    # step 0 precedes any update: the same weights, batch and loss as the eager watch saw (no dropout
    # here: the replay draws its own masks)
    first, ref = doctor.history[0]["layers"], eager.history[0]["layers"]
    assert set(first) == set(ref) == {"0", "2", "5", "8"}
    for name in ref:
        for field in ("q", "signal", "grad_q", "weight_grad_ratio", "saturated", "dead"):
            if ref[name][field] is not None:
                assert first[name][field] == pytest.approx(ref[name][field], rel=1e-4, abs=1e-9), (name, field)
    lay = doctor.last.stats.layer("2")
    assert lay.signal > 0 and lay.grad_q > 0 and lay.weight_grad_rms > 0
    assert any("_orig_mod" in n for n in doctor.last.sources)


def test_gradient_accumulation_replays_every_micro_batch():
    data = batches(4)
    with initdoctor.watch(compile_(net(dropout=0.0)), every=100, warn=False) as doctor:
        train(doctor.compiled, data, doctor, accumulate=2)
    eager = net(dropout=0.0)
    with initdoctor.watch(eager, every=100, warn=False) as ref:
        train(eager, data, ref, accumulate=2)
    got, want = doctor.history[0]["layers"]["0"], ref.history[0]["layers"]["0"]
    assert got["q"] == pytest.approx(want["q"], rel=1e-4)
    assert got["grad_q"] == pytest.approx(want["grad_q"], rel=1e-4)
    assert doctor.last.stats.layer("0").samples == 16  # both micro-batches of 8


def test_sick_compiled_model_is_diagnosed():
    model = net(std=3.0)
    with pytest.warns(initdoctor.InitDoctorWarning, match="ID301"):
        with initdoctor.watch(compile_(model), every=1) as doctor:
            train(doctor.compiled, batches(1), doctor)
    assert "ID301" in {f.code for f in doctor.last.problems()}


@pytest.mark.parametrize("close_first", [True, False], ids=["step-then-optimizer", "optimizer-then-step"])
def test_replay_sees_the_weights_of_the_forward_whichever_closes_first(close_first):
    x, y = batches(1)[0]

    def one_step(model, doctor):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        nn.functional.cross_entropy(model(x), y).backward()
        if close_first:
            diag = doctor.step()
            opt.step()
        else:
            opt.step()
            diag = doctor.step()
        return diag

    eager = net(dropout=0.0)
    with initdoctor.watch(eager, every=1, warn=False) as ref:
        want = one_step(eager, ref)
    with initdoctor.watch(compile_(net(dropout=0.0)), every=1, warn=False) as doctor:
        got = one_step(doctor.compiled, doctor)
    # lr=0.5 moves the weights far: a replay after the update would change q at once
    for name in ("0", "2", "5"):
        assert got.stats.layer(name).q == pytest.approx(want.stats.layer(name).q, rel=1e-5)
    assert not any("changed" in n for n in got.sources)


def test_weights_changed_by_hand_before_the_replay_are_noted():
    x, y = batches(1)[0]
    with initdoctor.watch(compile_(net(dropout=0.0)), every=1, warn=False) as doctor:
        nn.functional.cross_entropy(doctor.compiled(x), y).backward()
        with torch.no_grad():
            for p in doctor.model.parameters():
                p.sub_(0.1 * p.grad)  # no torch.optim: nothing tells the watch before the change
        diag = doctor.step()
    assert any("weights changed" in n for n in diag.sources)


class OnlyCompiled(nn.Module):
    """A forward that fails eagerly on its second call: the replay fails, training must not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1 and not torch.compiler.is_compiling():
            raise RuntimeError("eager call refused")
        return self.lin(x)


def test_a_replay_that_raises_is_noted_and_training_goes_on():
    x, y = batches(1)[0]
    model = OnlyCompiled()
    with initdoctor.watch(compile_(model), every=1, warn=False) as doctor:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(doctor.compiled(x), y).backward()
        opt.step()  # the replay runs (and fails) here, before the update
        diag = doctor.step()
    assert any("replay raised RuntimeError" in n for n in diag.sources)
    assert diag.stats.layer("lin").weight_grad_rms > 0  # read from the parameters all the same
    assert_no_hooks(doctor.compiled)
