"""`InitDoctorCallback` for the Hugging Face `Trainer`: `initdoctor.watch` without writing the glue.

    from initdoctor.integrations.transformers import InitDoctorCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[InitDoctorCallback(every=100)])

A sampled step opens in `on_step_begin` (before the first forward of its accumulated micro-batches)
and closes in `on_pre_optimizer_step` (after their backward, before the weights change), so the
evaluation and logging that the Trainer runs after `on_step_end` are never part of a sample. Models
whose forward takes keyword arguments and returns a `ModelOutput` are observed like any other.
Statistics go to the run directory of the Trainer's TensorBoard reporting (`report_to="tensorboard"`:
`logging_dir` where the Trainer has one, else `$TENSORBOARD_LOGGING_DIR`, else the newest
`<output_dir>/runs/*` that its TensorBoard callback has just opened), to `log_dir` when given, or to
`<output_dir>/initdoctor`. Only the main process writes and warns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from ..diagnosis import Diagnosis
from ..watcher import Watch
from ._common import check_at_start

log = logging.getLogger("transformers.trainer.initdoctor")  # the Trainer's own logging tree


def _reports_to_tensorboard(args: Any) -> bool:
    report = args.report_to
    report = [report] if isinstance(report, str) else list(report or [])
    return "tensorboard" in report or "all" in report


def _newest_run(root: str) -> str | None:
    if not os.path.isdir(root):
        return None
    runs = [os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    return max(runs, key=os.path.getmtime) if runs else None


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)({k: _to(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


class InitDoctorCallback(TrainerCallback):
    """Keep watch over a `Trainer` run: sample every `every` optimizer steps, warn, write to TensorBoard.

    Args:
        every: sample one optimizer step in this many (global steps 0, every, 2*every, ...).
        log_dir: write here instead of the Trainer's TensorBoard run directory.
        check_at_start: run `initdoctor.check` on the first training batch before training, log it,
            and write it as the run `<run dir>/initdoctor_check/before`.
        example_input: batch -> the model's input, for the check (default: a dict batch is passed as
            keyword arguments, `model(**batch)`, as the Trainer does).
        loss_fn: `loss_fn(output, batch)` for the check's backward pass (default: a random projection
            of every output, the model's own loss included).
        **watch_kw: passed to `initdoctor.watch` (select, ignore, histograms, images_every, warn).
    """

    def __init__(self, every: int = 100, log_dir: str | None = None, *, check_at_start: bool = True,
                 example_input: Callable[[Any], Any] | None = None, loss_fn: Callable | None = None,
                 **watch_kw: Any) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: give a positive number of steps between samples")
        self.every, self.log_dir = every, log_dir
        self.check_at_start = check_at_start
        self.example_input, self.loss_fn = example_input, loss_fn
        self.watch_kw = watch_kw
        self.doctor: Watch | None = None  # the watch of the latest run, kept for its history
        self.check: Diagnosis | None = None
        self._model = None
        self._loader = None
        self.run_dir: str | None = None  # where the latest run writes (rank 0)
        self._open = False

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._model, self._loader = model, train_dataloader
        if self.log_dir is not None:
            self.run_dir = self.log_dir
        elif _reports_to_tensorboard(args):
            # the Trainer's TensorBoard callback runs before user callbacks and has opened its run
            self.run_dir = (getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
                             or _newest_run(os.path.join(args.output_dir, "runs")))
        if self.run_dir is None:
            self.run_dir = os.path.join(args.output_dir, "initdoctor")

    def on_step_begin(self, args, state, control, **kwargs):
        if not self._open and self._model is not None:
            # opened here, not in on_train_begin: a resumed run's global step is known by now
            self.doctor = Watch(self._model, log_dir=self.run_dir, every=self.every, start=state.global_step,
                                logger=log, **self.watch_kw)
            self.doctor.__enter__()  # arms the first step when it is on the grid
            self._open = True
            if self.check_at_start:
                self._check(state)
        elif self._open and not self.doctor.sampling and self.doctor.steps % self.every == 0:
            self.doctor._arm()

    def _check(self, state) -> None:
        batch = self._first_batch()
        if batch is None:
            return
        with self.doctor.paused():  # the check's passes are no part of the step
            self.check = check_at_start(self.doctor.model, batch, self.example_input, self.loss_fn, self.doctor,
                                        self.run_dir, state.global_step, log)

    def _first_batch(self) -> Any:
        if not isinstance(self._loader, DataLoader):
            return None
        # DataLoader's own iteration, under a forked RNG: not the accelerate wrapper's, whose state
        # (epoch, gradient synchronization) belongs to the Trainer's loop
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(DataLoader.__iter__(self._loader)), None)
        device = next((p.device for p in self._model.parameters()), torch.device("cpu"))
        return _to(batch, device)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._open:
            self.doctor.step()

    def on_step_end(self, args, state, control, **kwargs):
        # evaluation and logging follow this event: the next sample opens in on_step_begin instead
        if self._open and self.doctor.sampling:
            self.doctor._disarm()

    def on_train_end(self, args, state, control, **kwargs):
        if self._open:
            self._open = False
            self.doctor.close()
