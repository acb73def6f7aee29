"""Training-step time of a torch.compile'd model under `initdoctor.watch(every=100)`.

    python benchmarks/compile_watch.py            # print the table
    python benchmarks/compile_watch.py --write    # ... and update docs/performance.md

Three twins of one model (deep copies, the same batches, the same optimizer) train in interleaved
windows of 100 steps (A B C, then B C A, ...), so load from other processes falls on all alike: the
eager model, the compiled model, and the compiled model under `watch(every=100)`, whose every window
holds exactly one sampled step. Every step is timed on its own in CPU time of the training thread
(one torch thread), which preemption by other processes on a shared machine disturbs far less than
wall-clock time. The figures are medians, and every ratio is against the compiled twin measured in the same run:
- unsampled step: a watched step that is not sampled (no hook anywhere: the compiled graph runs
  bare), against the compiled twin's steps; the target is the compiled speed, i.e. about 1.00;
- sampled step: the step that replays the batch through the eager module;
- every=100: a whole window of the watched twin against the compiled twin's window (the amortized cost);
- eager: the eager twin, for the speed-up that compilation buys and the watch must keep.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from common import machine, median, quartiles, setup_torch, table, write_section
from torch import nn
from torch.nn import functional as F

import initdoctor

WINDOW = 100
TARGET = 0.05  # unsampled watched steps within 5% of the compiled twin's


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.LayerNorm(512),
                         nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


TASKS = {
    "MLP 256-512x3-10, GELU + LayerNorm, batch 64": (mlp, lambda g: torch.randn(64, 256, generator=g)),
    "CNN 3 conv + BatchNorm, 16x16 images, batch 32": (cnn, lambda g: torch.randn(32, 3, 16, 16, generator=g)),
}


class Twin:
    def __init__(self, name: str, model: nn.Module, doctor=None) -> None:
        self.name, self.model, self.doctor = name, model, doctor
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []
        self.sampled: list[bool] = []
        self.windows: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool) -> None:
        sampling = self.doctor is not None and self.doctor.sampling
        t0 = time.thread_time()
        self.opt.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        if self.doctor is not None:
            self.doctor.step()
        dt = time.thread_time() - t0
        if record:
            self.times.append(dt)
            self.sampled.append(sampling)


def run(build, make_x, rounds: int) -> dict:
    torch.manual_seed(0)
    base = build()
    eager = Twin("eager", copy.deepcopy(base))
    compiled = Twin("compiled", torch.compile(copy.deepcopy(base)))
    watched_model = torch.compile(copy.deepcopy(base))
    doctor = initdoctor.watch(watched_model, every=WINDOW, warn=False, histograms=False)
    watched = Twin("watched", watched_model, doctor)
    twins = [eager, compiled, watched]
    g = torch.Generator().manual_seed(1)
    batches = [(make_x(g), torch.randint(0, 10, (make_x(g).shape[0],), generator=g)) for _ in range(20)]
    t0 = time.perf_counter()
    with doctor:
        for twin in twins:  # compile, and take the watched twin's first sample, outside the timing
            for i in range(WINDOW):
                twin.step(*batches[i % len(batches)], record=False)
        warm = time.perf_counter() - t0
        for r in range(rounds):
            order = twins[r % 3:] + twins[:r % 3]
            for twin in order:
                w0 = time.thread_time()
                for i in range(WINDOW):
                    twin.step(*batches[i % len(batches)], record=True)
                twin.windows.append(time.thread_time() - w0)
    comp = median(compiled.times)
    plain = [t for t, s in zip(watched.times, watched.sampled) if not s]
    sampled = [t for t, s in zip(watched.times, watched.sampled) if s]
    window_ratios = [w / c for w, c in zip(watched.windows, compiled.windows)]
    return {
        "compiled_ms": comp * 1e3,
        "eager_ratio": median(eager.times) / comp,
        "unsampled_ratio": median(plain) / comp,
        "unsampled_q": tuple(q / comp for q in quartiles(plain)),
        "sampled_ratio": median(sampled) / comp,
        "window_ratio": median(window_ratios),
        "samples": len(sampled),
        "warm_s": warm,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6, help="windows of 100 steps per twin")
    p.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = p.parse_args()
    setup_torch()
    warnings.simplefilter("ignore", initdoctor.InitDoctorWarning)
    rows = []
    met = True
    for name, (build, make_x) in TASKS.items():
        r = run(build, make_x, args.rounds)
        met &= r["unsampled_ratio"] <= 1 + TARGET
        lo, hi = r["unsampled_q"]
        rows.append([name, f"{r['compiled_ms']:.2f} ms", f"{r['eager_ratio']:.2f}",
                     f"{r['unsampled_ratio']:.3f} ({lo:.2f}-{hi:.2f})", f"{r['sampled_ratio']:.1f}",
                     f"{r['window_ratio']:.3f}", str(r["samples"])])
        print(f"{name}: done (warm-up with compilation {r['warm_s']:.1f} s)", flush=True)
    header = ["model", "compiled step", "eager / compiled", "unsampled watched / compiled (IQR)",
              "sampled / compiled", "every=100 window / compiled", "samples timed"]
    text = "\n\n".join([
        f"Measured on {machine()}; {args.rounds} interleaved windows of {WINDOW} steps per twin; medians.",
        table(header, rows),
        f"Target: unsampled watched steps within {TARGET:.0%} of the compiled twin's: "
        f"{'**met**' if met else '**missed**'}. A sampled step replays its batch through the eager module "
        "(one extra eager forward and backward, plus the reductions); `every=100` spreads it over 100 steps.",
    ])
    print(text)
    if args.write:
        write_section("compile_watch", text)


if __name__ == "__main__":
    main()
