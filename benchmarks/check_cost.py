"""What one `initdoctor.check` costs against one bare forward and backward pass of the same model.

    python benchmarks/check_cost.py              # print the tables
    python benchmarks/check_cost.py --write      # ... and update docs/performance.md
    python benchmarks/check_cost.py --profile    # ... and where the time of each check goes (pyinstrument)

Time: bare pass, check and the floor (what check costs at least: `floor`) in turn (A B C A B C
...) after one untimed call of each; medians. Memory: each measurement runs in a fresh process (see
`mem_child`): after one untimed bare pass it reads its resident set (VmRSS), resets the kernel's
high-water mark (`5` into /proc/self/clear_refs) and reads that mark (VmHWM) after one bare pass or
one check; the figure is the growth over the resident set before, which holds the model, the batch
and torch itself. glibc is told to map every block of 64 KiB or more on its own
(MALLOC_MMAP_THRESHOLD_), so that a freed tensor leaves the resident set at once instead of staying
in the heap, where it would hide the next one. One torch thread throughout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine, median, setup_torch, table, verdict, write_section
from torch import nn

import initdoctor
from initdoctor import thresholds
from initdoctor.probe import Recorder, cotangent_loss, preserved
from initdoctor.weights import duplicate_groups

TIME_TARGET = 2.0  # check within 2x one bare forward+backward (DESIGN.md section 5)
MEM_TARGET = 1.1  # peak memory within 1.1x of the bare pass
START_TARGET = 0.3  # `initdoctor --version` within 0.3 s of `import torch`

# --- models ----------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2))
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 8, 4 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


def mlp(width: int, depth: int, d_in: int | None = None, d_out: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in or width
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


# name -> (description, model builder, batch builder)
MODELS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "resnet": ("ResNet-style CNN, 4 basic blocks (32-128 ch), 32x32 RGB, batch 32",
               ResNet, lambda: torch.randn(32, 3, 32, 32)),
    "transformer": ("Transformer encoder, 4 layers, d=256, 8 heads, 64 tokens, batch 16",
                    Transformer, lambda: torch.randint(0, 1000, (16, 64))),
    "mlp4096": ("MLP 1024-4096-4096-4096-10, ReLU, batch 64",
                lambda: mlp(4096, 4, d_in=1024), lambda: torch.randn(64, 1024)),
}
DEPTHS = (4, 16, 64, 256)
DEPTH_WIDTH = 256
ROWS = (1024, 2048, 4096, 8192, 16384)
ROW_COLS = 256


def bare_pass(model: nn.Module, x: torch.Tensor) -> None:
    """What a training step costs before the optimizer: forward, a scalar, backward into .grad."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    eps = torch.randn_like(out)
    (out * eps).sum().backward()
    model.zero_grad(set_to_none=True)


def check(model: nn.Module, x: torch.Tensor) -> None:
    initdoctor.check(model, x)


def floor(model: nn.Module, x: torch.Tensor) -> None:
    """What `check` costs at least with today's statistics: its pass under initdoctor's hooks (the
    reductions of every output and gradient, the function mode), the model's state kept and put
    back, and the weights' sums with the one host copy; no statistics built, no symmetry screen, no
    rules, no plan."""
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved(model), Recorder(model, dropout_off=True) as rec:
        out = model(x)
        got = torch.autograd.grad(cotangent_loss(out, 0), params, allow_unused=True)
        rec.host_copy({id(p): g for p, g in zip(params, got) if g is not None})


def alternate(model: nn.Module, x: torch.Tensor, reps: int) -> dict:
    """Bare pass, check and the floor, in turn after one untimed call of each: medians of wall and
    CPU time.

    CPU time (this process, one torch thread) leaves out the time other processes hold the cores, so
    its ratio is the steadier figure on a shared machine; the verdicts use it.
    """
    fns = (("bare", bare_pass), ("check", check), ("floor", floor))
    for _, fn in fns:
        fn(model, x)
    wall: dict[str, list[float]] = {name: [] for name, _ in fns}
    cpu: dict[str, list[float]] = {name: [] for name, _ in fns}
    for _ in range(reps):
        for name, fn in fns:
            w0, c0 = time.perf_counter(), time.process_time()
            fn(model, x)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    ratios = [c / b for b, c in zip(cpu["bare"], cpu["check"])]
    return {"bare": median(wall["bare"]), "check": median(wall["check"]),
            "bare_cpu": median(cpu["bare"]), "check_cpu": median(cpu["check"]),
            "wall_ratio": median([c / b for b, c in zip(wall["bare"], wall["check"])]),
            "ratio": median(ratios), "range": (min(ratios), max(ratios)),
            "floor": median([f / b for b, f in zip(cpu["bare"], cpu["floor"])])}


# --- 1. time against the bare pass -----------------------------------------------------------


def time_models(reps: int) -> list[dict]:
    rows = []
    for name, (desc, build, batch) in MODELS.items():
        torch.manual_seed(0)
        model, x = build(), batch()
        r = alternate(model, x, reps)
        r.update(name=name, desc=desc, params=sum(p.numel() for p in model.parameters()))
        rows.append(r)
        print(f"  {name}: CPU bare {r['bare_cpu'] * 1e3:.0f} ms, check {r['check_cpu'] * 1e3:.0f} ms", flush=True)
    return rows


def time_depths(reps: int) -> list[dict]:
    rows = []
    for depth in DEPTHS:
        torch.manual_seed(0)
        model, x = mlp(DEPTH_WIDTH, depth), torch.randn(64, DEPTH_WIDTH)
        r = alternate(model, x, reps if depth < 64 else max(3, reps // 2))
        r.update(depth=depth, per_layer=(r["check_cpu"] - r["bare_cpu"]) / depth)
        rows.append(r)
        print(f"  depth {depth}: CPU bare {r['bare_cpu'] * 1e3:.0f} ms, check {r['check_cpu'] * 1e3:.0f} ms",
              flush=True)
    return rows


# --- 2. duplicate-unit detection against the number of rows ---------------------------------


def dup_rows(n: int, pattern: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    if pattern == "distinct":
        return torch.randn(n, ROW_COLS, generator=g)
    if pattern == "all equal":
        return torch.randn(1, ROW_COLS, generator=g).expand(n, ROW_COLS).contiguous()
    half = torch.randn(n // 2, ROW_COLS, generator=g)  # every row twice, in random order
    return torch.cat([half, half])[torch.randperm(n, generator=g)]


def time_duplicates(reps: int) -> list[dict]:
    tol = thresholds.DUP_TOL["default"]
    rows = []
    for pattern in ("distinct", "all equal", "pairs"):
        for n in ROWS:
            w = dup_rows(n, pattern)
            duplicate_groups(w, tol)
            ts = []
            for _ in range(reps):
                t0 = time.process_time()
                groups = duplicate_groups(w, tol)
                ts.append(time.process_time() - t0)
            t = min(ts)  # a microbenchmark: the least-disturbed run
            rows.append({"pattern": pattern, "rows": n, "t": t, "per_row": t / n, "groups": len(groups)})
    return rows


# --- 3. peak memory, one fresh process per figure -------------------------------------------


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def mem_child(name: str, what: str) -> None:
    setup_torch()
    _, build, batch = MODELS[name]
    model, x = build(), batch()
    bare_pass(model, x)  # first-call allocations (kernels' workspaces) belong to neither figure
    gc.collect()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    (bare_pass if what == "bare" else check)(model, x)
    peak = _status("VmHWM")
    print(json.dumps({"base": base, "peak": peak}))


def measure_memory(reps: int) -> list[dict]:
    if not Path("/proc/self/clear_refs").exists():
        print("  /proc/self/clear_refs missing (not Linux?): memory skipped")
        return []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for name in MODELS:
        got: dict[str, list[dict]] = {"bare": [], "check": []}
        for _ in range(reps):
            for what in ("bare", "check"):
                out = subprocess.run([sys.executable, __file__, "--mem-child", name, what], env=env,
                                     capture_output=True, text=True, check=True).stdout
                got[what].append(json.loads(out.strip().splitlines()[-1]))
        grow = {k: median([r["peak"] - r["base"] for r in v]) for k, v in got.items()}
        peak = {k: median([r["peak"] for r in v]) for k, v in got.items()}
        base = median([r["base"] for r in got["bare"] + got["check"]])
        rows.append({"name": name, "base": base, "bare": grow["bare"], "check": grow["check"],
                     "ratio": grow["check"] / grow["bare"], "total_ratio": peak["check"] / peak["bare"]})
        print(f"  {name}: bare +{grow['bare'] / 2**20:.0f} MiB, check +{grow['check'] / 2**20:.0f} MiB", flush=True)
    return rows


# --- 4. start-up -------------------------------------------------------------------------------


def measure_startup(reps: int) -> dict:
    exe = Path(sys.executable)
    cli = exe.parent / "initdoctor"
    cmds = {"initdoctor --version": [str(cli), "--version"],
            "python -c 'import torch'": [str(exe), "-c", "import torch"]}
    ts: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(reps):
        for k, c in cmds.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(c, check=True, capture_output=True)
            ts[k].append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[k].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    # what initdoctor's own modules add, from one `-X importtime` run (microseconds, cumulative)
    err = subprocess.run([str(exe), "-X", "importtime", "-c", "import initdoctor.cli"], capture_output=True,
                         text=True, check=True).stderr
    cum = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            cum[m.group(4)] = int(m.group(2))
    own = (cum.get("initdoctor.cli", 0) - cum.get("torch", 0)) / 1e6
    return {"median": {k: median(v) for k, v in ts.items()}, "runs": ts, "own": own,
            "cpu": {k: median(v) for k, v in cpu.items()}}


# --- report ------------------------------------------------------------------------------------


def mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def profile_checks() -> None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("--profile needs pyinstrument: .venv/bin/pip install pyinstrument")
        return
    for name, (_, build, batch) in MODELS.items():
        torch.manual_seed(0)
        model, x = build(), batch()
        check(model, x)
        p = Profiler(interval=0.001)
        p.start()
        check(model, x)
        p.stop()
        print(f"\n--- profile of one check: {name}")
        print(p.output_text(unicode=False, color=False, show_all=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    ap.add_argument("--profile", action="store_true", help="also profile one check of each model")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions for the time figures")
    ap.add_argument("--mem-reps", type=int, default=1, help="fresh processes per memory figure")
    ap.add_argument("--start-reps", type=int, default=7, help="runs of each start-up command")
    ap.add_argument("--mem-child", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        mem_child(*args.mem_child)
        return
    setup_torch()
    here = machine()
    print(f"machine: {here}")
    print("method: one torch thread; bare pass, check and floor in turn (A B C A B C); medians; "
          "verdicts on CPU time (time.process_time), which leaves out time other processes take")
    t_all = time.perf_counter()

    print("\ncheck against one bare forward+backward ...", flush=True)
    models = time_models(args.reps)
    t1 = table(["model", "params", "bare ms", "check ms", "CPU bare ms", "CPU check ms", "wall ratio",
                "CPU ratio (min–max)", "floor (CPU)", f"within {TIME_TARGET:g}x"],
               [[f"{r['name']}: {r['desc']}", f"{r['params'] / 1e6:.1f}M", f"{r['bare'] * 1e3:.0f}",
                 f"{r['check'] * 1e3:.0f}", f"{r['bare_cpu'] * 1e3:.0f}", f"{r['check_cpu'] * 1e3:.0f}",
                 f"{r['wall_ratio']:.2f}", f"{r['ratio']:.2f} ({r['range'][0]:.2f}–{r['range'][1]:.2f})",
                 f"{r['floor']:.2f}", verdict(r["ratio"] <= TIME_TARGET)] for r in models])
    print(t1)

    print(f"\nratio against depth (MLP, width {DEPTH_WIDTH}, batch 64) ...", flush=True)
    depths = time_depths(args.reps)
    t2 = table(["depth", "CPU bare ms", "CPU check ms", "CPU ratio", "wall ratio", "extra CPU ms per layer",
                "floor (CPU)", f"within {TIME_TARGET:g}x"],
               [[str(r["depth"]), f"{r['bare_cpu'] * 1e3:.1f}", f"{r['check_cpu'] * 1e3:.1f}", f"{r['ratio']:.2f}",
                 f"{r['wall_ratio']:.2f}", f"{r['per_layer'] * 1e3:.2f}", f"{r['floor']:.2f}",
                 verdict(r["ratio"] <= TIME_TARGET)] for r in depths])
    print(t2)

    print(f"\nduplicate_groups against rows ({ROW_COLS} columns) ...", flush=True)
    dups = time_duplicates(5)
    t3 = table(["rows", *[f"{p} ms" for p in ("distinct", "all equal", "pairs")],
                *[f"{p} µs/row" for p in ("distinct", "all equal", "pairs")]],
               [[str(n)] + [f"{r['t'] * 1e3:.1f}" for r in rs] + [f"{r['per_row'] * 1e6:.2f}" for r in rs]
                for n in ROWS for rs in [[r for r in dups if r["rows"] == n]]])
    print(t3)
    growth = {p: (lambda rs: rs[-1]["per_row"] / rs[0]["per_row"])([r for r in dups if r["pattern"] == p])
              for p in ("distinct", "all equal", "pairs")}
    lin = "; ".join(f"{p}: time per row x{g:.2f} from {ROWS[0]} to {ROWS[-1]} rows" for p, g in growth.items())
    print(lin)

    print("\npeak memory over the resident set before the pass (fresh process each) ...", flush=True)
    mem = measure_memory(args.mem_reps)
    t4 = table(["model", "resident before MiB", "bare +MiB", "check +MiB", "check / bare (growth)",
                "check / bare (total peak)", f"within {MEM_TARGET:g}x"],
               [[r["name"], mib(r["base"]), mib(r["bare"]), mib(r["check"]), f"{r['ratio']:.2f}",
                 f"{r['total_ratio']:.2f}", verdict(r["ratio"] <= MEM_TARGET)] for r in mem])
    print(t4)

    print(f"\nstart-up ({args.start_reps} runs each, alternating) ...", flush=True)
    st = measure_startup(args.start_reps)
    cli, torch_s = st["median"]["initdoctor --version"], st["median"]["python -c 'import torch'"]
    t5 = table(["command", "median s", "CPU median s", "runs s"],
               [[k, f"{v:.2f}", f"{st['cpu'][k]:.2f}", " ".join(f"{t:.2f}" for t in st["runs"][k])]
                for k, v in st["median"].items()])
    diff = cli - torch_s
    diff_cpu = st["cpu"]["initdoctor --version"] - st["cpu"]["python -c 'import torch'"]
    start_line = (f"`initdoctor --version` - `import torch` = {diff:+.2f} s wall, {diff_cpu:+.2f} s CPU "
                  f"(target within {START_TARGET} s: {verdict(diff <= START_TARGET)}); initdoctor's own modules "
                  f"import in {st['own']:.2f} s (`-X importtime`, one run)")
    print(t5)
    print(start_line)
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f} s")

    if args.profile:
        profile_checks()
    if args.write:
        body = "\n\n".join([
            f"Measured {here}; `python benchmarks/check_cost.py --reps {args.reps}` ({total:.0f} s).",
            "### Time against one bare forward+backward",
            "The bare pass is `model(x)`, a random cotangent `(out * eps).sum()` and `.backward()`, "
            "in training mode: what `check` itself runs, without the hooks, statistics, rules and plan. "
            "Wall-clock figures are medians; ratios are medians of each alternating pair's ratio. On a "
            "shared machine the wall clock also counts the time other processes hold the cores, so "
            "the verdict uses CPU time (`time.process_time`, one torch thread). *floor* is the CPU "
            "ratio of what `check` costs at least with today's statistics (`floor` in the script: "
            "the pass under initdoctor's hooks, the model's state kept and put back, the weights' sums "
            "and the host copy; no statistics built, no symmetry screen, no rules), measured in turn "
            "with the other two.",
            t1,
            f"### Against depth (MLP, width {DEPTH_WIDTH}, batch 64)",
            t2,
            f"### Duplicate-unit detection against width (`duplicate_groups`, {ROW_COLS} columns, CPU time, "
            "least of 5)",
            t3,
            lin + ".",
            "### Peak memory",
            "Growth of the resident set's high-water mark over the resident set just before the pass "
            "(model, batch and torch loaded, one bare pass done), each figure from a fresh process; "
            "*total peak* divides the high-water marks themselves, so it includes the model and torch.",
            t4,
            "### Start-up",
            t5,
            start_line + ".",
        ])
        write_section("check_cost", body)


if __name__ == "__main__":
    main()
