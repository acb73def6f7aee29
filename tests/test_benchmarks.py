"""The benchmark scripts of `make bench`, run for a few steps: they still run against the current
code, and the twins they train under a monitor end bit-identical to the twin without one. The
figures of such short runs mean nothing; docs/performance.md holds the real runs.
(check_cost.py, a minute even at its smallest settings, is left to `make bench`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| monitor") and not line.startswith("| model")]


def test_watch_overhead_runs_and_every_twin_trains_as_the_bare_one():
    r = _run("benchmarks/watch_overhead.py", "--rounds", "20", "--block", "10", "--models", "Transformer")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row[0]: row for row in _rows(r.stdout)}
    assert {"no monitor", "watch every=1", "watch every=1, step(wait=False)", "watch every=10, step(wait=False)",
            "watch every=100", "hand hooks .std().item()", "fastai-style ActivationStats"} <= set(rows)
    assert all(row[-1] == "yes" for row in rows.values())  # "twin identical": training unchanged
    assert "twins take runs of 10 steps" in r.stdout
    bad = _run("benchmarks/watch_overhead.py", "--rounds", "20", "--block", "10", "--run", "3")
    assert bad.returncode != 0 and "multiple of --run" in bad.stderr


def test_gpu_cost_runs_on_the_cpu_and_says_so_where_there_is_no_cuda():
    r = _run("benchmarks/gpu_cost.py", "--device", "cpu", "--watch-only", "--rounds", "20", "--block", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(r.stdout)
    assert {(row[0], row[1]) for row in rows} >= {
        (m, v) for m in ("MLP", "CNN", "Transformer")
        for v in ("every=1, wait=False", "every=10, wait=False", "every=100, wait=False", "every=1, step()")}
    if not torch.cuda.is_available():  # what `make bench` prints on a machine like this one
        r = _run("benchmarks/gpu_cost.py")
        assert r.returncode == 0 and "no CUDA" in r.stdout
