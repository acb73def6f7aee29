"""Keeping watch over a training run.

    with initdoctor.watch(model, log_dir="runs/exp1", every=100) as doctor:
        for batch in loader:
            ...; loss.backward(); optimizer.step()
            doctor.step()

Hooks are attached only for the steps that are sampled (0, every, 2*every, ...): the other steps run
the bare model. A sampled step observes the user's own forward and backward, reduces on the device,
and synchronizes once when `step()` closes it. The same rules as `check` run on what it saw; a
finding that appears, or gets worse, is reported once through `warnings` and `logging`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from torch import nn

from . import distributed
from .codes import SEVERITY_RANK
from .compiled import CompiledRecorder, compiled_parts
from .diagnosis import Diagnosis, judge
from .probe import Recorder
from .rules import Finding
from .stats import ModelStats
from .vocab import HISTORY_FIELDS

log = logging.getLogger("initdoctor")
log.addHandler(logging.NullHandler())  # a library logs; the application decides where it goes



class InitDoctorWarning(UserWarning):
    """A finding that appeared, or got worse, while training."""


class Watch:
    """Samples statistics every `every` steps; see `initdoctor.watch`."""

    def __init__(self, model: nn.Module, log_dir: str | None = None, writer: Any = None, every: int = 100, *,
                 select: list[str] | None = None, ignore: list[str] | None = None, histograms: bool | None = None,
                 images_every: int | None = None, warn: bool = True, group: Any = None, start: int = 0,
                 logger: logging.Logger | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() needs an nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: give a positive number of steps between samples")
        if log_dir is not None and writer is not None:
            raise ValueError("give log_dir or writer, not both")
        # a torch.compile'd model: hooks stay off its graph; sampled steps are replayed eagerly (compiled.py)
        self.model, self.compiled = compiled_parts(model)
        self.every = every
        self.select, self.ignore = select, ignore
        # Drawing a figure costs a few hundred steps of a small model: by default only at the first
        # sample and when the watch closes (the latest state), or every `images_every` samples.
        self.images_every = None if images_every is None else max(int(images_every), 1)
        self._images_at: int | None = None  # the step whose images were written last
        self.warn = warn
        self.log = logger or log  # a framework's own logger when a callback drives the watch
        self.group = group
        self._log_dir = log_dir
        self.writer = writer
        self._own_writer = False
        n_params = sum(p.numel() for p in model.parameters())
        # Histograms cost a pass over every weight: on by default for small models only.
        self.histograms = n_params <= 5_000_000 if histograms is None else histograms
        self.steps = int(start)  # completed steps (a resumed run starts at its global step)
        self.sampled = 0  # completed sampled steps
        self.history: list[dict] = []
        self.last: Diagnosis | None = None
        self._warned: dict[str, int] = {}
        self._rec: Recorder | None = None
        self._tb: Any = None  # report.tensorboard.RunWriter, made on the first write

    # -- context --
    def __enter__(self) -> Watch:
        if self._log_dir is not None and self._is_writer_rank():
            from .report.tensorboard import open_writer

            self.writer = open_writer(self._log_dir)
            self._own_writer = True
        if self.steps % self.every == 0:
            self._arm()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._disarm()
        if self.writer is not None and self.last is not None and self._images_at != self.history[-1]["step"]:
            self._write_images(self.last, self.history[-1]["step"])
        if self._own_writer and self.writer is not None:
            self.writer.close()
            self.writer = None
            self._own_writer = False
        elif self.writer is not None:
            self.writer.flush()

    # -- the loop --
    def step(self) -> Diagnosis | None:
        """Close the current training step; returns the diagnosis when this step was sampled."""
        diag = None
        if self._rec is not None:
            diag = self._sample()
        self.steps += 1
        if self.steps % self.every == 0:
            self._arm()
        return diag

    @property
    def sampling(self) -> bool:
        """Whether hooks are attached for the step in progress."""
        return self._rec is not None

    def _arm(self) -> None:
        if self._rec is None:
            keep = 4096 if self.histograms else 0
            rec = (Recorder(self.model, keep_values=keep) if self.compiled is None
                   else CompiledRecorder(self.compiled, self.model, keep_values=keep))
            rec.__enter__()
            self._rec = rec

    def _disarm(self) -> None:
        if self._rec is not None:
            rec, self._rec = self._rec, None
            rec.close()

    def _is_writer_rank(self) -> bool:
        return distributed.rank(self.group) == 0

    def _sample(self) -> Diagnosis:
        rec = self._rec
        self._disarm()
        params = {}
        for p in self.model.parameters():
            if p.grad is not None:
                params[id(p)] = p.grad
        reduce = distributed.reducer(self.group) if distributed.active(self.group) else None
        if self.compiled is not None:
            rec.replay()  # the eager replay of a compiled step, before its gradients are counted
        stats = rec.finish(params or None, backward=bool(rec.acc.grad), reduce=reduce, symmetry=self.sampled == 0)
        findings, found = judge(stats, self.select, self.ignore)
        diag = Diagnosis(stats, findings, [], target=type(self.model).__name__, trends=found,
                         sources=list(getattr(rec, "sources", [])))
        self.last = diag
        self.history.append(_record(self.steps, stats))
        if self._is_writer_rank():
            self._report(findings)
            if self.writer is not None:
                self._write(diag)
        self.sampled += 1
        return diag

    def _report(self, findings: list[Finding]) -> None:
        for f in findings:
            if not f.fired:
                continue
            rank = SEVERITY_RANK[f.severity]
            if self._warned.get(f.code, -1) >= rank:
                continue
            worse = f.code in self._warned
            self._warned[f.code] = rank
            text = (f"initdoctor step {self.steps}: {f.code} {f.name} ({f.severity}"
                    f"{', worse than before' if worse else ''}): {f.message}")
            self.log.warning(text)
            if self.warn:
                warnings.warn(text, InitDoctorWarning, stacklevel=4)

    def _run_writer(self) -> Any:
        if self._tb is None:
            from .report.tensorboard import RunWriter

            self._tb = RunWriter(self.writer, source="watch")
        return self._tb

    def _write(self, diag: Diagnosis) -> None:
        images = self.sampled == 0 or (self.images_every is not None and self.sampled % self.images_every == 0)
        self._run_writer().write(diag, self.steps)
        if images:
            self._write_images(diag, self.steps)
        self.writer.flush()

    def _write_images(self, diag: Diagnosis, step: int) -> None:
        grads = None
        # the weight gradients of the sampled step (still in .grad while it closes), beside the weights
        if self.histograms and step == self.steps:
            names = {lay.name for lay in diag.stats.ran()}
            grads = {name: getattr(m, "weight", None).grad for name, m in self.model.named_modules()
                     if name in names and isinstance(getattr(m, "weight", None), nn.Parameter)}
        self._run_writer().figures(diag, step, history=self.history, histograms=self.histograms, grads=grads)
        self._images_at = step
        self.writer.flush()


def _record(step: int, stats: ModelStats) -> dict:
    layers = {}
    for lay in stats.ran():
        layers[lay.name] = {k: getattr(lay, k) for k in HISTORY_FIELDS}
    return {"step": step, "layers": layers}


def watch(model: nn.Module, log_dir: str | None = None, writer: Any = None, every: int = 100, **kw) -> Watch:
    """Keep watch over `model` in a training loop; call `.step()` once per training step.

    Args:
        model: the module being trained.
        log_dir: write TensorBoard event files here (rank 0 only), or
        writer: an existing `SummaryWriter` to write into.
        every: sample one step in this many (steps 0, every, 2*every, ...).
        select, ignore: code prefixes, as on the command line.
        histograms: weight/activation histograms (default: models up to 5M parameters).
        images_every: also write the depth-profile and history images (and histograms) every this many
            samples; by default they are written at the first sample and when the watch closes.
        warn: issue a Python warning (besides logging) when a finding appears or gets worse.
        group: the torch.distributed process group to reduce over (default: the world).
        start: the steps already taken: a resumed run samples at the multiples of `every`, as if it
            had never stopped.
        logger: log findings here instead of the `"initdoctor"` logger.

    Example:
        >>> with initdoctor.watch(model, log_dir="runs/exp1", every=100) as doctor:
        ...     for x, y in loader:
        ...         opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        ...         doctor.step()
    """
    return Watch(model, log_dir=log_dir, writer=writer, every=every, **kw)
