"""Model discovery, `package.module:attr` targets, the example batch (example_input, inference) and the
file's loss_fn."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

from initdoctor.cli import main
from initdoctor.loading import UsageError, example_batch, find_model, infer_input, load

CLASSES = """
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.fc = nn.Linear(3, width)
        def forward(self, x):
            return self.fc(x)
"""


def src(*parts: str) -> str:
    return "\n".join(textwrap.dedent(p) for p in parts)


def _json_of(argv, capsys) -> dict:
    assert main(argv) in (0, 1)
    out = capsys.readouterr()
    assert out.err == ""
    return json.loads(out.out)


# --- discovery order ---------------------------------------------------------------------------------


def test_model_flag_beats_everything(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", src(CLASSES, """
    instance = nn.Linear(3, 5)
    def build_model():
        return nn.Linear(3, 6)
    def other():
        return nn.Linear(3, 7)
    """))
    assert load(path, "other").model.out_features == 7
    assert load(path, "instance").model.out_features == 5
    assert load(path, "Small").model.fc.out_features == 4  # a class is a callable returning a module


def test_build_model_beats_instances_and_classes(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", src(CLASSES, """
    first = nn.Linear(3, 5)
    second = nn.Linear(3, 5)
    def build_model():
        return nn.Linear(3, 6)
    """))
    assert load(path).model.out_features == 6


def test_single_instance_beats_classes(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", src(CLASSES, """
    model = Small(width=9)
    """))
    loaded = load(path)
    assert loaded.model.fc.out_features == 9
    assert loaded.model is loaded.namespace.model  # the instance itself, not a copy


def test_single_no_arg_class(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", CLASSES)
    assert load(path).model.fc.out_features == 4


def test_imported_classes_are_not_candidates(tmp_path, tiny):
    # nn.Linear, nn.Module ... are imported names, not classes defined in the file
    path = tiny.write(tmp_path, "m.py", src(CLASSES, "\nfrom torch.nn import Linear, ReLU, Sequential\n"))
    assert isinstance(load(path).model.fc, nn.Linear)


def test_several_instances_is_an_error_listing_them(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", src(CLASSES, "\nenc = Small()\ndec = Small()\n"))
    with pytest.raises(UsageError, match=r"dec, enc.*--model"):
        load(path)


def test_several_classes_is_an_error_listing_them(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", src(CLASSES, """
    class Other(nn.Module):
        def forward(self, x):
            return x
    """))
    with pytest.raises(UsageError, match=r"Other, Small.*--model"):
        load(path)


def test_missing_model_name_lists_candidates(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", src(CLASSES, "\nnet = Small()\n"))
    with pytest.raises(UsageError, match=r"candidates: Small, net"):
        load(path, "nope")


def test_model_name_that_is_not_a_module(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", "WIDTH = 3\n")
    with pytest.raises(UsageError, match="int"):
        load(path, "WIDTH")


def test_file_can_import_its_neighbours(tmp_path, tiny):
    tiny.write(tmp_path, "helpers_neighbour.py", "from torch import nn\ndef make():\n    return nn.Linear(3, 11)\n")
    path = tiny.write(tmp_path, "m.py", "from helpers_neighbour import make\ndef build_model():\n    return make()\n")
    try:
        assert load(path).model.out_features == 11
    finally:
        sys.modules.pop("helpers_neighbour", None)
    assert str(tmp_path) not in sys.path


# --- package.module:attr ---------------------------------------------------------------------------------


@pytest.fixture
def package(tmp_path, monkeypatch, tiny):
    name = f"idpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    tiny.write(tmp_path / name, "models.py", """
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))

        class Factory:
            @staticmethod
            def build():
                return nn.Linear(6, 3)

        instance = nn.Linear(6, 4)
        not_a_model = 3

        def loss_fn(output, batch):
            return 3.0 * output.sum()
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_module_attr_targets(package):
    loaded = load(f"{package}.models:make")
    assert isinstance(loaded.model, nn.Sequential)
    assert loaded.namespace.__name__ == f"{package}.models"
    assert load(f"{package}.models:Factory.build").model.out_features == 3
    assert load(f"{package}.models:instance").model.out_features == 4
    with pytest.raises(UsageError, match="not an nn.Module"):
        load(f"{package}.models:not_a_model")
    with pytest.raises(UsageError, match="no attribute"):
        load(f"{package}.models:missing")
    with pytest.raises(UsageError, match="cannot import"):
        load(f"{package}.nothere:make")


def test_module_attr_target_on_the_command_line(package, capsys):
    d = _json_of(["check", f"{package}.models:make", "--format", "json"], capsys)
    assert d["target"] == f"{package}.models:make"
    assert d["input"]["inferred"] is True and d["input"]["shape"] == [64, 6]
    # the module's loss_fn is used: L = 3 * sum(y) gives the readout G = 9 exactly
    assert d["layers"][-1]["grad_q"] == pytest.approx(9.0)


# --- the example batch ---------------------------------------------------------------------------------


def test_example_input_is_used(tmp_path, tiny, capsys):
    path = tiny.write(tmp_path, "m.py", """
        import torch
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))

        def example_input():
            return torch.full((13, 5), 0.5)
    """)
    d = _json_of(["check", path, "--format", "json"], capsys)
    assert d["input"] == {"shape": [13, 5], "dtype": "float32", "inferred": False}
    assert d["layers"][0]["samples"] == 13
    # --input-shape wins over example_input()
    d = _json_of(["check", path, "--format", "json", "--input-shape", "3,5"], capsys)
    assert d["input"]["shape"] == [3, 5] and d["input"]["inferred"] is False


def test_example_input_list_becomes_positional_args(tmp_path, tiny, capsys):
    path = tiny.write(tmp_path, "m.py", """
        import torch
        from torch import nn

        class TwoInputs(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)
            def forward(self, x, y):
                return self.a(x) + self.b(y)

        def example_input():
            return [torch.randn(8, 3), torch.randn(8, 5)]
    """)
    d = _json_of(["check", path, "--format", "json"], capsys)
    assert d["input"]["shape"] == [8, 3]
    assert {lay["name"]: lay["samples"] for lay in d["layers"]} == {"a": 8, "b": 8}


def test_example_input_raising_is_a_usage_error(tmp_path, tiny, capsys):
    path = tiny.write(tmp_path, "m.py", """
        from torch import nn
        def build_model():
            return nn.Linear(3, 3)
        def example_input():
            raise ValueError("no data here")
    """)
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no data here" in err


INFERRED = {
    "linear": ("nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))", [4, 6], "float32"),
    "conv1d": ("nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 3))", [4, 3, 32], "float32"),
    "conv2d": ("nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))", [4, 3, 32, 32], "float32"),
    "conv3d": ("nn.Sequential(nn.Conv3d(2, 3, 3), nn.ReLU(), nn.Conv3d(3, 2, 1))", [4, 2, 8, 16, 16], "float32"),
    "embedding": ("nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 2))", [4, 16], "int64"),
    "gru": ("nn.GRU(5, 6, batch_first=True)", [4, 16, 5], "float32"),
    "lstm": ("nn.LSTM(5, 6)", [16, 4, 5], "float32"),
}


@pytest.mark.parametrize("kind", sorted(INFERRED))
def test_input_inferred_from_first_layer(tmp_path, tiny, capsys, kind):
    expr, shape, dtype = INFERRED[kind]
    path = tiny.write(tmp_path, f"{kind}.py", f"""
        import torch
        from torch import nn

        def build_model():
            torch.manual_seed(0)
            return {expr}
    """)
    d = _json_of(["check", path, "--format", "json", "--batch-size", "4"], capsys)
    assert d["input"] == {"shape": shape, "dtype": dtype, "inferred": True}
    assert d["layers"][0]["index"] == 0  # the first layer ran on the inferred batch


def test_inferred_embedding_indices_are_in_range():
    model = nn.Sequential(nn.Embedding(7, 3))
    x = infer_input(model, 32, seed=0)
    assert x.dtype == torch.long and int(x.min()) >= 0 and int(x.max()) < 7
    assert int(x.max()) > 1  # the whole vocabulary is used, not just {0, 1}


def test_inference_is_seeded_and_leaves_global_rng_alone():
    model = nn.Linear(4, 2)
    state = torch.get_rng_state()
    a, b = infer_input(model, 8, seed=3), infer_input(model, 8, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, infer_input(model, 8, seed=4))
    assert torch.equal(torch.get_rng_state(), state)


def test_cannot_infer_is_a_usage_error():
    class NoLayers(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UsageError, match="--input-shape"):
        infer_input(NoLayers(), 8, 0)


def test_example_batch_order(tmp_path, tiny):
    path = tiny.write(tmp_path, "m.py", """
        import torch
        from torch import nn
        def build_model():
            return nn.Linear(5, 2)
        def example_input():
            return torch.zeros(3, 5)
    """)
    loaded = load(path)
    x, inferred = example_batch(loaded, None, None, None, 0)
    assert x.shape == (3, 5) and not inferred
    x, inferred = example_batch(loaded, "2,5", None, None, 0)
    assert x.shape == (2, 5) and not inferred
    loaded.namespace = None
    x, inferred = example_batch(loaded, None, None, 7, 0)
    assert x.shape == (7, 5) and inferred


# --- the file's loss_fn ----------------------------------------------------------------------------------


def test_loss_fn_from_the_file_is_used(tmp_path, tiny, capsys):
    path = tiny.write(tmp_path, "m.py", """
        import torch
        from torch import nn

        def build_model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))

        def example_input():
            return torch.randn(10, 5, generator=torch.Generator().manual_seed(0))

        def loss_fn(output, batch):
            assert batch.shape == (10, 5)
            return 2.0 * output.sum()
    """)
    d = _json_of(["check", path, "--format", "json"], capsys)
    # dL/dy_out = 2 everywhere
    assert d["layers"][-1]["grad_q"] == pytest.approx(4.0)
    # without the file's loss_fn the cotangent gives something else
    loaded = load(path)
    del loaded.namespace.loss_fn
    import initdoctor

    diag = initdoctor.check(loaded.model, loaded.namespace.example_input())
    assert diag.layers[-1].grad_q != pytest.approx(4.0)


def test_find_model_on_a_plain_namespace():
    from types import SimpleNamespace

    ns = SimpleNamespace(__name__="ns", build_model=lambda: nn.Linear(2, 2))
    assert isinstance(find_model(ns, "ns", None), nn.Linear)
