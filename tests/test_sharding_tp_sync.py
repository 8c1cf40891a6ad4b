"""Tensor parallelism inside, plain data parallelism (sync_grads) outside: DTensor gradients are
averaged over "dp" through their local shards. Parity with one process on the global batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.sharding import parallelize
from torchdist.transforms import (
    accumulate,
    clip_grads,
    compose,
    optimize,
    sync_grads,
    value_and_grad,
)
from torchdist.transforms._accumulate import split_batch

PLAN = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, d), nn.Linear(d, 4)
        self.blocks = nn.ModuleList([Block(d), Block(d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def _loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _train(topo, model0, data, tp: bool, micro: int):
    model = copy.deepcopy(model0)
    if tp:
        model = parallelize(model, topo, PLAN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inner = [accumulate(micro)] if micro > 1 else []
    step = compose(optimize(opt), clip_grads(0.5), sync_grads(topo), *inner)(value_and_grad(_loss))
    state, norms = step.init(td.TrainState(model, opt)), []
    for x, y in data:
        mine = td.split_between_ranks({"x": x, "y": y}, topo, axis="dp")
        for part in split_batch((mine["x"], mine["y"]), micro):  # accumulate: one call each
            state, metrics = step(state, part)
        norms.append(metrics["grad_norm"].item())
    weights = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }
    return weights, norms, step.report(state)["sync_grads"]


@pytest.mark.parametrize("micro", [1, 2])
def test_tp_with_sync_grads_over_dp_matches_one_process(micro):
    torch.manual_seed(0)
    model0 = Net()
    data = [(torch.randn(16, 8), torch.randn(16, 4)) for _ in range(3)]
    ref_weights, ref_norms, _ = _train(td.Topology.single(), model0, data, False, micro)
    for weights, norms, info in td.in_process(
        _train, 4, model0, data, True, micro, dp_replicate=2, tp=2
    ):
        assert "steps_aside" not in info  # the dp axis has 2 ranks: sync_grads does the work
        assert norms == pytest.approx(ref_norms, abs=1e-6)
        for name, ref in ref_weights.items():
            torch.testing.assert_close(weights[name], ref, atol=1e-6, rtol=0)
