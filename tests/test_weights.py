"""weights.py: a layer's kind, fans and unit rows, read from what its weight does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from initdoctor import vocab
from initdoctor.weights import (
    duplicate_groups,
    fans,
    is_weight_layer,
    kind,
    main_weight,
    symmetry_of,
    weight_rows,
)


@pytest.mark.parametrize("module, expected_kind, expected_fans", [
    (nn.Linear(5, 7), vocab.LINEAR, (5, 7)),
    (nn.Conv2d(3, 8, 3), vocab.CONV, (27, 72)),
    (nn.ConvTranspose2d(3, 8, 3), vocab.CONV_TRANSPOSE, (27, 72)),  # weight stores (in, out): fans swapped back
    (nn.Embedding(10, 4), vocab.EMBEDDING, (None, 4)),
    (nn.LSTM(6, 9), vocab.RECURRENT, (6, 9)),
    (nn.MultiheadAttention(8, 2), vocab.ATTENTION, (8, 8)),
])
def test_kind_and_forward_fans(module, expected_kind, expected_fans):
    assert is_weight_layer(module)
    assert kind(module) == expected_kind
    assert fans(module) == expected_fans


def test_norm_layers_and_vectors_are_not_weight_layers():
    assert not is_weight_layer(nn.LayerNorm((4, 4)))  # a 2-D weight, but no units to tell apart
    assert not is_weight_layer(nn.BatchNorm1d(4))
    assert not is_weight_layer(nn.ReLU())


def test_main_weight_of_packed_layers():
    mha = nn.MultiheadAttention(8, 2)
    assert main_weight(mha) is mha.in_proj_weight
    lstm = nn.LSTM(6, 9)
    assert main_weight(lstm) is lstm.weight_ih_l0


def test_rows_are_output_units_for_transposed_convolutions():
    m = nn.ConvTranspose1d(4, 6, 3)
    ((label, rows, grows),) = list(weight_rows(m, None))
    assert label == "weight" and grows is None
    assert tuple(rows.w.shape) == (6, 4 * 3)  # one row per output channel
    assert rows.b is not None and rows.b.shape == (6,)


def test_attention_rows_per_projection():
    mha = nn.MultiheadAttention(8, 2)
    labels = [label for label, _, _ in weight_rows(mha, None)]
    assert labels == ["in_proj_weight[q]", "in_proj_weight[k]", "in_proj_weight[v]"]


def test_duplicate_groups_finds_twins_and_ignores_near_misses():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 6, generator=gen)
    w[7] = w[2]
    w[9] = w[2]
    w[4] = w[1] + 1e-3  # far beyond 1e-5 of the largest row norm
    assert duplicate_groups(w, 1e-5) == [[2, 7, 9]]


def test_symmetry_of_a_zero_tensor_and_its_gradient():
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
    grads = {id(m.weight): torch.zeros(3, 4), id(m.bias): torch.zeros(3)}
    ((label, rows, grows),) = list(weight_rows(m, grads))
    sym = symmetry_of(label, rows, grows, 1e-5)
    assert sym.zero and sym.constant and sym.grad_constant
    assert sym.duplicate_groups == [[0, 1, 2]] and sym.frozen_groups == [[0, 1, 2]]


@pytest.mark.parametrize("known", [False, True], ids=["read", "from-host-copy"])
def test_screened_symmetry_equals_one_by_one(known):
    """symmetry_all screens same-shape matrices together; every result must equal symmetry_of's,
    with the extremes and gradient norms read from the tensors or given by the host copy."""
    from initdoctor.stats import SymmetryStats
    from initdoctor.weights import Extremes, Rows, symmetry_all

    gen = torch.Generator().manual_seed(0)
    items = []
    for case in range(10):
        w, b = torch.randn(12, 5, generator=gen), torch.randn(12, generator=gen)
        gw, gb = torch.randn(12, 5, generator=gen), torch.randn(12, generator=gen)
        if case == 1:  # twins with equal gradients
            w[3], b[3], gw[3], gb[3] = w[0], b[0], gw[0], gb[0]
        if case == 2:  # constant weights
            w.fill_(0.3)
        if case == 3:  # zero gradient
            gw.zero_()
            gb.zero_()
        if case == 4:  # twins whose gradients differ
            w[5], b[5] = w[7], b[7]
        if case == 5:  # a gradient whose float32 sum of squares underflows to 0, rows that differ
            gw.mul_(1e-24)
            gb.mul_(1e-24)
        if case == 6:  # no weight gradient (inputs all zero), a bias gradient that differs per unit
            gw.zero_()
        if case == 7:  # another zero gradient: a deep stack's vanished layers come in numbers
            gw.zero_()
            gb.zero_()
        facts = Extremes(float(w.min()), float(w.max()), float(torch.dot(b, b)),
                         float(torch.dot(gw.reshape(-1), gw.reshape(-1))))
        items.append((f"w{case}", Rows.of(w, b), Rows.of(gw, gb), 1e-5) + ((facts,) if known else ()))
    items.append(("alone", Rows.of(torch.randn(4, 3, generator=gen)), None, 1e-5))
    fast = symmetry_all(items)
    slow = [symmetry_of(*it[:4]) for it in items]
    assert fast == slow
    assert fast[1].frozen_groups == [[0, 3]] and fast[4].duplicate_groups == [[5, 7]] and fast[2].constant
    assert fast[3].grad_constant and not fast[3].grad_rows_differ
    assert fast[7] == SymmetryStats("w7", 12, False, False, True, False, [], [], shape=[12, 5])
    assert not fast[5].grad_constant and fast[5].grad_rows_differ  # tiny is not zero
    assert fast[6].grad_constant  # judged on the weight gradient


def test_screen_settles_zero_and_tiny_gradients_without_the_one_by_one_path():
    """A zero gradient (STILL) and a gradient too small for a float32 sum of squares (PLAIN) are
    settled by the batched screen: the per-layer path is for layers that may be symmetric."""
    from initdoctor.weights import PLAIN, STILL, Rows, _screen

    gen = torch.Generator().manual_seed(1)
    items = []
    for scale in (1.0, 0.0, 1e-24, 0.0):
        w, b = torch.randn(16, 8, generator=gen), torch.randn(16, generator=gen)
        gw, gb = torch.randn(16, 8, generator=gen) * scale, torch.randn(16, generator=gen) * scale
        items.append(("weight", Rows.of(w, b), Rows.of(gw, gb), 1e-5))
    assert _screen(items) == [PLAIN, STILL, PLAIN, STILL]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_close_rows_found_alike_by_the_cpu_and_accelerator_paths(dtype):
    """The screen's neighbour test: NumPy on the CPU, torch elsewhere; both must flag the same
    matrices (twins, near twins within and beyond the tolerance, a NaN, none)."""
    from initdoctor.weights import _any_close_numpy, _any_close_torch

    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(40, 3, 50, generator=gen, dtype=dtype).transpose(1, 2)  # as the screen lays it out
    tol = torch.full((40,), 1e-4, dtype=dtype)
    for i in range(0, 40, 4):
        a, b = torch.randint(0, 50, (2,), generator=gen).tolist()
        if a == b:
            continue
        proj[i, b] = proj[i, a]  # twins
        proj[i + 1, b] = proj[i + 1, a] + 5e-5  # within the tolerance on every projection
        proj[i + 2, b] = proj[i + 2, a]
        proj[i + 2, b, 2] += 1e-2  # equal on two projections only
    proj[3, 7, 0] = float("nan")
    # rows told apart by one projection alone, in either direction: the others all tie
    proj[35, :, 0], proj[35, :, 2] = 0.0, 0.0
    proj[39, :, 0], proj[39, :, 1] = 0.0, 0.0
    fast, ref = _any_close_numpy(proj, tol), _any_close_torch(proj, tol)
    assert fast.tolist() == ref.tolist()
    assert fast[0::4].all() and fast[1::4].all() and not fast[35] and not fast[39] and int(fast.sum()) < 40


@pytest.mark.parametrize("cin, cout, k, s, groups", [
    (3, 64, 8, 8, 1),  # patchify (stride = kernel): each input reaches 64 outputs, torch says 4096
    (16, 32, 3, 2, 1),  # overlapping stride 2: 32 * 9 / 4 on average over positions
    (16, 32, 3, 1, 1),  # stride 1: torch's count is right
    (8, 16, 4, 2, 1),
    (32, 32, 3, 1, 32),  # depthwise: an input reaches only its own channel's 9 outputs
])
def test_conv_fan_out_is_what_the_backward_pass_measures(cin, cout, k, s, groups):
    """Var(dL/dx) = fan_out * Var(W) * Var(dL/dy) away from the borders, with fan_out = out/groups * prod(k/s)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=s, groups=groups, bias=False)
    x = torch.zeros(8, cin, 16 * s + k, 16 * s + k, requires_grad=True)
    y = conv(x)
    y.backward(torch.randn_like(y))
    inner = x.grad[:, :, k:-k, k:-k]  # every position here is covered as often as on average
    measured = float(inner.square().mean() / conv.weight.detach().square().mean())
    fan_in, fan_out = fans(conv)
    assert fan_in == cin // groups * k * k
    assert measured == pytest.approx(fan_out, rel=0.05)
    torch_fan_out = nn.init._calculate_fan_in_and_fan_out(conv.weight)[1]
    assert torch_fan_out == cout * k * k  # what torch.nn.init would use: off by groups * s^2


def test_vit_b16_patchify_fans():
    """ViT-B/16's 768x3x16x16 stride-16 conv: Xavier std 0.036 from its own fans, not torch's 0.0032."""
    from initdoctor.schemes import std_of

    conv = nn.Conv2d(3, 768, 16, stride=16)
    assert fans(conv) == (768, 768)
    assert std_of("xavier_uniform", 1.0, *fans(conv)) == pytest.approx(0.0361, abs=1e-4)
    fi, fo = nn.init._calculate_fan_in_and_fan_out(conv.weight)
    assert std_of("xavier_uniform", 1.0, fi, fo) == pytest.approx(0.0032, abs=1e-4)
