"""Training-step time under `initdoctor.watch` and the monitors people use instead.

    python benchmarks/watch_overhead.py            # print the tables
    python benchmarks/watch_overhead.py --write    # ... and update docs/performance.md

Each monitor trains its own twin of the model (a deep copy, same batches, same optimizer), and the
twins take their steps interleaved (A B C ... C A B ...), so load from other processes falls on all of
them alike. A monitor that costs the same every step is compared over windows of 100 of its steps
(every=100 then holds exactly one sampled step per window) with the no-monitor twin over the same
steps: the median of these paired ratios is the "measured" figure. Monitors too slow to run on every
step (`every=1`, histograms every step) step once every few rounds, in windows of 10 of their steps,
against the no-monitor steps of the same span. The verdict uses an estimate from medians of CPU time
instead (an observed step's extra over an unobserved one, spread over the period), which preemption by
other processes disturbs far less than means of wall-clock time. With a log_dir, `watch` draws its
figures (and histograms) only at the first sample and when it closes, by default: the first observed
step and `close()` are timed on their own and reported as one-off costs. One torch thread throughout.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from common import machine, median, quartiles, setup_torch, table, verdict, write_section
from torch import nn
from torch.nn import functional as F

import initdoctor
from initdoctor.watcher import InitDoctorWarning

TARGET = 0.01  # watch(every=100) within 1% of no monitor (DESIGN.md section 5)
LONG_RUN = 100_000  # steps over which the one-off costs are also spread, for scale
WINDOW = 100  # steps per window for monitors that run every round
SPARSE_WINDOW = 10  # steps per window for monitors that run every few rounds

# --- models: small enough that hundreds of steps take seconds on one CPU thread ---------------


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 500, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass
class Task:
    name: str
    describe: str
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable


TASKS = [
    Task("MLP", "784-256-256-10, ReLU, batch 128", mlp,
         lambda: (torch.randn(128, 784), torch.randint(0, 10, (128,))), F.cross_entropy),
    Task("CNN", "2 conv+BN+ReLU (16, 32 ch), 16x16 RGB, batch 16", cnn,
         lambda: (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))), F.cross_entropy),
    Task("Transformer", "2-layer encoder, d=64, 4 heads, 32 tokens, batch 8", TinyTransformer,
         lambda: (torch.randint(0, 500, (8, 32)), torch.randint(0, 500, (8, 32))), seq_loss),
]

# --- monitors ------------------------------------------------------------------------------------


class Monitor:
    """What a monitor does around one training step; `sampled()` says whether this step is observed."""

    period = 0  # steps between observed steps; 0: no such notion

    def sampled(self, step: int) -> bool:
        return False

    def after(self, model: nn.Module, step: int, loss: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class Watch(Monitor):
    def __init__(self, model: nn.Module, every: int, log_dir: str | None, **kw: Any) -> None:
        self.period = every
        self.doctor = initdoctor.watch(model, log_dir=log_dir, every=every, **kw).__enter__()

    def sampled(self, step: int) -> bool:
        return self.doctor.sampling

    def after(self, model, step, loss):
        self.doctor.step()

    def close(self):
        self.doctor.close()


class HandHooks(Monitor):
    """What people write by hand: a forward hook on every module logging its output's std."""

    period = 1

    def __init__(self, model: nn.Module) -> None:
        self.stds: list[float] = []

        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            if isinstance(y, torch.Tensor) and y.is_floating_point():
                self.stds.append(y.detach().std().item())

        self.handles = [m.register_forward_hook(hook) for m in model.modules()]

    def sampled(self, step):
        return True

    def after(self, model, step, loss):
        self.stds.clear()

    def close(self):
        for h in self.handles:
            h.remove()


class Histograms(Monitor):
    """`SummaryWriter.add_histogram` of every parameter and its gradient, every `every` steps."""

    def __init__(self, model: nn.Module, every: int, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.period = every
        self.writer = SummaryWriter(log_dir=log_dir)

    def sampled(self, step):
        return step % self.period == 0

    def after(self, model, step, loss):
        if step % self.period == 0:
            for name, p in model.named_parameters():
                self.writer.add_histogram(name, p, step)
                if p.grad is not None:
                    self.writer.add_histogram(f"{name}.grad", p.grad, step)

    def close(self):
        self.writer.close()


class Wandb(Monitor):
    """`wandb.watch(model, log="all", log_freq=100)` in offline mode; its hooks log at `wandb.log`."""

    period = 100

    def __init__(self, model: nn.Module, log_dir: str) -> None:
        import wandb

        self.run = wandb.init(mode="offline", dir=log_dir, project="initdoctor-bench")
        self.run.watch(model, log="all", log_freq=self.period)

    def sampled(self, step):
        return step % self.period == 0

    def after(self, model, step, loss):
        self.run.log({"loss": loss.item()}, step=step)

    def close(self):
        self.run.finish(quiet=True)


@dataclass
class Variant:
    name: str
    make: Callable[[nn.Module, str], Monitor]
    stride: int = 1  # steps only every `stride` rounds: monitors too slow to run every round
    # The round of its first step (stride 1), or its rounds modulo `stride`: periodic monitors sample
    # in different rounds, so that no sampled step shares its round (or follows) another monitor's
    # heavy step, whose writer threads may still run then and be counted as this process's CPU time.
    offset: int = 0
    close_wall: float = 0.0  # wall clock of the monitor's close()
    close_cpu: float = 0.0  # CPU time of this process during close(): with a log_dir, the final figures
    times: list[float] = field(default_factory=list)  # wall clock of each timed step
    cpu: list[float] = field(default_factory=list)  # CPU time of this process during that step
    rounds: list[int] = field(default_factory=list)  # the round of each timed step
    flags: list[bool] = field(default_factory=list)  # whether the monitor observed that step


def variants() -> list[Variant]:
    out = [
        Variant("no monitor", lambda m, d: Monitor()),
        Variant("watch every=1", lambda m, d: Watch(m, 1, None), stride=5, offset=2),
        Variant("watch every=10", lambda m, d: Watch(m, 10, None), offset=5),
        Variant("watch every=100", lambda m, d: Watch(m, 100, None)),
        # default images_every=None: figures and histograms at the first sample and at close() only
        Variant("watch every=100, log_dir", lambda m, d: Watch(m, 100, d), offset=20),
        Variant("hand hooks .std().item()", lambda m, d: HandHooks(m)),
        Variant("add_histogram every step", lambda m, d: Histograms(m, 1, d), stride=20, offset=13),
        Variant("add_histogram every 100", lambda m, d: Histograms(m, 100, d), offset=60),
    ]
    if importlib.util.find_spec("wandb") is not None:
        out.append(Variant("wandb.watch log=all, 100", lambda m, d: Wandb(m, d), offset=80))
    return out


# --- the run ---------------------------------------------------------------------------------


def train_step(model, opt, task, batch, monitor, step) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one training step, the monitor's share included."""
    x, y = batch
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    loss = task.loss(model(x), y)
    loss.backward()
    opt.step()
    monitor.after(model, step, loss)
    return time.perf_counter() - t0, time.process_time() - c0


def run_task(task: Task, rounds: int, warmup: int) -> tuple[list[Variant], dict[str, Any]]:
    torch.manual_seed(0)
    base = task.build()
    batches = [task.batch() for _ in range(8)]
    vs = variants()
    tmp = tempfile.mkdtemp(prefix="initdoctor-bench-")
    twins, opts, monitors, steps = [], [], [], []
    try:
        for i, v in enumerate(vs):
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            for s in range(warmup):  # untimed: first-call allocations, before any monitor exists
                train_step(model, opt, task, batches[s % len(batches)], Monitor(), s)
            try:
                monitor = v.make(model, f"{tmp}/{i}")
            except Exception as e:  # a third-party monitor that cannot start here is reported, not fatal
                print(f"  {v.name}: could not start ({type(e).__name__}: {e}); skipped")
                monitor = None
            twins.append(model)
            opts.append(opt)
            monitors.append(monitor)
            steps.append(0)
        keep = [i for i, m in enumerate(monitors) if m is not None]
        t_start = time.perf_counter()
        shuffle = random.Random(0).shuffle
        order = list(keep)
        for r in range(rounds + max(vs[i].offset for i in keep)):
            # a new order every round: no twin always runs first, or right after the same other twin
            shuffle(order)
            for i in order:
                v = vs[i]
                if v.stride > 1 and (r >= rounds or r % v.stride != v.offset):
                    continue
                if v.stride == 1 and not v.offset <= r < v.offset + rounds:
                    continue
                s = steps[i]
                v.flags.append(monitors[i].sampled(s))
                wall, cpu = train_step(twins[i], opts[i], task, batches[(warmup + s) % len(batches)],
                                       monitors[i], s)
                v.times.append(wall)
                v.cpu.append(cpu)
                v.rounds.append(r)
                steps[i] += 1
        wall = time.perf_counter() - t_start
        for i in keep:
            t0, c0 = time.perf_counter(), time.process_time()
            monitors[i].close()
            vs[i].close_wall, vs[i].close_cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = twins[0]
    info: dict[str, Any] = {"wall": wall, "identical": {}}
    for i in keep:
        if vs[i].stride == 1:
            info["identical"][vs[i].name] = all(
                torch.equal(a, b) for a, b in zip(ref.state_dict().values(), twins[i].state_dict().values()))
    return [vs[i] for i in keep], info


def window_ratios(v: Variant, none: Variant, attr: str) -> list[float]:
    """Per window of the monitor's steps: its mean step over the no-monitor twin's in the same rounds."""
    size = WINDOW if v.stride == 1 else SPARSE_WINDOW
    ts, base_of = getattr(v, attr), dict(zip(none.rounds, getattr(none, attr)))
    out = []
    for w in range(len(ts) // size):
        sl = slice(w * size, (w + 1) * size)
        span = range(v.rounds[sl][0], v.rounds[sl][-1] + v.stride)
        base = [base_of[r] for r in span if r in base_of]
        if not base:  # a late-starting twin's last rounds: the no-monitor twin has finished
            continue
        out.append((sum(ts[sl]) / size) / (sum(base) / len(base)))
    return out


def summarize(vs: list[Variant]) -> list[dict]:
    """Per monitor: paired window ratios of means (wall clock and CPU time: "measured", which includes
    every observed step but also every preemption), and an estimate from medians of CPU time (robust):
    1 + the extra of an observed step over an unobserved one, spread over the period."""
    none = vs[0]
    none_med = median(none.cpu)
    out = []
    for v in vs:
        wall, cpu = window_ratios(v, none, "times"), window_ratios(v, none, "cpu")
        observed = [t for t, f in zip(v.cpu, v.flags) if f]
        plain = [t for t, f in zip(v.cpu, v.flags) if not f]
        row = {"name": v.name, "steps": len(v.cpu), "median": median(v.cpu), "wall": median(wall),
               "iqr": quartiles(wall), "cpu": median(cpu), "plain": None, "observed": None, "first": None,
               "close": v.close_cpu}
        if observed and plain:  # a monitor that observes one step in `period`
            period = round(len(v.cpu) / len(observed))
            row.update(plain=median(plain), observed=median(observed[1:] or observed), first=observed[0],
                       period=period)
            # unobserved steps run the bare model (no hooks): they are reported, not added, since their
            # difference from the no-monitor twin is noise of about 1% either way on a shared machine
            row["estimate"] = 1 + (row["observed"] - row["plain"]) / (period * none_med)
            # paid once per watch: the first sample's excess over a later one (duplicate-unit detection;
            # with a log_dir the first figures, histograms, and matplotlib's import in the first model
            # measured) and close() (with a log_dir: the figures of the final state)
            row["oneoff"] = max(row["first"] - row["observed"], 0.0) + v.close_cpu
        else:  # the same work every step (or none)
            row["estimate"] = median(v.cpu) / none_med
        out.append(row)
    return out


def ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.2f}"


def report(task: Task, rows: list[dict], info: dict) -> tuple[str, list[str]]:
    none = rows[0]
    lines = []
    for r in rows:
        lo, hi = r["iqr"]
        ident = info["identical"].get(r["name"])
        lines.append([
            r["name"], str(r["steps"]), ms(r["median"]),
            "1" if r is none else f"{r['wall']:.3f} ({lo:.3f}–{hi:.3f})",
            "1" if r is none else f"{r['cpu']:.3f}",
            ms(r["plain"]), ms(r["observed"]), ms(r["first"]), "—" if r is none else ms(r["close"]),
            "1" if r is none else f"{r['estimate']:.3f}",
            "—" if ident is None else ("yes" if ident else "NO"),
        ])
    text = table(["monitor", "steps", "median step ms", "measured x wall (IQR)", "measured x CPU", "unobserved ms",
                  "observed ms", "first observed ms", "close ms", "estimate x", "twin identical"], lines)
    notes = []
    for r in rows:
        if not r["name"].startswith("watch every=100") or r.get("plain") is None:
            continue
        over = r["estimate"] - 1
        extra = r["observed"] - r["plain"]
        step = none["median"]
        oneoff = r["oneoff"]
        notes.append(
            f"{task.name}, {r['name']}: estimate {over:+.2%} (target within {TARGET:.0%}: "
            f"{verdict(over <= TARGET)}), measured {r['wall'] - 1:+.1%} wall, {r['cpu'] - 1:+.1%} CPU; "
            f"an observed step costs {extra * 1e3:.1f} ms more than an unobserved one ({extra / step:.1f} plain "
            f"steps), an unobserved one {r['plain'] / step - 1:+.1%} against no monitor; within 1% needs "
            f"plain steps of at least {extra * 1e3:.0f} ms, or every >= {extra / (TARGET * step):.0f}; "
            f"one-off (first sample's excess {max(r['first'] - r['observed'], 0) * 1e3:.0f} ms, close() "
            f"{r['close'] * 1e3:.0f} ms): {oneoff / step:.0f} plain steps, "
            f"{oneoff / (r['steps'] * step):+.1%} over these {r['steps']} steps, "
            f"{oneoff / (LONG_RUN * step):+.2%} over {LONG_RUN:,} steps")
    return text, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    ap.add_argument("--rounds", type=int, default=1000, help="interleaved rounds (steps per every-round monitor)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per twin before its monitor starts")
    ap.add_argument("--models", default="MLP,CNN,Transformer", help="comma-separated subset")
    args = ap.parse_args()
    setup_torch()
    warnings.simplefilter("ignore", InitDoctorWarning)  # findings on these toy models are beside the point
    warnings.filterwarnings("ignore", module="tensorboard")
    here = machine()
    print(f"machine: {here}")
    print("method: twins interleaved step by step, in a new random order each round; one torch thread; "
          "verdicts on the estimate from medians")
    if importlib.util.find_spec("wandb") is None:
        print("wandb: not installed, skipped")
    sections, notes = [], []
    t0 = time.perf_counter()
    for task in TASKS:
        if task.name not in args.models.split(","):
            continue
        vs, info = run_task(task, args.rounds, args.warmup)
        rows = summarize(vs)
        text, n = report(task, rows, info)
        head = f"### {task.name}: {task.describe}"
        print(f"\n{head}  ({info['wall']:.0f} s)\n{text}")
        for line in n:
            print(line)
        sections.append(f"{head}\n\n{text}")
        notes += n
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    if args.write:
        wandb_line = ("" if importlib.util.find_spec("wandb") is not None
                      else "wandb was not installed on this machine: its row is absent.\n\n")
        body = "\n\n".join([
            f"Measured {here}; `python benchmarks/watch_overhead.py --rounds {args.rounds}` "
            f"({total:.0f} s).",
            "Columns (times in ms of CPU time of the process, `time.process_time`, which leaves out "
            "the time other processes hold the cores): *median step ms* over all the monitor's steps; "
            f"*measured x wall (IQR)* and *measured x CPU*: the median, over windows of {WINDOW} steps "
            f"({SPARSE_WINDOW} for the monitors that step every few rounds), of the window's mean step "
            "divided by the no-monitor twin's mean over the same rounds (interquartile range of the "
            "wall-clock ratios): means include every observed step, but also every preemption; "
            "*unobserved / observed ms*: the median step that the monitor did not / did observe (after "
            "the first); *first observed ms*: for `watch`, duplicate-unit detection runs only then, "
            "and with a log_dir also the first figures and histograms (and matplotlib's import, in the "
            "first model measured); *close ms*: CPU time of the monitor's `close()` after the run (with "
            "a log_dir, `watch` draws the figures of the final state then); *estimate x*: 1 + "
            "(observed - unobserved) / (period x median no-monitor step), from medians only, so "
            "steady under load: the verdicts use it, and the notes below the tables add the one-off "
            "costs (first sample and close) spread over the run; the unobserved steps "
            "are left out of it because they run the bare model and match the no-monitor twin to "
            "within the noise (compare the columns); for monitors that work every step, the ratio "
            "of median steps; "
            "*twin identical*: the twin's parameters equal the no-monitor twin's bit for bit after "
            "the run (twins that step every round).",
            wandb_line + "\n\n".join(sections),
            "\n".join(f"- {n}" for n in notes),
        ])
        write_section("watch_overhead", body)


if __name__ == "__main__":
    main()
