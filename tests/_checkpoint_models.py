"""The model and loss the checkpoint tests train (in-process and real-process alike)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    """Small MLP with dropout, so training draws from each rank's RNG; ``hidden=15`` gives
    uneven shards over 2 or 4 ranks."""

    def __init__(self, hidden: int = 16, extra_layer: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, hidden)
        self.drop = nn.Dropout(0.25)
        self.out = nn.Linear(hidden, 3)
        if extra_layer:
            self.more = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.inp(x))))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
