"""Training-step time under `initdoctor.watch` and the monitors people write instead.

    python benchmarks/watch_overhead.py            # print the tables
    python benchmarks/watch_overhead.py --write    # ... and update docs/performance.md

Each monitor trains its own twin of the model (a deep copy, same batches, same optimizer), and the
twins take turns: each twin takes a run of 10 consecutive steps (`--run`), the twins in a new random
order every turn, so load from other processes falls on all of them alike. At the end of its run a
twin waits for its monitor's background work (`watch`'s worker), within the run's last step: a
worker overlaps only its own model's training, as in a real loop. (Stepping the twins one step at a
time, as this script did until 2026-11-29, let a worker's work land on the other twins' steps,
the no-monitor twin's included, and made `step(wait=False)` look cheaper than it is.) A second twin
with no monitor measures what that leaves: its ratio to the first should be 1, and its interval says
how well this run resolves a ratio. The rounds (steps per twin) are cut into blocks of 100
(every=100 then samples exactly once per block); per block, each twin's total step time divided by
the no-monitor twin's over the same rounds is one ratio. The table gives the median of
those block ratios with a 95% bootstrap interval (blocks resampled), on three clocks: wall time,
the process's CPU time, the training thread's own CPU time (what `watch` leaves on it), and that
plus the CPU clock of the monitor's worker thread (its whole cost: the process's CPU time would
charge a worker's work to whichever twin steps meanwhile). One torch thread throughout.
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from common import machine, median, setup_torch, table, verdict, write_section
from torch import nn
from torch.nn import functional as F

import initdoctor
from initdoctor import watcher
from initdoctor.probe import Recorder, Structure
from initdoctor.watcher import InitDoctorWarning

TARGET = 0.01  # watch(every=100) within 1% of no monitor (DESIGN.md section 5)
LONG_RUN = 100_000  # steps over which the one-off costs are also spread, for scale
WINDOW = 100  # steps per window for monitors that run every round
SPARSE_WINDOW = 10  # steps per window for monitors that run every few rounds

# --- models: the three of issue 16, small enough for hundreds of steps on one CPU thread ----------


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
    layers: list[nn.Module] = []
    for i in range(10):
        layers += [nn.Linear(784 if i == 0 else 512, 512), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def cnn() -> nn.Module:
    layers: list[nn.Module] = []
    c = 3
    for o in (16, 32, 32, 64):
        layers += [nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        c = o
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


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
    Task("MLP", "784-512x10-10, sigmoid, batch 128", mlp,
         lambda: (torch.randn(128, 784), torch.randint(0, 10, (128,))), F.cross_entropy),
    Task("CNN", "4 conv+BN+ReLU (16-32-32-64 ch), 8x8 RGB, batch 64", cnn,
         lambda: (torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))), F.cross_entropy),
    Task("Transformer", "2-layer encoder, d=64, 4 heads, 32 tokens, batch 8", TinyTransformer,
         lambda: (torch.randint(0, 500, (8, 32)), torch.randint(0, 500, (8, 32))), seq_loss),
]



def large_tasks() -> list[Task]:
    """check_cost.py's three models, in training (`--large`): steps of 0.2-0.3 s on one CPU thread,
    where the fixed costs per layer that dominate the three small models above are amortized."""
    from check_cost import MODELS

    out = []
    for name, (describe, build, batch) in MODELS.items():
        seq = name == "transformer"  # a language model: one target per token

        def make_batch(batch=batch, seq=seq):
            x = batch()
            return x, torch.randint(0, 1000 if seq else 10, tuple(x.shape if seq else x.shape[:1]))
        out.append(Task(name, describe, build, make_batch, seq_loss if seq else F.cross_entropy))
    return out


# --- monitors ------------------------------------------------------------------------------------


class Monitor:
    """What a monitor does after one training step."""

    def after(self, model: nn.Module, step: int, loss: torch.Tensor) -> None:
        pass

    def worker_cpu(self) -> float:
        """CPU seconds spent so far by the monitor's own background thread (none: 0)."""
        return 0.0

    def settle(self) -> None:
        """Wait for the monitor's background work (none: nothing to wait for)."""

    def close(self) -> None:
        pass


class Watch(Monitor):
    def __init__(self, model: nn.Module, every: int, log_dir: str | None, wait: bool = True, inline: bool = False,
                 **kw: Any) -> None:
        self.wait = wait
        self.doctor = initdoctor.watch(model, log_dir=log_dir, every=every, **kw).__enter__()
        if inline:
            self.doctor._worker = watcher._Inline(self.doctor._process)

    def after(self, model, step, loss):
        self.doctor.step(wait=self.wait)

    def settle(self):
        self.doctor.wait()

    def worker_cpu(self):
        # the thread's own CPU clock: `process_time` would charge it to whichever twin steps meanwhile
        thread = self.doctor._worker._thread
        if thread is not None and thread.is_alive():
            self._worker_cpu = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        return getattr(self, "_worker_cpu", 0.0)

    def close(self):
        self.doctor.close()


class Floor(Monitor):
    """initdoctor's own reductions alone, every step: the hooks' sums, the weights' and gradients'
    sums and the one host copy (`Recorder.host_copy`), as a sampled step of `watch` takes them, with
    no statistics built and no rules run. What a sampled step costs at least with today's
    statistics, wherever the rest of its work runs."""

    def __init__(self, model: nn.Module) -> None:
        self.structure = Structure(model)
        self.rec = Recorder(model, structure=self.structure).__enter__()

    def after(self, model, step, loss):
        # as `watch` samples consecutive steps: the hooks stay on, the pass is handed off
        done = self.rec.handoff()
        grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
        done.host_copy(grads or None)

    def close(self):
        self.rec.close()


class HandHooks(Monitor):
    """What people write by hand: a forward hook on every module logging its output's std."""

    def __init__(self, model: nn.Module) -> None:
        self.stds: list[float] = []

        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            if isinstance(y, torch.Tensor) and y.is_floating_point():
                self.stds.append(y.detach().std().item())

        self.handles = [m.register_forward_hook(hook) for m in model.modules()]

    def after(self, model, step, loss):
        self.stds.clear()

    def close(self):
        for h in self.handles:
            h.remove()


class ActivationStats(HandHooks):
    """fastai's `ActivationStats` (callback/hook.py), written out since fastai is not installed here:
    a forward hook on every module with parameters storing the output's mean, std and share near
    zero (`(o <= 0.05)`), each read to the host with `.item()`, every batch."""

    def __init__(self, model: nn.Module) -> None:
        self.stats: list[dict] = []

        def hook(module, args, o):
            o = o.detach().float()
            self.stats.append({"mean": o.mean().item(), "std": o.std().item(),
                               "near_zero": (o <= 0.05).long().sum().item() / o.numel()})

        self.handles = [m.register_forward_hook(hook) for m in model.modules()
                        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]

    def after(self, model, step, loss):
        self.stats.clear()  # fastai keeps them; cleared here so memory does not grow with the run


class Histograms(Monitor):
    """`SummaryWriter.add_histogram` of every parameter and its gradient, every `every` steps."""

    def __init__(self, model: nn.Module, every: int, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.period = every
        self.writer = SummaryWriter(log_dir=log_dir)

    def after(self, model, step, loss):
        if step % self.period == 0:
            for name, p in model.named_parameters():
                self.writer.add_histogram(name, p, step)
                if p.grad is not None:
                    self.writer.add_histogram(f"{name}.grad", p.grad, step)

    def close(self):
        self.writer.close()


@dataclass
class Variant:
    name: str
    make: Callable[[nn.Module, str], Monitor]
    target: float | None = None  # the bound on the ratio, where it sets one
    close_wall: float = 0.0  # wall clock of the monitor's close()
    wall: list[float] = field(default_factory=list)  # per step: wall clock,
    cpu: list[float] = field(default_factory=list)  # the process's CPU time (all threads),
    thread: list[float] = field(default_factory=list)  # the training thread's CPU time
    worker: list[float] = field(default_factory=list)  # per block: CPU time of the monitor's worker thread


def variants(more: bool, large: bool = False) -> list[Variant]:
    if large:  # steps of a few tenths of a second: the variants the issue sets targets for
        return [
            Variant("no monitor", lambda m, d: Monitor()),
            Variant("no monitor (second twin)", lambda m, d: Monitor()),
            Variant("watch every=1, step(wait=False)", lambda m, d: Watch(m, 1, None, wait=False), 1.15),
            Variant("watch every=10, step(wait=False)", lambda m, d: Watch(m, 10, None, wait=False), 1.03),
        ]
    out = [
        Variant("no monitor", lambda m, d: Monitor()),
        Variant("no monitor (second twin)", lambda m, d: Monitor()),
        Variant("watch every=1", lambda m, d: Watch(m, 1, None), 1.15),
        Variant("watch every=1, step(wait=False)", lambda m, d: Watch(m, 1, None, wait=False), 1.15),
        Variant("watch every=10, step(wait=False)", lambda m, d: Watch(m, 10, None, wait=False), 1.03),
        Variant("watch every=100", lambda m, d: Watch(m, 100, None), 1.01),
        Variant("initdoctor's reductions and host copy alone, every step (the floor)", lambda m, d: Floor(m)),
        Variant("hand hooks .std().item()", lambda m, d: HandHooks(m)),
        Variant("fastai-style ActivationStats", lambda m, d: ActivationStats(m)),
    ]
    if more:
        out += [
            Variant("watch every=10", lambda m, d: Watch(m, 10, None), 1.03),
            Variant("watch every=10, log_dir, no worker (as before)", lambda m, d: Watch(m, 10, d, inline=True), 1.03),
            Variant("watch every=10, log_dir", lambda m, d: Watch(m, 10, d), 1.03),
            Variant("watch every=100, log_dir", lambda m, d: Watch(m, 100, d), 1.01),
            Variant("watch every=10, log_dir, step(wait=False)", lambda m, d: Watch(m, 10, d, wait=False), 1.03),
            Variant("add_histogram every 100", lambda m, d: Histograms(m, 100, d)),
        ]
    return out


# --- the run ---------------------------------------------------------------------------------


def train_step(model, opt, task, batch, monitor, step, settle: bool = False) -> tuple[float, float, float]:
    """Wall clock, process CPU and thread CPU seconds of one training step, the monitor's share included
    (with `settle`, also the wait for the monitor's background work to finish)."""
    x, y = batch
    t0, c0, h0 = time.perf_counter(), time.process_time(), time.thread_time()
    opt.zero_grad(set_to_none=True)
    loss = task.loss(model(x), y)
    loss.backward()
    opt.step()
    monitor.after(model, step, loss)
    if settle:
        monitor.settle()
    return time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - h0


def run_task(task: Task, rounds: int, warmup: int, more: bool, block: int,
             large: bool = False, run: int = 10) -> tuple[list[Variant], dict[str, Any]]:
    if block % run or rounds % block:
        raise SystemExit(f"--block {block} must be a multiple of --run {run}, and --rounds {rounds} of --block")
    torch.manual_seed(0)
    base = task.build()
    batches = [task.batch() for _ in range(8)]
    vs = variants(more, large)
    tmp = tempfile.mkdtemp(prefix="initdoctor-bench-")
    twins, opts, monitors = [], [], []
    try:
        for i, v in enumerate(vs):
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            for s in range(warmup):  # untimed: first-call allocations, before any monitor exists
                train_step(model, opt, task, batches[s % len(batches)], Monitor(), s)
            twins.append(model)
            opts.append(opt)
            monitors.append(v.make(model, f"{tmp}/{i}"))
        t_start = time.perf_counter()
        shuffle = random.Random(0).shuffle
        order = list(range(len(vs)))
        for r0 in range(0, rounds, run):
            shuffle(order)  # no twin always runs first, or right after the same other twin
            for i in order:
                # `run` consecutive steps of one twin, its monitor's worker then drained within the
                # last step's time: a worker overlaps its own training only, as in a real loop
                for r in range(r0, r0 + run):
                    wall, cpu, thread = train_step(twins[i], opts[i], task, batches[(warmup + r) % len(batches)],
                                                   monitors[i], r, settle=r == r0 + run - 1)
                    vs[i].wall.append(wall)
                    vs[i].cpu.append(cpu)
                    vs[i].thread.append(thread)
            r = r0 + run - 1
            if (r + 1) % block == 0:
                for i, v in enumerate(vs):
                    v.worker.append(monitors[i].worker_cpu())
        wall = time.perf_counter() - t_start
        for i, v in enumerate(vs):
            t0 = time.perf_counter()
            monitors[i].close()
            v.close_wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = twins[0].state_dict()
    identical = {v.name: all(torch.equal(a, b) for a, b in zip(ref.values(), twins[i].state_dict().values()))
                 for i, v in enumerate(vs)}
    return vs, {"wall": wall, "identical": identical}


def block_ratios(v: Variant, none: Variant, attr: str, block: int) -> list[float]:
    """Per block of rounds: the monitor's total step time over the no-monitor twin's. "total" is the
    training thread's CPU time plus the CPU time of the monitor's worker thread in that block."""
    if attr == "total":
        done = [0.0] + v.worker
        extra = [done[k + 1] - done[k] for k in range(len(v.worker))]
        ts, base = v.thread, none.thread
        return [(sum(ts[b:b + block]) + extra[b // block]) / sum(base[b:b + block])
                for b in range(0, len(ts) - block + 1, block)]
    ts, base = getattr(v, attr), getattr(none, attr)
    return [sum(ts[b:b + block]) / sum(base[b:b + block]) for b in range(0, len(ts) - block + 1, block)]


def bootstrap(xs: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The median and a 95% percentile-bootstrap interval of it (blocks resampled with replacement)."""
    rng = random.Random(seed)
    meds = sorted(median([rng.choice(xs) for _ in xs]) for _ in range(reps))
    return median(xs), meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


CLOCKS = {"wall": "wall", "cpu": "process CPU", "thread": "training-thread CPU", "total": "training + worker CPU"}


def summarize(vs: list[Variant], block: int) -> list[dict]:
    none = vs[0]
    rows = []
    for v in vs:
        row = {"name": v.name, "target": v.target, "step": median(none.thread) if v is none else None,
               "close": v.close_wall}
        for attr in CLOCKS:
            row[attr] = None if v is none else bootstrap(block_ratios(v, none, attr, block))
        rows.append(row)
    return rows


def fmt(ci: tuple[float, float, float] | None) -> str:
    return "1" if ci is None else f"{ci[0]:.3f} ({ci[1]:.3f}–{ci[2]:.3f})"


def report(task: Task, rows: list[dict], info: dict, block: int) -> tuple[str, list[str]]:
    lines = []
    for r in rows:
        ident = info["identical"].get(r["name"])
        lines.append([r["name"], fmt(r["wall"]), fmt(r["cpu"]), fmt(r["thread"]), fmt(r["total"]),
                      "—" if r["target"] is None else f"≤ {r['target']:.2f}",
                      "—" if r["target"] is None else verdict_of(r), f"{r['close'] * 1e3:.0f}",
                      "yes" if ident else "NO"])
    text = table(["monitor", "x wall (95% CI)", "x process CPU (95% CI)", "x training-thread CPU (95% CI)",
                  "x training + worker CPU (95% CI)",
                  "target", "verdict (wall)", "close ms", "twin identical"], lines)
    step = rows[0]["step"]
    notes = [f"{task.name}: bare step {step * 1e3:.2f} ms (training-thread CPU, median); "
             f"{info['blocks']} blocks of {block} rounds; {info['wall']:.0f} s"]
    return text, notes


def verdict_of(r: dict) -> str:
    """Met when the interval lies under the target, missed when above it, else not resolved."""
    _, lo, hi = r["wall"]
    if hi <= r["target"]:
        return verdict(True)
    if lo > r["target"]:
        return verdict(False)
    return "not resolved"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    ap.add_argument("--rounds", type=int, default=1000, help="interleaved rounds (steps per twin)")
    ap.add_argument("--block", type=int, default=100, help="rounds per block (one every=100 sample each)")
    ap.add_argument("--run", type=int, default=10,
                    help="consecutive steps of one twin before the next twin's (its worker drained at the end)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per twin before its monitor starts")
    ap.add_argument("--models", default="MLP,CNN,Transformer", help="comma-separated subset")
    ap.add_argument("--more", action="store_true", help="also log_dir variants, every=10 waiting, add_histogram")
    ap.add_argument("--large", action="store_true",
                    help="check_cost.py's three larger models instead (every=1 and every=10; use fewer rounds)")
    args = ap.parse_args()
    setup_torch()
    warnings.simplefilter("ignore", InitDoctorWarning)  # findings on these toy models are beside the point
    warnings.filterwarnings("ignore", module="tensorboard")
    here = machine()
    print(f"machine: {here}")
    print(f"method: twins take runs of {args.run} steps in a new random order each turn; blocks of {args.block} "
          "rounds; median block ratio with a 95% bootstrap interval; one torch thread")
    sections, notes = [], []
    t0 = time.perf_counter()
    tasks = large_tasks() if args.large else TASKS
    names = [t.name for t in tasks] if args.large and args.models == ap.get_default("models") else args.models.split(",")
    for task in tasks:
        if task.name not in names:
            continue
        vs, info = run_task(task, args.rounds, args.warmup, args.more, args.block, args.large, args.run)
        info["blocks"] = args.rounds // args.block
        rows = summarize(vs, args.block)
        text, n = report(task, rows, info, args.block)
        head = f"### {task.name}: {task.describe}"
        print(f"\n{head}\n{text}")
        for line in n:
            print(line)
        sections.append(f"{head}\n\n{text}")
        notes += n
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    if args.write:
        body = "\n\n".join([
            f"Measured {here}; `python benchmarks/watch_overhead.py --rounds {args.rounds}"
            f"{' --block ' + str(args.block) if args.block != 100 else ''}"
            f"{' --run ' + str(args.run) if args.run != 10 else ''}"
            f"{' --more' if args.more else ''}{' --large' if args.large else ''}` ({total:.0f} s).",
            "Each cell: the median over blocks of the block's total step time divided by the no-monitor "
            "twin's over the same rounds, and a 95% bootstrap interval of that median. *process CPU* counts "
            "every thread of the process during the twin's steps (its worker's too: each twin's run of steps "
            "ends by waiting for its worker); *training-thread CPU*: only the thread "
            "that trains (`time.thread_time`); *training + worker CPU*: that plus the CPU clock of the "
            "monitor's own worker thread over the block, the whole cost of the monitor; the second no-monitor twin shows how well the run resolves a "
            "ratio. Verdicts on wall time: met when the whole interval is under the target, missed when it "
            "is above, otherwise not resolved. *close ms*: wall clock of the monitor's `close()`. "
            "*twin identical*: the twin's parameters equal the no-monitor twin's bit for bit at the end.",
            "\n\n".join(sections),
            "\n".join(f"- {n}" for n in notes),
        ])
        write_section("watch_overhead_large" if args.large else "watch_overhead", body)


if __name__ == "__main__":
    main()
