"""The classic network of the Xavier argument: 2 inputs, 3 sigmoid hidden units, 1 output, every weight
the same constant. All hidden units compute the same function and receive the same update, forever.

    initdoctor check examples/xavier_classic.py --fix
"""

import torch
from torch import nn


def build_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
    for layer in (model[0], model[2]):
        nn.init.constant_(layer.weight, 0.5)
        nn.init.constant_(layer.bias, 0.0)
    return model


def example_input() -> torch.Tensor:
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
