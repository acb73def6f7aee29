"""Example inputs as positional and keyword arguments: a tensor, a tuple, a dict, or (args, kwargs)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import initdoctor
from initdoctor.cli import main
from initdoctor.probe import call_args


class Tagger(nn.Module):
    """Takes token ids and an optional mask by keyword, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, input_ids, attention_mask=None, scale: float = 1.0):
        h = torch.relu(self.fc(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.out(h) * scale}


def _ids(n=8, t=6):
    return torch.randint(0, 50, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("inputs, expected", [
    (torch.ones(2), ((torch.ones(2),), {})),
    ((1, 2), ((1, 2), {})),
    ({"a": 1}, ((), {"a": 1})),
    (((1,), {"b": 2}), ((1,), {"b": 2})),
    (([1], {"b": 2}), ((1,), {"b": 2})),
])
def test_call_args(inputs, expected):
    args, kwargs = call_args(inputs)
    assert kwargs == expected[1] and len(args) == len(expected[0])


def test_check_with_keyword_inputs_measures_every_layer():
    torch.manual_seed(0)
    model = Tagger()
    ids = _ids()
    mask = torch.ones(8, 6)
    d = initdoctor.check(model, {"input_ids": ids, "attention_mask": mask})
    ran = {lay.name for lay in d.stats.ran()}
    assert {"emb", "fc", "out"} <= ran
    assert d.stats.layer("fc").activation == "relu" and d.stats.layer("fc").grad_q > 0
    assert d.input["keywords"] == ["input_ids", "attention_mask"] and d.input["shape"] == [8, 6]
    # the same numbers as a positional call with the same values
    p = initdoctor.check(model, (ids, mask))
    assert p.stats.layer("fc").q == pytest.approx(d.stats.layer("fc").q, rel=1e-12)


def test_args_and_kwargs_pair_passes_non_tensor_keywords():
    torch.manual_seed(0)
    model = Tagger()
    ids = _ids()
    plain = initdoctor.check(model, ids)
    scaled = initdoctor.check(model, ((ids,), {"scale": 10.0}))
    # scale multiplies the output after `out`, so every layer's gradient by 10 and G by 100
    for name in ("out", "fc"):
        assert scaled.stats.layer(name).grad_q == pytest.approx(100 * plain.stats.layer(name).grad_q, rel=1e-4)


def test_cli_example_input_returning_a_dict(tmp_path, capsys):
    f = tmp_path / "tagger.py"
    f.write_text(
        "import torch\nfrom torch import nn\n"
        "class Tagger(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(50, 16)\n"
        "        self.fc = nn.Linear(16, 5)\n"
        "    def forward(self, input_ids, attention_mask=None):\n"
        "        return self.fc(self.emb(input_ids) * attention_mask.unsqueeze(-1))\n"
        "def example_input():\n"
        "    return {'input_ids': torch.randint(0, 50, (4, 7)), 'attention_mask': torch.ones(4, 7)}\n")
    assert main(["check", str(f), "--format", "json", "--fail-on", "never"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["input"]["keywords"] == ["input_ids", "attention_mask"]
    assert [lay["name"] for lay in d["layers"]] == ["emb", "fc"]
    assert all(lay["index"] >= 0 for lay in d["layers"])
