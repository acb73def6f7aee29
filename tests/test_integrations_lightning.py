"""The Lightning callback on real fits (CPU, tiny models): TensorBoard read back, training untouched, DDP."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
EA = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

import initdoctor  # noqa: E402
from initdoctor.integrations.lightning import InitDoctorCallback  # noqa: E402

from .conftest import assert_no_hooks  # noqa: E402

HERE = Path(__file__).resolve().parent
# Net has a validation_step for the one test that validates; the others have no val loader
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


class Net(pl.LightningModule):
    def __init__(self, std: float | None = None, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.1),
                                 nn.Linear(16, 3))
        if std is not None:
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, std)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, i):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TwoOptimizers(Net):
    """Manual optimization with two optimizers, each stepping once per batch (a GAN-like schedule)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, i):
        x, y = batch
        first, second = self.optimizers()
        for opt in (first, second):
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self):
        head = list(self.net[-1].parameters())
        body = [p for p in self.parameters() if all(p is not q for q in head)]
        return torch.optim.SGD(body, lr=0.1), torch.optim.SGD(head, lr=0.1)


def loader(n: int = 64, batch: int = 8, shuffle: bool = True):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle)  # shuffling draws from the RNG


def fit(root, callbacks=(), model=None, steps: int = 5, ckpt_path=None, **kw):
    pl.seed_everything(0, verbose=False)
    model = model if model is not None else Net()
    opts = dict(max_steps=steps, callbacks=list(callbacks), default_root_dir=str(root), accelerator="cpu",
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                log_every_n_steps=1, limit_val_batches=0)
    opts.update(kw)
    trainer = pl.Trainer(**opts)
    val = loader(16, shuffle=False) if opts["limit_val_batches"] else None
    trainer.fit(model, loader(), val, ckpt_path=ckpt_path)
    return trainer, model


def events(path: str):
    acc = EA.EventAccumulator(str(path), size_guidance={EA.SCALARS: 0, EA.TENSORS: 0})
    acc.Reload()
    return acc


def ours(acc) -> list[str]:
    return [t for t in acc.Tags()["scalars"] if t.startswith("initdoctor")]


def steps_of(acc, tags) -> set[int]:
    return {e.step for t in tags for e in acc.Scalars(t)}


def test_fit_writes_beside_the_loss_and_trains_bit_identically(tmp_path):
    _, bare = fit(tmp_path / "bare")
    cb = InitDoctorCallback(every=2)
    trainer, model = fit(tmp_path / "watched", [cb])
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), model.parameters()))
    assert_no_hooks(model)
    assert [h["step"] for h in cb.doctor.history] == [0, 2, 4]
    acc = events(trainer.logger.log_dir)  # the logger's own run directory
    tags = ours(acc)
    assert tags and "train_loss" in acc.Tags()["scalars"]
    assert steps_of(acc, tags) == {0, 2, 4}
    assert {e.step for e in acc.Scalars("train_loss")} >= {0, 2, 4}
    # the whole diagnosis as the initdoctor tab's plugin data, at every sampled step
    from initdoctor.tensorboard_plugin.metadata import DIAGNOSIS_TAG, PLUGIN_NAME

    assert acc.SummaryMetadata(DIAGNOSIS_TAG).plugin_data.plugin_name == PLUGIN_NAME
    assert [e.step for e in acc.Tensors(DIAGNOSIS_TAG)] == [0, 2, 4]
    # the check on the first batch is a run of its own beside the training run
    assert ours(events(os.path.join(trainer.logger.log_dir, "initdoctor_check", "before")))
    assert cb.check is not None and cb.check.stats.layer("net.0").samples == 8


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_sick_model_is_warned_once_through_lightning_logging(tmp_path):
    handler = Records()
    lightning_log = logging.getLogger("lightning.pytorch")  # the tree Lightning configures and shows
    lightning_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tmp_path, [InitDoctorCallback(every=1)], model=Net(std=4.0, lr=0.0), steps=3)
    finally:
        lightning_log.removeHandler(handler)
    sat = [str(w.message) for w in caught
           if issubclass(w.category, initdoctor.InitDoctorWarning) and "ID301" in str(w.message)]
    assert len(sat) == 1, sat  # the check at the start finds it; the three samples do not repeat it
    logged = [r for r in handler.records if r.levelno == logging.WARNING and "ID301" in r.getMessage()]
    assert len(logged) == 1
    assert any("initdoctor check on the first batch" in r.getMessage() for r in handler.records)


def test_a_submodule_is_watched_by_name(tmp_path):
    cb = InitDoctorCallback(every=2, module="net", check_at_start=False)
    fit(tmp_path, [cb], steps=1)
    assert [lay.name for lay in cb.doctor.last.stats.ran()] == ["0", "2", "5"]


def test_without_a_tensorboard_logger_it_writes_its_own_directory(tmp_path):
    cb = InitDoctorCallback(every=2, check_at_start=False)
    fit(tmp_path, [cb], logger=False, steps=3)
    acc = events(tmp_path / "initdoctor")
    assert steps_of(acc, ours(acc)) == {0, 2}
    assert not (tmp_path / "initdoctor" / "initdoctor_check").exists()


@pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint")
def test_resumed_fit_samples_on_the_same_grid(tmp_path):
    first = InitDoctorCallback(every=2, check_at_start=False)
    trainer, model = fit(tmp_path, [first], steps=3)
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    again = InitDoctorCallback(every=2, check_at_start=False)
    fit(tmp_path, [again], model=Net(), steps=7, ckpt_path=str(ckpt))
    assert [h["step"] for h in first.doctor.history] == [0, 2]
    assert [h["step"] for h in again.doctor.history] == [4, 6]


@pytest.mark.filterwarnings("ignore:You.re resuming from a checkpoint")
def test_a_resumed_fit_does_not_repeat_a_finding_already_reported(tmp_path):
    def saturated(caught):
        return [w for w in caught if issubclass(w.category, initdoctor.InitDoctorWarning) and "ID301" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [InitDoctorCallback(every=1)], model=Net(std=4.0, lr=0.0), steps=2)
        trainer.save_checkpoint(tmp_path / "two.ckpt")
        assert len(saturated(caught)) == 1
        fit(tmp_path, [InitDoctorCallback(every=1)], model=Net(std=4.0, lr=0.0), steps=4,
            ckpt_path=str(tmp_path / "two.ckpt"))
    assert len(saturated(caught)) == 1


def test_gradient_accumulation_samples_every_micro_batch(tmp_path):
    cb = InitDoctorCallback(every=2, check_at_start=False)
    trainer, _ = fit(tmp_path, [cb], steps=3, accumulate_grad_batches=2)
    assert [h["step"] for h in cb.doctor.history] == [0, 2]
    lay = cb.doctor.last.stats.layer("net.0")
    assert lay.samples == 16 and lay.grad_q > 0  # two micro-batches of 8 in one optimizer step


def test_validation_inside_the_fit_is_no_part_of_a_sample(tmp_path):
    cb = InitDoctorCallback(every=2, check_at_start=False)
    fit(tmp_path, [cb], steps=3, limit_val_batches=2, val_check_interval=2, num_sanity_val_steps=0)
    assert [h["step"] for h in cb.doctor.history] == [0, 2]
    # two validation batches ran after step 1, while the sample of step 2 was open: not counted
    assert cb.doctor.last.stats.layer("net.0").samples == 8


class Raises(Net):
    def training_step(self, batch, i):
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, i)


def test_a_fit_that_raises_inside_a_sample_leaves_no_hook(tmp_path):
    cb = InitDoctorCallback(every=2, check_at_start=False)
    model = Raises()
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [cb], model=model, steps=4)
    assert [h["step"] for h in cb.doctor.history] == [0]
    assert_no_hooks(model)


def test_several_optimizers_each_step_counts(tmp_path):
    cb = InitDoctorCallback(every=2, check_at_start=False)
    trainer, model = fit(tmp_path, [cb], model=TwoOptimizers(), steps=4)
    assert trainer.global_step == 4
    assert [h["step"] for h in cb.doctor.history] == [0, 2]
    # each sample closes at the first optimizer's step: one forward and backward were seen
    assert cb.doctor.last.stats.layer("net.0").samples == 8
    assert_no_hooks(model)


def test_ddp_two_cpu_processes_write_from_rank_zero_with_whole_batch_statistics(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    subprocess.run([sys.executable, str(HERE / "lightning_ddp_script.py"), str(tmp_path)], env=env, check=True,
                   timeout=240, capture_output=True)
    files = [p for p in (tmp_path / "initdoctor").iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(files) == 1  # rank 0 only
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert got["ranks"] == 2
    # the same weights on the whole (global) batch in one process
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    model.load_state_dict(got["initial"])
    x = got["x"]
    with initdoctor.watch(model, every=1, warn=False) as doctor:
        model(x).sum().backward()
        want = doctor.step()
    for name in ("0", "2"):
        ref, lay = want.stats.layer(name), got["layers"][f"net.{name}"]
        assert lay["samples"] == ref.samples == 16
        assert lay["q"] == pytest.approx(ref.q, rel=1e-5) and lay["signal"] == pytest.approx(ref.signal, rel=1e-5)


def test_importing_initdoctor_imports_no_framework():
    code = ("import sys, initdoctor, initdoctor.integrations; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_example_runs_and_reports_the_saturation_once(tmp_path):
    from .test_examples import _load

    mod = _load("lightning_watch")
    with pytest.warns(initdoctor.InitDoctorWarning, match="ID301"):
        result = mod.main(steps=4, every=2, log_dir=str(tmp_path))
    assert result["samples"] == [0, 2] and "ID301" in result["start"]
    assert [t for t in events(result["run"]).Tags()["scalars"] if t.startswith("initdoctor")]
