"""Checkpoints of pipelined models: a stage keeps its parameters' names, so ``checkpoint.save``
from pp=2 loads into the plain model on one rank and back, bit for bit (model and optimizer).

Ranks are threads with real gloo groups (``td.in_process``); DCP writes real files.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from _pipeline_models import Model
from _seeded import seeded

import torchdist as td
from torchdist.sharding import pipeline
from torchdist.transforms import compose, optimize, pipeline_value_and_grad, value_and_grad

MODEL0 = seeded(0, Model)
_GEN = torch.Generator().manual_seed(2)
BATCH = (torch.randn(8, 6, generator=_GEN), torch.randn(8, 3, generator=_GEN))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # has state to save


def _snapshot(state) -> dict[str, torch.Tensor]:
    """Every parameter and momentum buffer by parameter name."""
    names = {id(p): n for n, p in state.model.named_parameters()}
    out = {f"param/{n}": p.detach().clone() for n, p in state.model.named_parameters()}
    for p, buf in state.optimizer.state.items():
        out[f"momentum/{names[id(p)]}"] = buf["momentum_buffer"].clone()
    return out


def _assert_bit_exact(part: dict, whole: dict) -> None:
    assert part and set(part) <= set(whole)
    for key, value in part.items():
        assert torch.equal(value, whole[key]), key


def test_pipelined_checkpoint_loads_into_a_plain_model_and_back(tmp_path):
    def pipelined_save(topo):
        model = pipeline(copy.deepcopy(MODEL0), topo, schedule="Interleaved1F1B")
        opt = _sgd(model)
        step = compose(optimize(opt))(pipeline_value_and_grad(F.mse_loss, microbatches=2))
        state = step(td.TrainState(model, opt), BATCH)[0]
        td.checkpoint.save(tmp_path / "from_pp", state, topo)
        return _snapshot(state)

    def plain(topo, load_from):
        model = copy.deepcopy(MODEL0)
        opt = _sgd(model)
        state = td.TrainState(model, opt)
        if load_from is None:  # train one step, save
            step = compose(optimize(opt))(value_and_grad(lambda m, b: F.mse_loss(m(b[0]), b[1])))
            state = step(state, BATCH)[0]
            td.checkpoint.save(tmp_path / "from_plain", state, topo)
        else:
            state = td.checkpoint.load(load_from, state, topo)
        return _snapshot(state), int(state.step)

    def pipelined_load(topo):
        model = pipeline(copy.deepcopy(MODEL0), topo, schedule="1F1B")
        state = td.checkpoint.load(tmp_path / "from_plain", td.TrainState(model, _sgd(model)), topo)
        return _snapshot(state), int(state.step)

    saved = td.in_process(pipelined_save, 2, pp=2)
    assert not set(saved[0]) & set(saved[1])  # each stage saved its own names
    [(loaded, step)] = td.in_process(plain, 1, tmp_path / "from_pp")
    assert step == 1 and set(loaded) == set(saved[0]) | set(saved[1])
    for part in saved:
        _assert_bit_exact(part, loaded)

    [(whole, _)] = td.in_process(plain, 1, None)
    for part, step in td.in_process(pipelined_load, 2, pp=2):
        assert step == 1
        _assert_bit_exact(part, whole)
    # And the two runs trained the same: the pipelined step is the plain one.
    assert max((whole[k] - loaded[k]).abs().max().item() for k in whole) <= 1e-6
