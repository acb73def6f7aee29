"""accumulators.py: the typed buffer, its host copy, and combining copies from several processes.

Combining must give the statistics of one process that saw the whole batch (DESIGN section 5); the
DDP and FSDP tests check the same through real process groups, these check the protocol directly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from initdoctor.accumulators import Key, Reduce, build_stats, combine, pack, to_host, unpack
from initdoctor.probe import Recorder
from initdoctor.stats import Moments


def _moments_items(x: torch.Tensor) -> list:
    m = Moments.of(x)
    return [(Key("out", "l", "n"), torch.tensor([m.n], dtype=torch.float64)),
            (Key("out", "l", "mean"), m.mean), (Key("out", "l", "m2"), m.m2)]


def test_keys_say_how_they_combine():
    assert Key("out", "a", "mean").reduce is Reduce.MOMENTS
    assert Key("sat", "a").reduce is Reduce.SUM
    assert Key("maxv", "a").reduce is Reduce.MAX
    assert Key("w", "a").reduce is Reduce.FIRST
    assert Key("w", "a", sharded=True).reduce is Reduce.SUM  # shards of one parameter add up
    assert Key("w", "a", sharded=True) == Key("w", "a")  # the host copy is looked up without it
    with pytest.raises(KeyError):
        _ = Key("nonsense").reduce


def test_pack_and_unpack_round_trip():
    items = [(Key("sat", "a"), torch.arange(6.0).reshape(2, 3)), (Key("outbad"), torch.tensor([2.0]))]
    back = unpack(pack(items), items)
    assert [k for k, _ in back] == [k for k, _ in items]
    for (_, a), (_, b) in zip(items, back):
        assert b.shape == a.shape and b.dtype == torch.float64 and torch.equal(a.double(), b)


def test_host_copy_keeps_every_key_as_float64():
    items = [(Key("sat", "a"), torch.tensor([1.0, 2.0])), (Key("w", "b", sharded=True), torch.ones(4))]
    host = to_host(items)
    assert set(host) == {Key("sat", "a"), Key("w", "b")}
    assert all(t.dtype == torch.float64 for t in host.values())


def test_combined_moments_equal_one_pass_over_the_whole_batch():
    gen = torch.Generator().manual_seed(0)
    # a tiny input-dependent part beside a large mean: the case that one-pass formulas lose
    x = 0.5 + 1e-8 * torch.randn(64, 5, generator=gen, dtype=torch.float64)
    a, b = _moments_items(x[:40]), _moments_items(x[40:])
    got = dict(combine([(k, [ta, tb]) for (k, ta), (_, tb) in zip(a, b)]))
    whole = Moments.of(x)
    assert float(got[Key("out", "l", "n")][0]) == 64
    torch.testing.assert_close(got[Key("out", "l", "mean")], whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[Key("out", "l", "m2")], whole.m2, rtol=1e-6, atol=0)
    torch.testing.assert_close(got[Key("out", "l", "m2")] / 64, x.var(0, unbiased=False), rtol=1e-6, atol=0)


def test_sum_max_and_first_reductions():
    items = [(Key("sat", "a"), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]),
             (Key("maxv", "a"), [torch.tensor([1.0, 5.0]), torch.tensor([3.0, -4.0])]),
             (Key("w", "a"), [torch.tensor([7.0]), torch.tensor([9.0])]),
             (Key("gw", "s", sharded=True), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])]
    got = dict(combine(items))
    assert got[Key("sat", "a")].tolist() == [4.0, 6.0]
    assert got[Key("maxv", "a")].tolist() == [3.0, 5.0]
    assert got[Key("w", "a")].tolist() == [7.0]  # replicated: rank 0's copy
    assert got[Key("gw", "s")].tolist() == [4.0, 6.0]  # shards: their sums add up


def test_two_halves_combined_give_the_statistics_of_the_whole_batch():
    """What DDP does, without processes: each half reduced apart, the buffers combined (float32
    reductions: agreement to 1e-6)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 6)

    def buffer_of(batch):
        with Recorder(model) as rec:
            model(batch).square().sum().backward()
            grads = {id(p): p.grad.clone() for p in model.parameters()}
            model.zero_grad()
            return rec, rec.acc.buffer(model, rec.layers, grads), grads

    rec, whole, grads = buffer_of(x)
    _, a, _ = buffer_of(x[:12])
    _, b, _ = buffer_of(x[12:])
    assert [k for k, _ in a] == [k for k, _ in b] == [k for k, _ in whole]
    merged = combine([(k, [ta, tb]) for (k, ta), (_, tb) in zip(a, b)])
    one = build_stats(model, rec.layers, rec.graph, rec.acc, to_host(whole), grads, True, False)
    two = build_stats(model, rec.layers, rec.graph, rec.acc, to_host(merged), grads, True, False)
    for l1, l2 in zip(one.layers, two.layers):
        for attr in ("q", "signal", "r", "grad_q", "weight_std"):
            assert getattr(l2, attr) == pytest.approx(getattr(l1, attr), rel=1e-6), (l1.name, attr)
    measured = {"tanh": ("saturated", "saturated_units", "preact_std"), "relu": ("dead",)}
    assert sorted(a.kind for a in one.activations) == ["relu", "tanh"]
    for a1, a2 in zip(one.activations, two.activations):
        for attr in measured[a1.kind]:
            assert getattr(a2, attr) == pytest.approx(getattr(a1, attr), rel=1e-6), (a1.name, attr)
