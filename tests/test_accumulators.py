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
from initdoctor.stats import Moments, Sums


def _moments_items(x: torch.Tensor, pooled: bool = False) -> list:
    s = Sums.over(x, 1, pooled=pooled)
    return [(Key("out", "l", "n"), torch.tensor([s.n], dtype=torch.float64)), (Key("out", "l", "k"), s.k),
            (Key("out", "l", "s1"), s.s1), (Key("out", "l", "s2"), s.s2), (Key("out", "l", "scale"), s.scale)]


def _host_moments(got: dict) -> Moments:
    return Sums(float(got[Key("out", "l", "n")][0]), got[Key("out", "l", "s1")], got[Key("out", "l", "s2")],
                got[Key("out", "l", "k")], got.get(Key("out", "l", "scale"))).moments()


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


def test_host_copy_takes_cpu_tensors_as_they_are():
    """On the CPU the 'copy' is free: no conversion runs on the training thread."""
    items = [(Key("sat", "a"), torch.tensor([1.0, 2.0])), (Key("w", "b", "s1", sharded=True), torch.tensor(4.0))]
    host = to_host(items)
    assert set(host) == {Key("sat", "a"), Key("w", "b", "s1")}
    assert all(host[k] is t for k, t in items)


def test_sums_give_exact_moments_for_tiny_variances_and_huge_values():
    gen = torch.Generator().manual_seed(0)
    x = (0.5 + 1e-4 * torch.randn(256, 3, generator=gen)).float()  # sigmoid-like: mean 0.5, var 1e-8
    ref = x.double().var(0, unbiased=False)
    per_unit = Sums.over(x, 1, pooled=False).moments()
    torch.testing.assert_close(per_unit.var_units(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(per_unit.mean, x.double().mean(0), rtol=1e-7, atol=0)
    pooled = Sums.over(x, 1).moments()
    assert pooled.pooled and pooled.var() == pytest.approx(float(ref.mean()), rel=1e-5)
    assert pooled.q() == pytest.approx(float(x.double().square().mean()), rel=1e-6)
    big = torch.randn(64, 8, generator=gen) * 1e30  # squares beyond float32's range
    m = Sums.over(big, 1).moments()
    assert m.nonfinite_units() == 0
    assert m.q() == pytest.approx(float(big.double().square().mean()), rel=1e-5)
    tiny = Sums.over(big * 1e-50, 1).moments()  # squares far below float32's smallest normal number
    assert tiny.q() == pytest.approx(m.q() * 1e-100, rel=1e-5)
    bad = big.clone()
    bad[3, 2] = float("nan")
    bad[0, 5] = float("inf")
    assert Sums.over(bad, 1).moments().nonfinite_units() == 2


@pytest.mark.parametrize("rows", [64, 4096])  # 4096 x 8 lies above stats.SMALL: the scaled float32 path
def test_both_reduction_paths_are_exact_at_the_extremes(rows):
    from initdoctor.stats import SMALL, scaled

    gen = torch.Generator().manual_seed(2)
    base = torch.randn(rows, 8, generator=gen)
    assert scaled(base) == (base.numel() > SMALL)
    for factor in (1e30, 1e-30, 1.0):  # squares beyond float32's range either way
        x = base * factor + 0.5 * factor
        ref = x.double()
        for pooled in (True, False):
            m = Sums.over(x, 1, pooled=pooled).moments()
            assert m.q() == pytest.approx(float(ref.square().mean()), rel=1e-5), (factor, pooled)
            assert m.var() == pytest.approx(float(ref.var(0, unbiased=False).mean()), rel=1e-4), (factor, pooled)
    bad = base.clone()
    bad[5, 2] = float("nan")
    bad[0, 6] = float("-inf")
    assert Sums.over(bad, 1).moments().nonfinite_units() == 2  # only the units that hold one


@pytest.mark.parametrize("pooled", [True, False])
def test_large_cpu_tensors_are_scaled_only_where_float32_squares_would_not_hold(pooled):
    """Above stats.SMALL the shifted copy is summed as it is where its float32 sums of squares are
    safe, and scaled by its largest value first where they are not; either way the moments are those
    of float64 arithmetic, and a scale is always in the buffer (every rank packs the same keys)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4096, 8, generator=gen)
    for factor, rescaled in ((1.0, False), (1e-3, False), (1e-22, True), (1e25, True)):
        x = base * factor
        s = Sums.over(x, 1, pooled=pooled)
        assert s.scale is not None and (float(s.scale) != 1.0) == rescaled, factor
        m = s.moments()
        ref = x.double()
        assert m.q() == pytest.approx(float(ref.square().mean()), rel=1e-5), factor
        assert m.var() == pytest.approx(float(ref.var(0, unbiased=False).mean()), rel=1e-4), factor
    bad = base.clone()
    bad[7, 1] = float("nan")
    s = Sums.over(bad, 1, pooled=pooled)
    assert s.scale is not None and s.moments().nonfinite_units() == 1


def test_pooled_summary_equals_the_summary_of_the_moments():
    """`Sums.summary` (NumPy, no per-unit moments for pooled sums) gives what `moments().summary()`
    gives: small and large tensors, scaled ones, float64, raw sums (accelerator style), NaN."""
    gen = torch.Generator().manual_seed(4)
    cases = {"small": torch.randn(64, 32, generator=gen) + 2.0, "large": torch.randn(4096, 8, generator=gen),
             "tiny": torch.randn(4096, 8, generator=gen) * 1e-22, "huge": torch.randn(64, 32, generator=gen) * 1e30,
             "float64": torch.randn(64, 32, generator=gen, dtype=torch.float64)}
    nan = torch.randn(64, 32, generator=gen)
    nan[5, 3] = float("nan")
    cases["nan"] = nan
    for name, x in cases.items():
        for shift in (True, False):
            s = Sums.over(x, 1, pooled=True, shift=shift)
            got, want = s.summary(), s.moments().summary()
            assert got[0] == want[0], name
            if name == "nan":
                assert got[0] == 1
                continue
            assert got[1:] == pytest.approx(want[1:], rel=1e-12, abs=0), (name, shift)
            ref = x.double()
            assert got[2] == pytest.approx(float(ref.var(0, unbiased=False).mean()), rel=1e-5), name


def test_later_calls_add_under_the_first_shift():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, 6, generator=gen) + 3.0
    s = Sums.over(x[:10], -1)
    s.add(x[10:], -1)
    whole = Moments.of(x.reshape(-1, 6).double())
    got = s.moments()
    assert got.n == 120
    torch.testing.assert_close(got.mean, whole.mean, rtol=1e-6, atol=0)
    assert got.var() == pytest.approx(whole.var(), rel=1e-5)


def test_combined_moments_equal_one_pass_over_the_whole_batch():
    gen = torch.Generator().manual_seed(0)
    # a tiny input-dependent part beside a large mean: the case that one-pass formulas lose
    x = 0.5 + 1e-8 * torch.randn(64, 5, generator=gen, dtype=torch.float64)
    a, b = _moments_items(x[:40]), _moments_items(x[40:])
    got = _host_moments(dict(combine([(k, [ta, tb]) for (k, ta), (_, tb) in zip(a, b)])))
    whole = Moments.of(x)
    assert got.n == 64
    torch.testing.assert_close(got.mean, whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.m2, whole.m2, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.m2 / 64, x.var(0, unbiased=False), rtol=1e-6, atol=0)
    # pooled over units (what layer outputs carry): the same average variance
    a, b = _moments_items(x[:40], pooled=True), _moments_items(x[40:], pooled=True)
    pooled = _host_moments(dict(combine([(k, [ta, tb]) for (k, ta), (_, tb) in zip(a, b)])))
    assert pooled.pooled and pooled.var() == pytest.approx(float(x.var(0, unbiased=False).mean()), rel=1e-6)


def test_sum_max_and_first_reductions():
    items = [(Key("sat", "a"), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]),
             (Key("maxv", "a"), [torch.tensor([1.0, 5.0]), torch.tensor([3.0, -4.0])]),
             (Key("w", "a", "s1"), [torch.tensor([7.0]), torch.tensor([9.0])]),
             (Key("gw", "s", sharded=True), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])]
    got = dict(combine(items))
    assert got[Key("sat", "a")].tolist() == [4.0, 6.0]
    assert got[Key("maxv", "a")].tolist() == [3.0, 5.0]
    assert got[Key("w", "a", "s1")].tolist() == [7.0]  # replicated: rank 0's copy
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


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
@pytest.mark.parametrize("exact", [True, False], ids=["float-count", "int32-count"])
def test_saturated_counts_each_unit_on_both_paths(kind, exact, monkeypatch):
    from initdoctor import accumulators
    from initdoctor import thresholds as T

    if not exact:  # the int32 path, taken beyond 2^24 samples per unit, on a small tensor
        monkeypatch.setattr(accumulators, "EXACT_COUNT", 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 5, generator=g) * torch.tensor([0.1, 3.0, 30.0]).reshape(1, 3, 1)
    y = torch.sigmoid(x) if kind == "sigmoid" else torch.tanh(x)
    y[0, 2, 0] = float("nan")  # not counted as saturated
    before = y.clone()
    got = accumulators.saturated(kind, y, [0, 2])
    tail = ((y < T.SIGMOID_LO) | (y > 1 - T.SIGMOID_LO)) if kind == "sigmoid" else (y.abs() > T.TANH_ABS)
    want = tail.sum(dim=[0, 2])
    assert got.tolist() == want.tolist()
    assert want[0] == 0 and want[2] > 200  # a unit near zero and a saturated one
    assert torch.equal(y.nan_to_num(), before.nan_to_num())  # the caller's tensor is left alone


@pytest.mark.parametrize("path", ["whole", "in-slices", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_count_counts_nan_and_both_infinities_exactly(path, dtype, monkeypatch):
    from initdoctor import accumulators

    if path == "in-slices":  # a large output on the CPU, in slices of rows: forced here on a small one
        monkeypatch.setattr(accumulators, "NONFINITE_CHUNK", 70)
    mask = True if path == "mask" else None  # the accelerators' path, forced on the CPU
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, :3] = float("nan")
    x[5, 7] = float("inf")
    x[39, 1:6] = -float("inf")  # in the last slice
    x[2, 2] = torch.finfo(dtype).max  # finite extremes are not counted
    x[3, 3] = -torch.finfo(dtype).max
    x[4, 4] = torch.finfo(dtype).tiny
    before = x.clone()
    got = accumulators.nonfinite_count(x, mask)
    assert got.dtype == torch.float64
    assert int(got) == 9 == int((~torch.isfinite(x)).sum())
    assert torch.equal(x.nan_to_num(), before.nan_to_num())  # the model's output is left alone
    # past 256 entries a bfloat16 sum would stop counting by ones; a slice may be one row
    y = torch.full((3, 300), float("nan"), dtype=dtype)
    assert int(accumulators.nonfinite_count(y, mask)) == 900
    assert int(accumulators.nonfinite_count(torch.tensor(float("inf"), dtype=dtype), mask)) == 1


def test_unshifted_sums_used_on_accelerators_agree_with_the_shifted_ones():
    # accelerators take raw float64 sums (three kernels, no shift) for float32 data: forced here
    gen = torch.Generator().manual_seed(3)
    sigmoid_like = (0.5 + 1e-4 * torch.randn(256, 3, generator=gen)).float()  # mean 0.5, var 1e-8
    base = torch.randn(64, 8, generator=gen)
    cases = [sigmoid_like] + [base * f + 0.5 * f for f in (1e30, 1e-30, 1.0)]  # squares beyond float32
    for x in cases:
        ref = x.double()
        for pooled in (True, False):
            raw = Sums.over(x, 1, pooled=pooled, shift=False)
            assert raw.k is None and raw.s1.dtype == torch.float64
            m = raw.moments()
            assert m.q() == pytest.approx(float(ref.square().mean()), rel=1e-6)
            assert m.var() == pytest.approx(float(ref.var(0, unbiased=False).mean()), rel=1e-5)
            torch.testing.assert_close(m.mean, ref.mean(0), rtol=1e-9, atol=0)
            if not pooled:
                torch.testing.assert_close(m.var_units(), ref.var(0, unbiased=False), rtol=1e-5, atol=0)
    # a later call adds without a shift too; conv-shaped units; NaN and Inf counted per unit
    x = torch.randn(30, 4, 6, 5, generator=gen) + 3.0
    s = Sums.over(x[:10], 1, shift=False)
    s.add(x[10:], 1)
    whole = Moments.of(x.movedim(1, -1).reshape(-1, 4).double())
    got = s.moments()
    assert got.n == 30 * 6 * 5
    torch.testing.assert_close(got.mean, whole.mean, rtol=1e-9, atol=0)
    assert got.var() == pytest.approx(whole.var(), rel=1e-9)
    bad = base.clone()
    bad[5, 2] = float("nan")
    bad[0, 6] = float("-inf")
    assert Sums.over(bad, 1, shift=False).moments().nonfinite_units() == 2
    # and through the buffer, across ranks: no shift travels, and the merge is Chan's as before
    halves = [Sums.over(x[:15].movedim(1, -1).reshape(-1, 4), 1, shift=False),
              Sums.over(x[15:].movedim(1, -1).reshape(-1, 4), 1, shift=False)]
    items = [(Key("out", "l", p), [torch.tensor([h.n], dtype=torch.float64) if p == "n" else getattr(h, p)
                                   for h in halves]) for p in ("n", "s1", "s2")]
    merged = {k: v for k, v in combine(items)}
    m = Sums(float(merged[Key("out", "l", "n")][0]), merged[Key("out", "l", "s1")], merged[Key("out", "l", "s2")],
             merged[Key("out", "l", "k")]).moments()
    torch.testing.assert_close(m.mean, whole.mean, rtol=1e-9, atol=0)
    assert m.var() == pytest.approx(whole.var(), rel=1e-9)


def test_sums_of_squares_by_foreach_equal_one_dot_each():
    from initdoctor.accumulators import sums_of_squares

    gen = torch.Generator().manual_seed(4)
    items = [(Key("w", str(i), "s2"), torch.randn(n, generator=gen) * s)
             for i, (n, s) in enumerate([(5, 1.0), (4096, 0.02), (1, 3.0), (300, 1e-3)])]
    items.append((Key("b", "x", "s2"), torch.randn(7, generator=gen).double()))  # another dtype: its own group
    dots = dict(sums_of_squares(items, foreach=False))
    grouped = dict(sums_of_squares(items, foreach=True))
    assert set(grouped) == set(dots) == {k for k, _ in items}
    for key, t in items:
        want = float(t.double().square().sum())
        assert float(dots[key]) == pytest.approx(want, rel=1e-5)
        assert float(grouped[key]) == pytest.approx(want, rel=1e-5)
        assert grouped[key].dtype == t.dtype


def test_check_on_the_accelerator_paths_forced_on_the_cpu_gives_the_same_statistics(tiny, monkeypatch):
    # what a GPU runs (raw float64 sums, grouped sums of squares), against the CPU's own paths
    import initdoctor
    from initdoctor import accumulators
    from initdoctor.stats import Sums as S

    model = tiny.mlp(3, 32, "tanh", init="xavier")
    x = torch.randn(64, 32)
    want = {lay.name: lay for lay in initdoctor.check(model, x).stats.layers}
    over, squares, used = S.over, accumulators.sums_of_squares, []

    def raw(t, ud, *, pooled=True, shift=None):
        used.append("raw")
        return over(t, ud, pooled=pooled, shift=False)

    def grouped(items, foreach=None):
        used.append("foreach")
        return squares(items, True)
    monkeypatch.setattr(S, "over", staticmethod(raw))
    monkeypatch.setattr(accumulators, "sums_of_squares", grouped)
    got = initdoctor.check(model, x).stats.layers
    assert used.count("raw") >= 8 and used.count("foreach") == 1  # outputs and gradients; one buffer
    assert len(got) == len(want) == 4
    for lay in got:
        ref = want[lay.name]
        for field in ("q", "signal", "grad_q", "weight_std", "weight_rms", "weight_grad_rms", "bias_std"):
            assert getattr(lay, field) == pytest.approx(getattr(ref, field), rel=1e-5), (lay.name, field)
