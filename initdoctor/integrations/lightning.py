"""`InitDoctorCallback` for PyTorch Lightning: `initdoctor.watch` without writing the glue.

    from initdoctor.integrations.lightning import InitDoctorCallback
    trainer = Trainer(callbacks=[InitDoctorCallback(every=100)], ...)

A sampled step opens when the previous optimizer step closes and closes in `on_before_optimizer_step`:
after the backward (of every accumulated micro-batch), before the weights change. With several
optimizers each optimizer step is one step, as Lightning's `global_step` counts them; a fit resumed
from a checkpoint samples on the same grid (multiples of `every`). Validation forwards are never part
of a sample. Statistics go to the Trainer's TensorBoard logger (same run directory as the loss) or,
without one, to `log_dir` (default `<default_root_dir>/initdoctor`). Under DDP every rank observes
its part of the batch and the statistics are combined (initdoctor/distributed.py); rank 0 alone
writes and warns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the standalone package: its Trainer accepts only its own Callback class
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers import TensorBoardLogger

from ..diagnosis import Diagnosis
from ..watcher import Watch
from ._common import check_at_start

log = logging.getLogger(f"{pl.__name__}.callbacks.initdoctor")  # Lightning's own logging tree


class InitDoctorCallback(Callback):
    """Keep watch over a Lightning fit: sample every `every` optimizer steps, warn, write to TensorBoard.

    Args:
        every: sample one optimizer step in this many (global steps 0, every, 2*every, ...).
        log_dir: write here instead of the Trainer's TensorBoard logger.
        check_at_start: run `initdoctor.check` on the first batch before training, log it, write it
            as the run `<run dir>/initdoctor_check/before`.
        module: the attribute path of the submodule to watch (default: the LightningModule; its
            `forward` should be what `training_step` calls).
        example_input: batch -> the model's input, for the check (default: a tensor batch as is, the
            first item of a tuple or list).
        loss_fn: `loss_fn(output, batch)` for the check's backward pass (default: a random projection).
        **watch_kw: passed to `initdoctor.watch` (select, ignore, histograms, images_every, warn).
    """

    def __init__(self, every: int = 100, log_dir: str | None = None, *, check_at_start: bool = True,
                 module: str | None = None, example_input: Callable[[Any], Any] | None = None,
                 loss_fn: Callable | None = None, **watch_kw: Any) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: give a positive number of steps between samples")
        self.every, self.log_dir = every, log_dir
        self.check_at_start, self.module = check_at_start, module
        self.example_input, self.loss_fn = example_input, loss_fn
        self.watch_kw = watch_kw
        self.doctor: Watch | None = None  # the watch of the latest fit
        self.check: Diagnosis | None = None
        self._check_pending = False
        self.run_dir: str | None = None  # where the latest run writes (rank 0)
        self._paused = False
        self._open = False  # the watch is kept after the fit, for its history
        self._warned: dict[str, int] = {}  # from a checkpoint: findings already reported, not to repeat

    # -- fit --
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module if self.module is None else pl_module.get_submodule(self.module)
        writer, log_dir = None, self.log_dir
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if log_dir is None and tb is not None:
            self.run_dir = tb.log_dir
            writer = tb.experiment if trainer.global_rank == 0 else None
        else:
            log_dir = log_dir or os.path.join(trainer.default_root_dir, "initdoctor")
            self.run_dir = log_dir
        self.doctor = Watch(model, log_dir=log_dir, writer=writer, every=self.every, start=trainer.global_step,
                            logger=log, **self.watch_kw)
        self.doctor._warned.update(self._warned)
        self.doctor.__enter__()
        self._open = True
        self._check_pending = self.check_at_start

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._check_pending and self._open:
            self._check_pending = False
            # the check's own passes must not enter the step the watch may be recording
            with self.doctor.paused():
                self.check = check_at_start(self.doctor.model, batch, self.example_input, self.loss_fn, self.doctor,
                                            self.run_dir, trainer.global_step, log)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._open:
            self.doctor.step()

    # -- validation inside fit: its forwards are no training step --
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._open and self.doctor.sampling:
            self.doctor._disarm()
            self._paused = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._paused and self._open:
            self._paused = False
            self.doctor._arm()

    # -- checkpoints: a resumed fit does not warn again about what was already reported --
    def state_dict(self) -> dict[str, Any]:
        return {"warned": dict(self.doctor._warned if self.doctor is not None else self._warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = dict(state_dict.get("warned", {}))

    # -- the end, however it comes --
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self.doctor.close()
