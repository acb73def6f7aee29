"""initdoctor.watch's background worker: the same history, diagnoses and event files as a run that
does everything on the training thread; close() drains; a failure there surfaces; warnings of a
sampled step arrive by the next step(); no thread is left behind."""

from __future__ import annotations

import glob
import threading
import warnings

import pytest
import torch
from torch import nn

import initdoctor
from initdoctor import watcher
from initdoctor.watcher import InitDoctorWarning
from tests import test_watch as watch_tests

loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")


def tanh_mlp(std: float | None = None, depth: int = 4, width: int = 16) -> nn.Sequential:
    return watch_tests.tanh_mlp(depth, width, std)


def train(model: nn.Module, steps: int, doctor=None, wait: bool = True) -> list[torch.Tensor]:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if doctor is not None:
            doctor.step(wait=wait)
    return [p.detach().clone() for p in model.parameters()]


def events(log_dir) -> list[bytes]:
    """Every event of the run but its wall time, in the order written."""
    (path,) = glob.glob(f"{log_dir}/events.out.tfevents.*")
    out = []
    for e in loader.EventFileLoader(path).Load():
        e.wall_time = 0
        out.append(e.SerializeToString())
    return out


def our_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "initdoctor-watch"]


def watched_run(tmp_path, name: str, wait: bool, inline: bool = False):
    model = tanh_mlp(std=0.6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with initdoctor.watch(model, log_dir=str(tmp_path / name), every=2, images_every=2) as doctor:
            if inline:
                doctor._worker = watcher._Inline(doctor._process)
            params = train(model, 9, doctor, wait=wait)
    ours = [str(w.message) for w in caught if issubclass(w.category, InitDoctorWarning)]
    return doctor, params, ours, events(tmp_path / name)


def test_background_runs_equal_a_run_on_the_training_thread(tmp_path):
    bare = train(tanh_mlp(std=0.6), 9)
    ref, ref_params, ref_warned, ref_events = watched_run(tmp_path, "inline", wait=True, inline=True)
    assert ref_warned and len(ref.history) == 5
    for wait in (True, False):
        doctor, params, warned, evs = watched_run(tmp_path, f"wait{wait}", wait=wait)
        assert all(torch.equal(a, b) for a, b in zip(bare, params))  # training untouched
        assert all(torch.equal(a, b) for a, b in zip(ref_params, params))
        assert doctor.history == ref.history
        assert doctor.last.to_dict() == ref.last.to_dict()
        assert warned == ref_warned
        assert evs == ref_events  # scalars, plugin data, text, figures, histograms: byte for byte


def _slow_judge(monkeypatch, delay: float = 0.05):
    real = watcher.judge

    def slow(*a, **kw):
        import time

        time.sleep(delay)
        return real(*a, **kw)

    monkeypatch.setattr(watcher, "judge", slow)


def test_close_drains_every_sample_and_stops_the_thread(tmp_path, monkeypatch):
    _slow_judge(monkeypatch)
    model = tanh_mlp()
    doctor = initdoctor.watch(model, log_dir=str(tmp_path), every=1).__enter__()
    train(model, 4, doctor, wait=False)
    assert len(our_threads()) == 1  # the samples after the first went to the worker
    doctor.close()
    assert [h["step"] for h in doctor.history] == [0, 1, 2, 3]
    assert not our_threads()
    got = [e for e in events(tmp_path) if b"initdoctor.summary/errors" in e]
    assert len(got) == 4  # every sample written before the writer closed


def test_wait_brings_last_and_history_up_to_date(monkeypatch):
    _slow_judge(monkeypatch)
    model = tanh_mlp()
    with initdoctor.watch(model, every=1) as doctor:
        train(model, 3, doctor, wait=False)
        doctor.wait()
        assert [h["step"] for h in doctor.history] == [0, 1, 2]
        assert doctor.last is not None
    assert not our_threads()


def test_an_error_in_the_worker_is_raised_at_the_next_step(monkeypatch):
    calls = []
    real = watcher.judge

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("rule broke")
        return real(*a, **kw)

    monkeypatch.setattr(watcher, "judge", failing)
    model = tanh_mlp()
    doctor = initdoctor.watch(model, every=1).__enter__()
    train(model, 2, doctor, wait=False)  # sample 1 fails in the background
    with pytest.raises(ValueError, match="rule broke"):
        train(model, 1, doctor, wait=False)
    doctor.close()  # reported once, not again
    assert not our_threads()


def test_an_error_in_writing_is_raised_by_close(tmp_path, monkeypatch):
    from initdoctor.report.tensorboard import RunWriter

    def broken(self, diag, step):
        raise OSError("disk full")

    monkeypatch.setattr(RunWriter, "write", broken)
    model = tanh_mlp()
    doctor = initdoctor.watch(model, log_dir=str(tmp_path), every=1).__enter__()
    with pytest.raises(OSError, match="disk full"):
        train(model, 1, doctor)  # written in the background; its failure comes back at close
        doctor.close()
    assert not our_threads()


def test_a_training_error_is_not_masked_by_a_worker_error(monkeypatch):
    monkeypatch.setattr(watcher, "judge", lambda *a, **kw: (_ for _ in ()).throw(ValueError("rule broke")))
    model = tanh_mlp()
    with pytest.raises(KeyError):
        with initdoctor.watch(model, every=1) as doctor:
            train(model, 1, doctor, wait=False)
            raise KeyError("the user's own")
    assert not our_threads()


def test_warning_of_a_sampled_step_arrives_at_the_next_step(monkeypatch):
    _slow_judge(monkeypatch)
    model = tanh_mlp(std=3.0)  # saturates at once: ID301 at step 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with initdoctor.watch(model, every=2) as doctor:
            train(model, 1, doctor, wait=False)
            assert not [w for w in caught if issubclass(w.category, InitDoctorWarning)]
            train(model, 1, doctor, wait=False)  # step 1: not sampled, but step 0's findings are due
            ours = [w for w in caught if issubclass(w.category, InitDoctorWarning)]
            assert any("step 0: ID301" in str(w.message) for w in ours)
            assert all(w.filename == __file__ for w in ours)  # pointed at the caller of step()


def test_no_thread_without_a_writer_and_waiting():
    model = tanh_mlp()
    with initdoctor.watch(model, every=1) as doctor:
        train(model, 3, doctor)  # step(wait=True) and nothing to write: nothing for a thread to do
        assert not our_threads()


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                                                    activation="gelu", norm_first=True), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.enc(self.emb(x))[:, 0])


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


_BUILD_MODELS = {
    "mlp-sigmoid-tanh": (lambda: nn.Sequential(nn.Linear(16, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Tanh(),
                                               nn.Linear(32, 4)), lambda: torch.randn(64, 16)),
    "cnn-bn-relu": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                          nn.Flatten(), nn.Linear(8, 4)), lambda: torch.randn(16, 3, 8, 8)),
    "pre-norm-transformer": (_Encoder, lambda: torch.randint(0, 50, (8, 12))),
    "lstm": (_Recurrent, lambda: torch.randn(8, 5, 8)),
}


@pytest.mark.parametrize("name", sorted(_BUILD_MODELS))
def test_work_after_the_host_copy_makes_no_call_mkl_runs_on_threads(name):
    """What `step(wait=False)` hands the worker (statistics from the host copy, rules) calls no BLAS
    routine and no vectorized math on tensors: MKL would run them on a thread team of its own in
    the worker thread, whose spin-waits take the cores from training (stats._NO_BLAS). On models
    that take every path of the build: saturating and dying nonlinearities, convolutions' per-unit
    sums, attention, stream norms, recurrent gates."""
    from torch.profiler import ProfilerActivity, profile

    from initdoctor.diagnosis import judge
    from initdoctor.probe import Recorder

    torch.manual_seed(0)
    build, batch = _BUILD_MODELS[name]
    model = build()
    with Recorder(model) as rec:
        out = model(batch())
        nn.functional.cross_entropy(out, torch.randint(0, 4, out.shape[:1])).backward()
    host = rec.host_copy({id(p): p.grad for p in model.parameters()})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stats = rec.build(host, None, True, False)
        judge(stats, None, None)
    ops = {e.name for e in prof.events()}
    kinds = {a.kind for a in stats.activations}
    assert {"mlp-sigmoid-tanh": {"sigmoid", "tanh"}, "cnn-bn-relu": {"relu"}, "pre-norm-transformer": {"gelu"},
            "lstm": {"sigmoid", "tanh"}}[name] <= kinds, kinds
    if name == "pre-norm-transformer":  # the stream norms' scale was built too
        assert any(lay.stream_q is not None for lay in stats.layers)
    if name == "lstm":
        assert any(a.gate for a in stats.activations)
    assert "aten::sum" in ops  # the profiler sees the build's operations
    blas = {"aten::dot", "aten::vdot", "aten::mv", "aten::mm", "aten::addmm", "aten::addmv", "aten::bmm",
            "aten::baddbmm", "aten::matmul", "aten::tensordot"}
    vector_math = {"aten::sqrt", "aten::exp", "aten::log", "aten::log10", "aten::log1p", "aten::expm1",
                   "aten::tanh", "aten::erf", "aten::erfc", "aten::sin", "aten::cos", "aten::tan"}
    assert not ops & (blas | vector_math), sorted(ops & (blas | vector_math))
