"""The Hugging Face Trainer callback on real runs (CPU, a tiny BERT built from a config; nothing downloaded)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
EA = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

import initdoctor  # noqa: E402
from initdoctor.integrations.transformers import InitDoctorCallback  # noqa: E402

from .conftest import assert_no_hooks  # noqa: E402


def tiny_bert(init_range: float = 0.02):
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     initializer_range=init_range, hidden_dropout_prob=0.1)
    transformers.set_seed(0)
    return transformers.BertForSequenceClassification(config)


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def run(out, callbacks=(), model=None, steps: int = 4, **kw):
    opts = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", report_to=["tensorboard"], use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0, learning_rate=1e-2)
    args = transformers.TrainingArguments(**{**opts, **kw})
    model = model if model is not None else tiny_bert()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=list(callbacks))
    trainer.train()
    return trainer, model


def events(path):
    acc = EA.EventAccumulator(str(path), size_guidance={EA.SCALARS: 0, EA.TENSORS: 0})
    acc.Reload()
    return acc


def test_trainer_run_writes_beside_the_loss_and_trains_bit_identically(tmp_path):
    _, bare = run(tmp_path / "bare")
    cb = InitDoctorCallback(every=2, histograms=False)
    trainer, model = run(tmp_path / "watched", [cb])
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), model.parameters()))
    assert_no_hooks(model)
    assert [h["step"] for h in cb.doctor.history] == [0, 2]
    runs = list((tmp_path / "watched" / "runs").iterdir())
    assert len(runs) == 1  # the Trainer's run directory, shared
    acc = events(runs[0])
    tags = acc.Tags()["scalars"]
    ours = [t for t in tags if t.startswith("initdoctor")]
    assert ours and "train/loss" in tags
    assert {e.step for t in ours for e in acc.Scalars(t)} == {0, 2}
    # keyword inputs and a ModelOutput: the encoder's layers are observed, forward and backward
    lay = cb.doctor.last.stats.layer("bert.encoder.layer.1.output.dense")
    assert lay.samples == 4 * 8 and lay.grad_q > 0
    assert cb.check is not None and cb.check.stats.layer("classifier").samples == 4
    assert [t for t in events(runs[0] / "initdoctor_check" / "before").Tags()["scalars"] if t.startswith("initdoctor")]


def test_sick_model_is_warned_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, model = run(tmp_path, [InitDoctorCallback(every=1, histograms=False)], model=tiny_bert(3.0), steps=3,
                       learning_rate=0.0)
    ours = [str(w.message) for w in caught if issubclass(w.category, initdoctor.InitDoctorWarning)]
    codes = [m.split(": ")[1].split()[0] for m in ours]
    assert "ID301" in codes  # the tanh pooler pinned at +-1
    assert len(codes) == len(set(codes)), ours  # each finding once, over the check and three samples


def test_gradient_accumulation_samples_every_micro_batch(tmp_path):
    cb = InitDoctorCallback(every=2, check_at_start=False, histograms=False)
    trainer, model = run(tmp_path, [cb], steps=3, gradient_accumulation_steps=2)
    assert [h["step"] for h in cb.doctor.history] == [0, 2]
    assert cb.doctor.last.stats.layer("classifier").samples == 8  # two micro-batches of 4
    assert_no_hooks(model)


def test_example_runs_and_reports_the_saturation_once(tmp_path):
    from .test_examples import _load

    mod = _load("hf_trainer_watch")
    with pytest.warns(initdoctor.InitDoctorWarning, match="ID301"):
        result = mod.main(steps=2, every=1, output_dir=str(tmp_path))
    assert result["samples"] == [0, 1] and "ID301" in result["start"]
    assert [t for t in events(result["run"]).Tags()["scalars"] if t.startswith("initdoctor")]


def test_resumed_run_samples_on_the_same_grid(tmp_path):
    first = InitDoctorCallback(every=2, check_at_start=False, histograms=False)
    run(tmp_path, [first], steps=3, save_strategy="steps", save_steps=3)
    assert [h["step"] for h in first.doctor.history] == [0, 2]
    again = InitDoctorCallback(every=2, check_at_start=False, histograms=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, learning_rate=1e-2)
    trainer = transformers.Trainer(model=tiny_bert(), args=args, train_dataset=Data(), callbacks=[again])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert [h["step"] for h in again.doctor.history] == [4]
    assert again.run_dir == str(tmp_path / "initdoctor")  # no TensorBoard reporting: its own directory
