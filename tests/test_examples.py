"""Every example in examples/ runs (small sizes); the digits example has its own file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import initdoctor
from initdoctor.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_example_is_tested():
    # lightning_watch and hf_trainer_watch: tests/test_integrations_*.py (they need the extras)
    tested = {"xavier_classic", "watch_training", "train_digits", "lightning_watch", "hf_trainer_watch"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_classic_constant_network_diagnosed_and_cured(capsys):
    # what `make demo` runs
    assert main(["check", str(EXAMPLES / "xavier_classic.py"), "--fix", "--fail-on", "never"]) == 0
    out = capsys.readouterr().out
    assert "ID103 unbreakable-symmetry" in out
    assert "resolved: ID101, ID103" in out and "After the fix: none" in out
    assert main(["check", str(EXAMPLES / "xavier_classic.py"), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {f["code"] for f in report["findings"] if f["severity"] == "error"} == {"ID101", "ID103"}


def test_classic_network_symmetry_is_real():
    # the claim behind ID103: 50 SGD steps leave the three hidden units identical
    mod = _load("xavier_classic")
    model, x = mod.build_model(), mod.example_input()
    y = x.sum(1, keepdim=True).sigmoid()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    w = model[0].weight.detach()
    assert torch.allclose(w, w[:1].expand_as(w))
    assert "ID103" in initdoctor.check(model, x).codes()


def test_watch_training_example(tmp_path):
    pytest.importorskip("sklearn")
    mod = _load("watch_training")
    with pytest.warns(initdoctor.InitDoctorWarning):
        result = mod.main(steps=30, every=10, log_dir=str(tmp_path))
    assert result["cured"] < result["sick"]
    from tensorboard.backend.event_processing import event_accumulator as ea

    for run in ("sick", "cured"):
        acc = ea.EventAccumulator(str(tmp_path / run), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
        acc.Reload()
        # the loss, logged through the same writer, beside initdoctor's metrics and its tab's data
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(30))
        assert "initdoctor.log10_gradient/000.0" in acc.Tags()["scalars"]
        assert [e.step for e in acc.Tensors("initdoctor.diagnosis")] == [0, 10, 20]
