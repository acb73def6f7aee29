"""Shared by the benchmark scripts: the machine's description, small statistics, table printing and
the `--write` update of docs/performance.md (each script owns one marked section of that page).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"


def setup_torch() -> None:
    """One intra-op thread and a fixed seed: the machine is shared, and one thread is what varies least."""
    torch.set_num_threads(1)
    torch.manual_seed(0)


def code_state() -> str:
    """The commit measured, and whether initdoctor/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "initdoctor"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "initdoctor (not a git checkout)"
    if not dirty:
        return f"initdoctor at {head}"
    code = [line for line in dirty.splitlines() if line.rstrip().endswith(".py")]
    if not code:  # documentation pages shipped in the package: nothing measured changed
        return f"initdoctor at {head} (uncommitted changes in initdoctor/ to non-Python files only)"
    return f"initdoctor at {head} with uncommitted changes to {len(code)} Python file(s) in initdoctor/"


def machine() -> str:
    """One line: CPU model, cores, load, Python, torch, date, the code measured."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"{cpu}, {os.cpu_count()} cores (load average {load} at the start), Python "
            f"{platform.python_version()}, torch {torch.__version__}, torch threads "
            f"{torch.get_num_threads()}, {datetime.date.today().isoformat()}, {code_state()}")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        x = xs[0] if xs else float("nan")
        return x, x
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table that also reads well on a terminal."""
    cols = list(zip(header, *rows))
    width = [max(len(str(c)) for c in col) for col in cols]
    right = [i > 0 for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, width, right)]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(width, right)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def write_section(name: str, text: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in docs/performance.md.

    A page without the markers (a stub) is replaced by a skeleton that has both scripts' sections.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    page = DOC.read_text() if DOC.exists() else ""
    if begin not in page or end not in page:
        page = SKELETON
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    print(f"updated {DOC.relative_to(ROOT)} ({name})")


SKELETON = """# Performance

Figures from `make bench`; each section is rewritten by its script run with `--write`.

## Cost of `initdoctor.check`

<!-- check_cost:begin -->
(run `python benchmarks/check_cost.py --write`)
<!-- check_cost:end -->

## Overhead of `initdoctor.watch`

<!-- watch_overhead:begin -->
(run `python benchmarks/watch_overhead.py --write`)
<!-- watch_overhead:end -->
"""
