"""`check` and `watch` on an accelerator: the same models as check_cost.py and watch_overhead.py, on CUDA.

    python benchmarks/gpu_cost.py                  # print the tables (skips where there is no CUDA)
    python benchmarks/gpu_cost.py --out gpu.md     # ... and write them to a file
    python benchmarks/gpu_cost.py --write          # ... or into docs/performance.md (section gpu_cost)

Times are wall clock with `torch.cuda.synchronize()` closing every timed call (a training loop
synchronizes at least once a step, when it reads its loss). check: one `initdoctor.check` against
one bare forward+backward, alternating. watch: twins of each model take runs of 10 consecutive
steps in a new random order, each run ending with the wait for its worker, as in watch_overhead.py;
per block of 100 rounds, a twin's step time over the no-monitor twin's is one ratio; the table gives
the median ratio and a 95% bootstrap interval. `wait=False` rows step with `step(wait=False)`,
`step()` rows build and judge each sample on the training thread.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from check_cost import MODELS, mlp
from common import machine, table, write_section
from watch_overhead import TASKS

import initdoctor

WATCH_TARGETS = {1: 1.15, 10: 1.03, 100: 1.01}
RUN = 10  # consecutive steps of one twin (as watch_overhead.py's --run)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bare_pass(model, x) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    model.zero_grad(set_to_none=True)


def check_rows(reps: int, dev: str) -> list[list[str]]:
    cases = {name: (desc, build, batch) for name, (desc, build, batch) in MODELS.items()}
    cases["mlp256x64"] = ("MLP 256 wide, 64 deep, ReLU, batch 64", lambda: mlp(256, 64), lambda: torch.randn(64, 256))
    rows = []
    for name, (desc, build, batch) in cases.items():
        torch.manual_seed(0)
        model, x = build().to(dev), batch().to(dev)
        for _ in range(2):  # warm-up: kernels, allocator, cuBLAS handles
            bare_pass(model, x)
            initdoctor.check(model, x)
        bare, chk = [], []
        for _ in range(reps):
            bare.append(timed(lambda m=model, x=x: bare_pass(m, x)))
            chk.append(timed(lambda m=model, x=x: initdoctor.check(m, x)))
        ratio = statistics.median(c / b for b, c in zip(bare, chk))
        rows.append([f"{name}: {desc}", f"{statistics.median(bare) * 1e3:.1f}", f"{statistics.median(chk) * 1e3:.1f}",
                     f"{ratio:.2f}", "**met**" if ratio <= 2.0 else "**missed**"])
    return rows


def bootstrap(xs: list[float], n: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


def train_step(task, twin, batch, settle: bool = False) -> float:
    model, opt, doctor, _, wait = twin
    x, y = batch

    def run():
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step()
        if doctor is not None:
            doctor.step(wait=wait)
            if settle:
                doctor.wait()
    return timed(run)


def watch_rows(rounds: int, block: int, dev: str) -> list[list[str]]:
    rows = []
    for task in TASKS:
        torch.manual_seed(0)
        base = task.build().to(dev)
        batches = [tuple(t.to(dev) for t in task.batch()) for _ in range(8)]
        names = ["none", "none (second twin)"] + [f"every={e}, wait=False" for e in WATCH_TARGETS] + [
            f"every={e}, step()" for e in (1, 10)]
        twins = {}
        for name in names:
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            doctor = None
            if name.startswith("every="):
                doctor = initdoctor.watch(model, every=_every(name), warn=False).__enter__()
            twins[name] = (model, opt, doctor, [], name.endswith("step()"))

        for i in range(10):  # warm-up
            for name in names:
                train_step(task, twins[name], batches[i % len(batches)])
        order = names[:]
        rng = random.Random(1)
        for i0 in range(0, rounds, RUN):
            rng.shuffle(order)
            for name in order:  # a run of consecutive steps per twin, its worker drained at the end
                for i in range(i0, i0 + RUN):
                    twins[name][3].append(train_step(task, twins[name], batches[i % len(batches)],
                                                     settle=i == i0 + RUN - 1))
        for _, _, doctor, _, _ in twins.values():
            if doctor is not None:
                doctor.close()
        ref = twins["none"][3]
        bare_ms = statistics.median(ref) * 1e3
        for name in names[1:]:
            ts = twins[name][3]
            ratios = [sum(ts[b:b + block]) / sum(ref[b:b + block]) for b in range(0, len(ts) - block + 1, block)]
            lo, hi = bootstrap(ratios)
            target = WATCH_TARGETS.get(_every(name)) if name.startswith("every=") else None
            rows.append([task.name, name, f"{bare_ms:.2f}", f"{statistics.median(ratios):.3f}", f"{lo:.3f}–{hi:.3f}",
                         "" if target is None else f"≤ {target}"])
    return rows


def _every(name: str) -> int:
    return int(name.split("=")[1].split(",")[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10, help="alternating repetitions for check")
    ap.add_argument("--rounds", type=int, default=1000, help="interleaved rounds for watch")
    ap.add_argument("--block", type=int, default=100, help="rounds per block")
    ap.add_argument("--out", type=Path, help="also write the tables to this file")
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    ap.add_argument("--device", default="cuda", help="cpu: a quick run of the script itself")
    ap.add_argument("--watch-only", action="store_true", help="leave out the check table")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_cost: no CUDA device here; nothing measured")
        return 0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU"
    head = (f"Measured on {name} (CUDA {torch.version.cuda}); host: {machine()}; "
            f"`python benchmarks/gpu_cost.py --reps {args.reps} --rounds {args.rounds}`")
    check = "" if args.watch_only else table(["model", "bare ms", "check ms", "ratio (median of pairs)", "within 2x"],
                                              check_rows(args.reps, dev))
    print(check, flush=True)
    watch = table(["model", "monitor", "bare step ms", "median block ratio", "95% interval", "target"],
                  watch_rows(args.rounds, args.block, dev))
    print(watch, flush=True)
    text = (f"{head} ({time.perf_counter() - t0:.0f} s).\n\n### check on the GPU\n\n{check}\n\n"
            f"### watch on the GPU\n\n{watch}\n")
    if args.out:
        args.out.write_text(text)
    if args.write:
        write_section("gpu_cost", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
