"""Keep watch over a PyTorch Lightning fit with InitDoctorCallback (pip install initdoctor[lightning]).

    python examples/lightning_watch.py            # then: tensorboard --logdir runs/lightning
    python examples/lightning_watch.py --steps 40 --every 10 --log-dir /tmp/runs

An 8-layer sigmoid MLP drawn from N(0, 1) saturates (ID301): the callback checks the first batch
before training and says so once, through Lightning's logging and a Python warning; every `every`
steps it samples, and the metrics land in the run of Lightning's TensorBoard logger, beside the loss.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn

from initdoctor.integrations.lightning import InitDoctorCallback


class SigmoidMLP(pl.LightningModule):
    def __init__(self, depth: int = 8, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            lin = nn.Linear(16 if i == 0 else width, width)
            nn.init.normal_(lin.weight, 0.0, 1.0)  # far too large for a sigmoid
            layers += [lin, nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 512) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1))  # a learnable rule: which of the first four inputs is largest
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


def main(steps: int = 200, every: int = 50, log_dir: str = "runs/lightning") -> dict:
    pl.seed_everything(0, verbose=False)
    doctor = InitDoctorCallback(every=every)
    trainer = pl.Trainer(max_steps=steps, callbacks=[doctor], default_root_dir=log_dir, accelerator="cpu",
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(SigmoidMLP(), data())
    print(f"TensorBoard run: {trainer.logger.log_dir}")
    return {"run": trainer.logger.log_dir, "samples": [h["step"] for h in doctor.doctor.history],
            "start": sorted(doctor.check.codes()) if doctor.check else []}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--log-dir", default="runs/lightning")
    a = p.parse_args()
    main(a.steps, a.every, a.log_dir)
