"""The model's output read as logits: where its softmax starts (ID301 at the output layer).

`check`'s own loss is a random projection of the output, which judges the network's Jacobian but not
whether a softmax over the output would start pinned on one class. An output layer tied to the input
embedding scores the input's own tokens (weight tying is made for a softmax over a vocabulary): its
outputs are logits, whatever loss the probe uses. So the loss that `check` hands to the probe first
reduces each floating output over its last dim (`softmax_tails`), outside the probe's forward pass and
without gradient, and `with_output_softmax` adds the softmax after such a head to the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import thresholds as T
from . import vocab
from .lineage import tensors
from .stats import ActivationStats, ModelStats


@dataclass(frozen=True)
class Tails:
    """The softmax over the last dim of one output, over all its rows (positions)."""

    pinned: float  # share of rows that put more than SIGMOID_HI of their probability on one class
    logits_std: float  # median over classes of the per-class std over rows
    rows: int


def softmax_tails(output) -> dict[int, Tails]:
    """Per class count (last dim), the softmax of every floating output of at least 2 dims."""
    out: dict[int, Tails] = {}
    with torch.no_grad():
        for t in tensors(output):
            if not t.is_floating_point() or t.dim() < 2 or t.shape[-1] < 2 or t.numel() == 0:
                continue
            x = t.detach().float().reshape(-1, t.shape[-1])
            top = torch.softmax(x, dim=-1).amax(dim=-1)
            pinned = float((top > T.SIGMOID_HI).double().mean())
            std = float(x.std(dim=0).median()) if x.shape[0] > 1 else 0.0
            out.setdefault(t.shape[-1], Tails(pinned, std, x.shape[0]))
    return out


def with_output_softmax(stats: ModelStats, observed: dict[int, Tails]) -> ModelStats:
    """The statistics with the softmax after each output layer tied to an embedding (its logits)."""
    acts = list(stats.activations)
    layers = []
    index = max((a.index for a in acts), default=-1) + 1
    for lay in stats.layers:
        tails = observed.get(lay.fan_out) if lay.is_output and lay.tied_embedding else None
        if tails is None:
            layers.append(lay)
            continue
        acts.append(ActivationStats(f"{lay.name}:{vocab.SOFTMAX}", vocab.SOFTMAX, lay.name, lay.name, index=index,
                                    calls=1, units=lay.fan_out, saturated=tails.pinned,
                                    preact_std=tails.logits_std))
        index += 1
        layers.append(replace(lay, saturated=tails.pinned))
    return replace(stats, layers=layers, activations=acts)
