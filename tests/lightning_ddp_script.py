"""Run by test_integrations_lightning.py: a 2-process CPU DDP fit (gloo) under InitDoctorCallback.

Lightning's `ddp` strategy starts the second process by running this script again.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def main(out: str) -> None:
    import lightning.pytorch as pl

    from initdoctor.integrations.lightning import InitDoctorCallback

    torch.set_num_threads(1)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
            self.initial = {k: v.clone() for k, v in self.net.state_dict().items()}

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            (x,) = batch
            return self(x).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    cb = InitDoctorCallback(every=1, log_dir=f"{out}/initdoctor", check_at_start=False, warn=False)
    model = Net()
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=1, callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    if trainer.global_rank == 0:
        layers = {lay.name: {"samples": lay.samples, "q": lay.q, "signal": lay.signal}
                  for lay in cb.doctor.last.stats.ran()}
        torch.save({"ranks": trainer.world_size, "initial": model.initial, "x": x, "layers": layers},
                   f"{out}/rank0.pt")


if __name__ == "__main__":
    main(sys.argv[1])
