"""sync_grads bookkeeping: a small first bucket; hooks that leave with the state holding them."""

from __future__ import annotations

import copy
import gc

import torch
import torch.nn as nn

import torchdist as td
from torchdist.transforms import sync_grads, value_and_grad


def _loss(model, x):
    return model(x).square().mean()


def test_hooks_are_removed_when_the_state_holding_them_is_dropped():
    model0 = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))

    def rank(topo):
        model, counts = copy.deepcopy(model0), []
        for _ in range(3):
            step = sync_grads(topo)(value_and_grad(_loss))
            state, _ = step(td.TrainState(model), torch.ones(2, 8))
            counts.append(len(model[0].weight._post_accumulate_grad_hooks or {}))
            del step, state
            gc.collect()
            counts.append(len(model[0].weight._post_accumulate_grad_hooks or {}))
        return counts

    for counts in td.in_process(rank, 2):
        assert counts == [1, 0] * 3  # one live hook per live state, none piling up


def test_first_bucket_is_small_so_communication_starts_early():
    torch.manual_seed(0)
    model0 = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))  # 4 x 16.6 KB
    x = torch.randn(4, 64)

    def rank(topo, first_mb):
        model = copy.deepcopy(model0)
        step = sync_grads(topo, bucket_mb=25.0, first_bucket_mb=first_mb)(value_and_grad(_loss))
        state, _ = step(td.TrainState(model), x)
        return state.transforms["sync_grads"].buckets, [p.grad.clone() for p in model.parameters()]

    one, grads_one = td.in_process(rank, 2, 25.0)[0]
    small, grads_small = td.in_process(rank, 2, 0.02)[0]
    assert one == 1 and small == 2  # the last layer alone first (reverse order), then the rest
    for a, b in zip(grads_one, grads_small):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
