"""initdoctor.fix: cures the depth-trend models, keeps parameter identity, dtype and tying, leaves healthy
models and deliberate zero-inits alone, and touches nothing global."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import initdoctor
from initdoctor.cli import main

# Smaller versions of the acceptance cases p03, p06, p07 and p10.
SICK = {
    "p03_sigmoid_uniform": dict(depth=8, width=64, act="sigmoid", init="uniform", sigma=0.1),
    "p06_relu_exploding": dict(depth=6, width=128, act="relu", init="normal", sigma=0.5, din=64),
    "p07_relu_xavier_30": dict(depth=30, width=64, act="relu", init="xavier", gain=1.0),
    "p10_default_deep": dict(depth=12, width=128, act="relu", init="default", din=64, bias=None),
}
EXPECTED = {"p03_sigmoid_uniform": {"ID203"}, "p06_relu_exploding": {"ID202", "ID204"},
            "p07_relu_xavier_30": {"ID201", "ID203"}, "p10_default_deep": {"ID203"}}


def _id2(diag) -> set[str]:
    return {f.code for f in diag.problems() if f.code.startswith("ID2")}


@pytest.mark.parametrize("name", sorted(SICK))
def test_fix_cures_depth_trends(tiny, name):
    model = tiny.mlp(**SICK[name])
    x = tiny.batch(128, 64)
    ids = {n: id(p) for n, p in model.named_parameters()}
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    result = initdoctor.fix(model, x)
    assert EXPECTED[name] <= _id2(result.before)
    assert _id2(result.after) == set()
    assert result.cured and result.written
    assert result.before.after is result.after
    # the model really changed, and a fresh check agrees with result.after
    assert _id2(initdoctor.check(model, x)) == set()
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    # hidden layers got He for ReLU, Xavier for sigmoid
    first = {p.layer: p for p in result.plan}["0"]
    assert first.apply
    assert first.scheme.startswith("kaiming" if SICK[name]["act"] == "relu" else "xavier")
    tiny.assert_no_hooks(model)


def test_fix_keeps_dtype_and_identity_in_float64(tiny):
    model = tiny.mlp(8, 64, "relu", "normal", sigma=1.0).double()
    params = list(model.parameters())
    result = initdoctor.fix(model, tiny.batch(64, 64, dtype=torch.float64))
    assert result.written
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not _id2(result.after)


def test_fix_keeps_bfloat16(tiny):
    model = tiny.mlp(8, 64, "relu", "normal", sigma=1.0).to(torch.bfloat16)
    params = list(model.parameters())
    result = initdoctor.fix(model, tiny.batch(64, 64, dtype=torch.bfloat16))
    assert result.written
    assert all(a is b and a.dtype == torch.bfloat16 for a, b in zip(params, model.parameters()))


class _TiedStack(nn.Module):
    """A sick ReLU stack whose layers 2 and 3 share one weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(8))
        for lin in self.layers:
            nn.init.normal_(lin.weight, 0.0, 1.0)
        self.layers[3].weight = self.layers[2].weight
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        for lin in self.layers:
            x = torch.relu(lin(x))
        return self.out(x)


def test_fix_keeps_tied_weights_tied(tiny):
    model = _TiedStack()
    x = tiny.batch(64, 64)
    result = initdoctor.fix(model, x)
    assert result.written and not _id2(result.after)
    assert model.layers[3].weight is model.layers[2].weight
    assert result.written.count("layers.2.weight") + result.written.count("layers.3.weight") == 1
    assert len(list(model.parameters())) == 8 * 2 - 1 + 2


class _TiedLM(nn.Module):
    """Embedding tied to the output head (nanoGPT-style), with a sick ReLU stack in between."""

    def __init__(self, depth=12, d=64, vocab=100):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        for b in self.blocks:
            nn.init.normal_(b.weight, 0.0, 1.0)
            nn.init.zeros_(b.bias)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = torch.relu(b(h))
        return self.head(h)


def test_fix_keeps_embedding_tying(tiny):
    model = _TiedLM()
    x = torch.randint(0, 100, (16, 8), generator=torch.Generator().manual_seed(1))
    result = initdoctor.fix(model, x)
    assert result.written
    assert model.head.weight is model.emb.weight


def test_fix_does_not_redraw_a_kept_embedding_through_a_tied_head(tiny):
    model = _TiedLM()
    before = model.emb.weight.detach().clone()
    x = torch.randint(0, 100, (16, 8), generator=torch.Generator().manual_seed(1))
    result = initdoctor.fix(model, x)
    assert {p.layer: p.scheme for p in result.plan}["emb"] == "keep"
    assert torch.equal(model.emb.weight, before)


def test_fix_leaves_a_healthy_model_alone(tiny):
    model = tiny.mlp(6, 64, "relu", "he")
    snap = tiny.snapshot(model)
    result = initdoctor.fix(model, tiny.batch(64, 64))
    assert result.written == [] and not result.cured
    assert all(p.scheme == "keep" and not p.apply for p in result.plan)
    tiny.assert_unchanged(model, snap)
    assert not result.after.problems()


def test_fix_keeps_a_zero_output_layer(tiny):
    model = tiny.mlp(30, 64, "relu", "xavier", gain=1.0)  # sick: vanishing
    nn.init.zeros_(model[60].weight)
    nn.init.zeros_(model[60].bias)
    result = initdoctor.fix(model, tiny.batch(64, 64))
    assert result.written
    assert not any(w.startswith("60.") for w in result.written)
    assert {p.layer: p.scheme for p in result.plan}["60"] == "keep"
    assert torch.count_nonzero(model[60].weight) == 0 and torch.count_nonzero(model[60].bias) == 0
    assert not _id2(result.after)


def test_fix_does_not_touch_the_global_rng(tiny):
    model = tiny.mlp(8, 64, "relu", "normal", sigma=1.0)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    result = initdoctor.fix(model, tiny.batch(64, 64))
    assert result.written
    assert torch.equal(torch.get_rng_state(), state)


def test_fix_is_deterministic_for_a_seed(tiny):
    a, b = (tiny.mlp(8, 64, "relu", "normal", sigma=1.0) for _ in range(2))
    x = tiny.batch(64, 64)
    initdoctor.fix(a, x, seed=3)
    initdoctor.fix(b, x, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_fix_restores_modes_and_buffers(tiny):
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, 0.0, 1.0)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Dropout(0.5), nn.Linear(32, 4)).eval()
    result = initdoctor.fix(model, tiny.batch(64, 32))
    assert result.written
    assert not any(m.training for m in model.modules())
    tiny.assert_no_hooks(model)


def test_save_fixed_writes_a_loadable_state_dict(tmp_path, tiny, capsys):
    path = tiny.write(tmp_path, "sick.py", """
        import torch
        from torch import nn

        def build_model():
            torch.manual_seed(0)
            layers = []
            for _ in range(8):
                lin = nn.Linear(64, 64)
                nn.init.normal_(lin.weight, 0.0, 1.0)
                nn.init.zeros_(lin.bias)
                layers += [lin, nn.ReLU()]
            return nn.Sequential(*layers, nn.Linear(64, 4))

        def example_input():
            return torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    """)
    out = tmp_path / "fixed.pt"
    assert main(["check", path, "--save-fixed", str(out), "--format", "json"]) == 0
    capsys.readouterr()
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and "0.weight" in state and "16.bias" in state
    # it matches fixing the same model in-process, and loads into a fresh one
    import importlib.util

    spec = importlib.util.spec_from_file_location("sick_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = mod.build_model()
    initdoctor.fix(ref, mod.example_input())
    fresh = mod.build_model()
    fresh.load_state_dict(state)
    for k, v in ref.state_dict().items():
        assert torch.equal(state[k], v), k
    assert not _id2(initdoctor.check(fresh, mod.example_input()))


def test_trained_norm_gains_are_kept_unless_a_scheme_is_forced():
    """DESIGN: norm layers are reset only on a model at init; a checkpoint's gains vary across channels."""

    def trained_like() -> nn.Sequential:
        torch.manual_seed(0)
        layers = []
        for _ in range(8):
            layers += [nn.Linear(64, 64), nn.Tanh(), nn.LayerNorm(64)]
        model = nn.Sequential(*layers, nn.Linear(64, 10))
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0, 1.0)  # saturates every tanh
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)  # as training leaves them
        return model

    model = trained_like()
    norms = {n: p.detach().clone() for n, p in model.named_parameters()
             if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.LayerNorm)}
    x = torch.randn(64, 64)
    r = initdoctor.fix(model, x)
    assert r.written and "ID301" in r.before.codes()
    assert all(torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)
    (kept,) = [p for p in r.plan if p.layer == "2"]
    assert kept.scheme == "keep" and "trained norm gains" in kept.reason
    forced = trained_like()
    r = initdoctor.fix(forced, x, scheme="xavier_uniform")
    assert "2.weight" in r.written and bool((forced[2].weight == 1).all())
