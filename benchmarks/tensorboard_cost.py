"""What writing the diagnosis as `initdoctor` plugin data costs on a sampled step, against the
per-layer scalars that the tab replaces (the same run, the same writer, the same diagnosis).

    python benchmarks/tensorboard_cost.py            # print the table
    python benchmarks/tensorboard_cost.py --write    # ... and update docs/performance.md

For each model, both writes take turns (plugin data, scalars, plugin data, ...) into one
SummaryWriter, so disk and load fall on both alike; the figure is the ratio of the medians of CPU
time per sampled step. The goal: the plugin data costs no more than the scalars (ratio <= 1).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from common import machine, median, quartiles, setup_torch, table, verdict, write_section
from torch import nn

import initdoctor
from initdoctor.report import tensorboard as tb

ROUNDS = 200


def relu_mlp(depth: int, width: int = 128) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def measure(depth: int, log_dir: str) -> dict:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    model = relu_mlp(depth)
    diag = initdoctor.check(model, torch.randn(64, 128))
    writer = SummaryWriter(log_dir)
    scalars = tb.scalars(diag, training=True)
    plugin_t, scalar_t = [], []
    try:
        for step in range(ROUNDS):
            t0 = time.process_time_ns()
            tb.write_plugin_data(writer, diag, step, source="watch")
            t1 = time.process_time_ns()
            for tag, value in tb.scalars(diag, training=True).items():
                writer.add_scalar(tag, value, step)
            t2 = time.process_time_ns()
            plugin_t.append((t1 - t0) / 1e6)
            scalar_t.append((t2 - t1) / 1e6)
    finally:
        writer.close()
    payload = tb.payload(diag, source="watch", step=0)
    return {"depth": depth, "layers": len(diag.stats.ran()), "scalars": len(scalars), "bytes": len(payload),
            "plugin": plugin_t, "scalar": scalar_t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = ap.parse_args()
    setup_torch()
    rows, ratios = [], []
    tmp = tempfile.mkdtemp(prefix="initdoctor-tbcost-")
    try:
        for depth in (8, 32, 128):
            r = measure(depth, f"{tmp}/d{depth}")
            p, s = median(r["plugin"]), median(r["scalar"])
            ratio = p / s
            ratios.append(ratio)
            pq, sq = quartiles(r["plugin"]), quartiles(r["scalar"])
            rows.append([f"{r['layers']}-layer ReLU MLP", str(r["scalars"]), f"{r['bytes'] / 1024:.1f} KiB",
                         f"{p:.2f} ms ({pq[0]:.2f}-{pq[1]:.2f})", f"{s:.2f} ms ({sq[0]:.2f}-{sq[1]:.2f})",
                         f"{ratio:.2f}"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join([
        f"Measured on: {machine()}.",
        "",
        table(["model", "scalars per step", "plugin data per step", "plugin data (CPU, median, IQR)",
               "scalars (CPU, median, IQR)", "ratio"], rows),
        "",
        f"Goal: writing the plugin data costs no more than the scalars on a sampled step (ratio <= 1): "
        f"{verdict(max(ratios) <= 1.0)} (worst ratio {max(ratios):.2f}, {ROUNDS} interleaved rounds each).",
    ])
    print(text)
    if args.write:
        write_section("tensorboard_cost", text)


if __name__ == "__main__":
    main()
