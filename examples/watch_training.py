"""Keep watch over a short training run on the digits data set, writing TensorBoard files under runs/.

    python examples/watch_training.py            # then: tensorboard --logdir runs
    python examples/watch_training.py --steps 50 --log-dir /tmp/runs

The network is a 10-layer tanh MLP drawn from U(-0.1, 0.1): its signal and gradients die with depth,
which initdoctor reports at the first sampled step (once, as a warning). A second run watches the
same network after `initdoctor.fix`.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import initdoctor


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target)


def build(depth: int = 10, width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    dims = [64] + [width] * depth
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b)
        nn.init.uniform_(lin.weight, -0.1, 0.1)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def run(model: nn.Module, log_dir: str, steps: int, every: int) -> float:
    from torch.utils.tensorboard import SummaryWriter

    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    # One writer for the training's own scalars and initdoctor's: the loss sits beside the diagnosis.
    writer = SummaryWriter(log_dir)
    try:
        with initdoctor.watch(model, writer=writer, every=every) as doctor:
            for step in range(steps):
                idx = torch.randint(0, len(x), (128,), generator=gen)
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                writer.add_scalar("train/loss", loss.item(), step)
                doctor.step()
    finally:
        writer.close()
    return float(loss.detach())


def main(steps: int = 200, every: int = 20, log_dir: str = "runs") -> dict:
    sick = build()
    loss_sick = run(sick, os.path.join(log_dir, "sick"), steps, every)
    cured = build()
    x, _ = digits()
    initdoctor.fix(cured, x[:256])
    loss_cured = run(cured, os.path.join(log_dir, "cured"), steps, every)
    print(f"final loss: sick {loss_sick:.3f}, cured {loss_cured:.3f}")
    print(f"TensorBoard: tensorboard --logdir {log_dir}   (then open the initdoctor tab)")
    return {"sick": loss_sick, "cured": loss_cured}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--log-dir", default="runs")
    a = ap.parse_args()
    main(a.steps, a.every, a.log_dir)
