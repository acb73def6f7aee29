"""Keeping watch over a training run.

    with initdoctor.watch(model, log_dir="runs/exp1", every=100) as doctor:
        for batch in loader:
            ...; loss.backward(); optimizer.step()
            doctor.step()

Hooks are attached only for the steps that are sampled (0, every, 2*every, ...): the other steps run
the bare model. A sampled step observes the user's own forward and backward, reduces on the device,
and synchronizes once when `step()` closes it. The same rules as `check` run on what it saw; a
finding that appears, or gets worse, is reported once through `warnings` and `logging`.

What must happen on the training thread happens there: the hooks' reductions, the reductions over
weights and gradients and the one host copy (`Recorder.host_copy`, before the optimizer changes
them), the collective under DDP (every rank in the same order). The rest of a sample (TensorBoard
writing and figures; with `step(wait=False)` also the statistics built from the host copy, the rules
and the warnings' bookkeeping) runs on one background thread, in order, through a bounded queue.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import distributed
from .accumulators import reads_weights
from .codes import SEVERITY_RANK
from .compiled import CompiledRecorder, compiled_parts
from .diagnosis import Diagnosis, judge
from .probe import Recorder, Structure
from .rules import Finding
from .stats import ModelStats
from .vocab import HISTORY_FIELDS

log = logging.getLogger("initdoctor")
log.addHandler(logging.NullHandler())  # a library logs; the application decides where it goes

# Samples in flight at most: `put` blocks beyond it, so a worker slower than training (figures drawn
# every sample) holds training back instead of piling up statistics in memory.
QUEUE_SIZE = 2
HISTOGRAM_VALUES = 4096  # values kept per layer for histograms (weights, outputs, weight gradients)


class InitDoctorWarning(UserWarning):
    """A finding that appeared, or got worse, while training."""


@dataclass
class _Sample:
    """One sampled step on its way from the training thread to the worker."""

    step: int
    index: int  # the sample's number (0 = the first)
    build: Callable[[], ModelStats]  # the statistics: built already, or built from the host copy
    target: str
    sources: list[str]
    writer_rank: bool
    images: bool
    grads: dict | None  # layer -> a slice of its weight gradient, taken on the training thread
    judged: threading.Event = field(default_factory=threading.Event)  # findings decided (or failed)
    diag: Diagnosis | None = None
    history: list | None = None  # the history up to this sample, for its figure


class _Worker:
    """One background thread that runs `job` on each item, in order; the first exception is kept
    for the training thread to raise (`take_error`), and the thread goes at `stop()`."""

    def __init__(self, job: Callable[[Any], None], maxsize: int = QUEUE_SIZE) -> None:
        self._job = job
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, item: Any) -> None:
        if self._thread is None:
            # daemon: a watch never closed must not keep the interpreter from exiting
            self._thread = threading.Thread(target=self._run, name="initdoctor-watch", daemon=True)
            self._thread.start()
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._job(item)
            except BaseException as e:  # kept for the training thread: an observer's failure is never lost
                if self._error is None:
                    self._error = e
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Wait until every item submitted so far is done."""
        if self._thread is not None:
            self._queue.join()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def take_error(self) -> BaseException | None:
        e, self._error = self._error, None
        return e


class _Inline:
    """`_Worker`'s stand-in that runs each job at once on the calling thread (every job on the training
    thread, as before the worker): what the tests and the benchmark compare the worker against."""

    def __init__(self, job: Callable[[Any], None]) -> None:
        self._job = job
        self._thread = None

    def submit(self, item: Any) -> None:
        self._job(item)

    def drain(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def take_error(self) -> None:
        return None


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
        self._structure: Structure | None = None
        self.structure_reads = 0  # how often the model's modules were read (once, unless replaced)
        self._tb: Any = None  # report.tensorboard.RunWriter, made on the first write
        self._lock = threading.Lock()  # _warned and _pending: decided on the worker, read here
        self._pending: list[str] = []  # warnings decided, to be issued on the training thread
        self._inflight: list[_Sample] = []  # submitted samples whose findings are not yet delivered
        self._worker = _Worker(self._process)

    # -- context --
    def __enter__(self) -> Watch:
        if self._log_dir is not None and self._is_writer_rank():
            from .report.tensorboard import open_writer

            self.writer = open_writer(self._log_dir)
            self._own_writer = True
        if self.steps % self.every == 0:
            self._arm()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # a failure of the training loop itself goes first: a worker's error is then only logged
        self._close(raise_errors=exc_type is None)

    def close(self) -> None:
        """Finish every sample in flight (statistics, warnings, writing), draw the final figures,
        stop the background thread and close (or flush) the writer. Raises what the worker raised."""
        self._close(raise_errors=True)

    def _close(self, raise_errors: bool) -> None:
        self._disarm()
        error = None
        try:
            self._worker.drain()
            error = self._settle()
            if (error is None and self.writer is not None and self.last is not None
                    and self._images_at != self.history[-1]["step"]):
                self._write_images(self.last, self.history[-1]["step"], self.history, None)
        finally:
            self._worker.stop()
            if self._own_writer and self.writer is not None:
                self.writer.close()
                self.writer = None
                self._own_writer = False
            elif self.writer is not None:
                self.writer.flush()
        if error is not None:
            if raise_errors:
                raise error
            self.log.error("initdoctor: a sample failed in the background: %r", error)

    def wait(self) -> None:
        """Wait for every sample in flight: `last`, `history`, warnings and TensorBoard are then up to date."""
        self._worker.drain()
        error = self._settle()
        if error is not None:
            raise error

    # -- the loop --
    def step(self, wait: bool = True) -> Diagnosis | None:
        """Close the current training step; returns the diagnosis when this step was sampled.

        With `wait=False` a sampled step returns None at once: its statistics are built and judged
        in the background, and its warnings are issued by the next `step()` (or `close()`); `last`
        and `history` follow then.
        """
        # findings of the samples before this step: decided by now (they had a whole step's time)
        error = self._settle()
        diag = None
        if self._rec is not None:
            diag = self._sample(wait)
        self.steps += 1
        if self.steps % self.every == 0:
            self._arm()
        if error is not None:
            raise error
        return diag

    @property
    def sampling(self) -> bool:
        """Whether hooks are attached for the step in progress."""
        return self._rec is not None

    def _arm(self) -> None:
        if self._rec is not None and self.compiled is None and not self._structure.matches(self.model):
            self._disarm()  # kept from the last step on modules or parameters since replaced
        if self._rec is None:
            # values for histograms: only where something will draw them; under DDP on every rank
            # alike, since the ranks' buffers must have one layout (rank 0's values are the ones kept)
            draws = self.writer is not None or distributed.active(self.group)
            keep = HISTOGRAM_VALUES if self.histograms and draws else 0
            if self.compiled is None:
                if self._structure is None or not self._structure.matches(self.model):
                    self._structure = Structure(self.model)  # read again when modules or parameters change
                    self.structure_reads += 1
                rec = Recorder(self.model, keep_values=keep, structure=self._structure)
            else:
                rec = CompiledRecorder(self.compiled, self.model, keep_values=keep)
            rec.__enter__()
            self._rec = rec

    def _disarm(self) -> None:
        if self._rec is not None:
            rec, self._rec = self._rec, None
            rec.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Passes run inside are not part of the step (a framework's own `check` before training):
        hooks off, and back on afterwards when the step in progress is a sampled one."""
        self._disarm()
        try:
            yield
        finally:
            if self.steps % self.every == 0:
                self._arm()

    def _is_writer_rank(self) -> bool:
        return distributed.rank(self.group) == 0

    def _sample(self, wait: bool) -> Diagnosis | None:
        if self.compiled is None and (self.steps + 1) % self.every == 0:
            rec = self._rec.handoff()  # the next step is sampled too: its hooks stay on
        else:
            rec = self._rec
            self._disarm()
        params = {}
        for p in self.model.parameters():
            if p.grad is not None:
                params[id(p)] = p.grad
        # the collective runs here, on every rank in the same order
        reduce = distributed.reducer(self.group) if distributed.active(self.group) else None
        symmetry = self.sampled == 0
        if self.compiled is not None:
            rec.replay()  # the eager replay of a compiled step, before its gradients are counted
            stats = rec.finish(params or None, backward=bool(rec.acc.grad), reduce=reduce, symmetry=symmetry)
            build = _built(stats)
        else:
            host = rec.host_copy(params or None, reduce)
            backward = bool(rec.acc.grad)
            if wait or symmetry or reads_weights(host):
                # the symmetry checks and non-finite counts read weights and gradients: built now
                stats = rec.build(host, params or None, backward, symmetry)
                build = _built(stats)
            else:
                def build(rec=rec, host=host, backward=backward) -> ModelStats:
                    return rec.build(host, None, backward, False)
        writer_rank = self._is_writer_rank()
        images = self.writer is not None and writer_rank and (
            self.sampled == 0 or (self.images_every is not None and self.sampled % self.images_every == 0))
        grads = self._gradient_slices() if images and self.histograms else None
        sample = _Sample(self.steps, self.sampled, build, type(self.model).__name__,
                         list(getattr(rec, "sources", [])), writer_rank, images, grads)
        self.sampled += 1
        self._inflight.append(sample)
        if wait:
            self._judge(sample)
            self._deliver()
            if sample.writer_rank and self.writer is not None:
                self._worker.submit(sample)
            return sample.diag
        self._worker.submit(sample)
        return None

    def _gradient_slices(self) -> dict:
        # the weight gradients of the sampled step, beside the weights in the histograms: copied
        # now, since the next step's backward overwrites `.grad`
        out = {}
        for name, m in self.model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, nn.Parameter) and w.grad is not None:
                out[name] = w.grad.detach().reshape(-1)[:HISTOGRAM_VALUES].clone()
        return out

    # -- the worker's side (or the training thread's, for step(wait=True)) --
    def _process(self, sample: _Sample) -> None:
        if not sample.judged.is_set():
            self._judge(sample)
        diag = sample.diag
        if sample.writer_rank and self.writer is not None and diag is not None:
            self._run_writer().write(diag, sample.step)
            if sample.images:
                self._write_images(diag, sample.step, sample.history, sample.grads)
            self.writer.flush()

    def _judge(self, sample: _Sample) -> None:
        try:
            stats = sample.build()
            findings, found = judge(stats, self.select, self.ignore)
            diag = Diagnosis(stats, findings, [], target=sample.target, trends=found, sources=sample.sources)
            sample.diag = diag
            self.last = diag
            self.history.append(_record(sample.step, stats))
            if sample.images:
                sample.history = list(self.history)  # the figure shows the history up to this sample
            if sample.writer_rank:
                texts = self._decide(findings, sample.step)
                with self._lock:
                    self._pending += texts
        finally:
            sample.judged.set()  # a failure too: the training thread must not wait for it forever

    def _settle(self) -> BaseException | None:
        """Wait for the findings of the samples in flight, issue their warnings, and return (for
        the caller to raise) the worker's first error since the last call."""
        for sample in self._inflight:
            sample.judged.wait()
        self._inflight.clear()
        self._deliver()
        return self._worker.take_error()

    def _decide(self, findings: list[Finding], step: int) -> list[str]:
        """The messages of findings that appeared or got worse; remembers them as reported."""
        texts = []
        with self._lock:
            for f in findings:
                if not f.fired:
                    continue
                rank = SEVERITY_RANK[f.severity]
                if self._warned.get(f.code, -1) >= rank:
                    continue
                worse = f.code in self._warned
                self._warned[f.code] = rank
                texts.append(f"initdoctor step {step}: {f.code} {f.name} ({f.severity}"
                             f"{', worse than before' if worse else ''}): {f.message}")
        return texts

    def _deliver(self, stacklevel: int = 4) -> None:
        # stacklevel 4: the user's `doctor.step()` line (through step -> _settle or _sample).
        # On the training thread: `warnings` filters and `catch_warnings` are the caller's
        with self._lock:
            texts, self._pending = self._pending, []
        for text in texts:
            self.log.warning(text)
            if self.warn:
                warnings.warn(text, InitDoctorWarning, stacklevel=stacklevel)

    def _report(self, findings: list[Finding]) -> None:
        """Report findings now, on the calling thread (the callbacks' check on the first batch)."""
        texts = self._decide(findings, self.steps)
        with self._lock:
            self._pending += texts
        self._deliver(stacklevel=5)  # as before: the caller of the callback that checks

    def _run_writer(self) -> Any:
        if self._tb is None:
            from .report.tensorboard import RunWriter

            self._tb = RunWriter(self.writer, source="watch")
        return self._tb

    def _write_images(self, diag: Diagnosis, step: int, history: list | None, grads: dict | None) -> None:
        self._run_writer().figures(diag, step, history=history, histograms=self.histograms, grads=grads)
        self._images_at = step
        self.writer.flush()


def _built(stats: ModelStats) -> Callable[[], ModelStats]:
    return lambda: stats


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

    TensorBoard writing runs on a background thread; `doctor.step(wait=False)` also moves the
    statistics, rules and findings there (the step's warnings then come at the next `step()`), and
    `close()` waits for all of it. See docs/python-api.md, "What runs where".

    Example:
        >>> with initdoctor.watch(model, log_dir="runs/exp1", every=100) as doctor:
        ...     for x, y in loader:
        ...         opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        ...         doctor.step()
    """
    return Watch(model, log_dir=log_dir, writer=writer, every=every, **kw)
