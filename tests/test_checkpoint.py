"""`checkpoint.save` / `checkpoint.load`: bit-exact resume, resharding, keep and the newest pick.

One-process checks use a plain ``Topology.single()`` (no process group). Resharding runs in
in-process worlds (ranks are threads with real gloo groups): models and data are built outside
the rank functions, since threads share the RNG. The checks that need a process boundary (each
rank its own RNG; a save killed with SIGKILL) are in ``test_checkpoint_processes.py``, the
errors in ``test_checkpoint_errors.py``, safetensors in ``test_checkpoint_safetensors.py``.
"""

from __future__ import annotations

import copy
import json
import os
import random

import numpy as np
import torch
from _checkpoint_models import Net, loss_fn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.utils.data import TensorDataset

import torchdist as td
from torchdist import checkpoint
from torchdist.data import shard_loader
from torchdist.sharding import parallelize, replicate, shard
from torchdist.transforms import compose, optimize, value_and_grad


def dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def fresh(seed: int, topo=None):
    """New model, Adam, scheduler, loader and the step function."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    loader = shard_loader(dataset(), topo or td.Topology.single(), batch_size=8, seed=1)
    state = td.TrainState(model=model, optimizer=opt, scheduler=sched, extra={"note": "x"})
    step = compose(optimize())(value_and_grad(loss_fn))
    return state, step, loader


def train(state, step, loader, steps):
    done = 0
    while done < steps:
        for batch in loader:
            state, _ = step(state, batch)
            done += 1
            if done == steps:
                break
    return state


def draws():
    return torch.rand(4), random.random(), np.random.rand(3)


def snapshot(state, loader):
    opt_state = state.optimizer.state_dict()["state"]
    return {
        "weights": [p.detach().clone() for p in state.model.parameters()],
        "adam": [t.clone() for s in opt_state.values() for t in s.values()],
        "sched": state.scheduler.state_dict(),
        "step": state.step,
        "draws": draws(),
        "next_batch": next(iter(loader)),
    }


def assert_same_run(a, b):
    assert a["step"] == b["step"]
    assert all(map(torch.equal, a["weights"], b["weights"]))
    assert len(a["adam"]) == len(b["adam"]) > 0 and all(map(torch.equal, a["adam"], b["adam"]))
    assert a["sched"] == b["sched"]
    (ta, ra, na), (tb, rb, nb) = a["draws"], b["draws"]
    assert torch.equal(ta, tb) and ra == rb and np.array_equal(na, nb)
    assert all(map(torch.equal, a["next_batch"], b["next_batch"]))


# --------------------------------------------------------------------------- resume
def test_bit_exact_resume_of_a_plain_model_on_one_rank(tmp_path):
    td.set_seed(0)
    state, step, loader = fresh(0)
    uninterrupted = snapshot(train(state, step, loader, 6), loader)

    td.set_seed(0)
    state, step, loader = fresh(0)
    state = train(state, step, loader, 3)
    saved = checkpoint.save(tmp_path, state, td.Topology.single(), loader=loader)
    assert os.path.basename(saved) == "step_00000003"

    td.set_seed(99)  # a different RNG state and different initial weights
    state, step, loader = fresh(7)
    state = checkpoint.load(tmp_path, state, td.Topology.single(), loader=loader)
    assert state.step == 3 and state.extra == {"note": "x"}
    resumed = snapshot(train(state, step, loader, 3), loader)
    assert_same_run(uninterrupted, resumed)


def test_loss_scale_and_model_only_round_trip(tmp_path):
    topo = td.Topology.single()
    model = Net()
    scaler = td.LossScale(
        scale=torch.tensor(8.0), growth_tracker=torch.tensor(5, dtype=torch.int32)
    )
    saved = td.TrainState(model=model, step=4, transforms={"autocast": scaler})
    checkpoint.save(tmp_path, saved, topo)
    other = Net()
    placeholder = td.LossScale.initial("cpu")
    template = td.TrainState(model=other, transforms={"autocast": placeholder})
    state = checkpoint.load(tmp_path, template, topo)
    assert state.scaler.scale.item() == 8.0 and state.scaler.growth_tracker.item() == 5
    assert all(map(torch.equal, model.parameters(), other.parameters()))


def test_a_save_before_the_first_step_does_not_change_the_run(tmp_path):
    topo = td.Topology.single()

    def run(save_at_start):
        td.set_seed(0)
        state, step, loader = fresh(0)
        if save_at_start:
            checkpoint.save(tmp_path, state, topo, loader=loader)
            assert not state.optimizer.state  # still un-stepped
            state, step, loader = fresh(5)
            state = checkpoint.load(tmp_path, state, topo, loader=loader)
            assert not state.optimizer.state
        return snapshot(train(state, step, loader, 2), loader)

    assert_same_run(run(False), run(True))


# --------------------------------------------------------------------------- resharding
def _full(model, opt):
    options = StateDictOptions(full_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    flat = {f"model.{k}": v for k, v in model_sd.items()}
    for fqn, values in optim_sd["state"].items():
        flat.update({f"optim.{fqn}.{k}": v for k, v in values.items()})
    return {k: v.detach().clone() for k, v in flat.items()}


def _save_sharded(topo, path, init, batch):
    model = shard(copy.deepcopy(init), topo)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = (t.chunk(topo.world_size)[topo.rank] for t in batch)
    for _ in range(2):
        loss_fn(model.eval(), (x, y)).backward()
        opt.step()
        opt.zero_grad()
    checkpoint.save(path, td.TrainState(model=model, optimizer=opt, step=2), topo)
    return _full(model, opt)


def _load_sharded(topo, path, init):
    model = shard(copy.deepcopy(init), topo)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    state = checkpoint.load(path, td.TrainState(model=model, optimizer=opt), topo)
    return state.step, _full(model, opt)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_reshard_4_to_2_to_1(tmp_path):
    init, other = Net(hidden=9), Net(hidden=9)  # 9 rows: uneven shards on 4 and 2 ranks
    batch = dataset(16).tensors
    saved = td.in_process(_save_sharded, 4, str(tmp_path), init, batch, timeout=60)[0]
    marker = json.loads((tmp_path / "step_00000002" / checkpoint.MARKER).read_text())
    assert marker["world_size"] == 4 and marker["mesh"]["dp_shard"] == 4
    for step, loaded in td.in_process(_load_sharded, 2, str(tmp_path), other, timeout=60):
        assert step == 2
        assert_same_state(saved, loaded)
    model = copy.deepcopy(other)  # one plain process
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    checkpoint.load(tmp_path, td.TrainState(model=model, optimizer=opt), td.Topology.single())
    assert_same_state(saved, _full(model, opt))


def test_reshard_1_to_2(tmp_path):
    init = Net(hidden=9)
    model = copy.deepcopy(init)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    loss_fn(model.eval(), dataset(8).tensors).backward()
    opt.step()
    checkpoint.save(
        tmp_path, td.TrainState(model=model, optimizer=opt, step=1), td.Topology.single()
    )
    saved = _full(model, opt)
    for _, loaded in td.in_process(_load_sharded, 2, str(tmp_path), Net(hidden=9), timeout=60):
        assert_same_state(saved, loaded)


def test_replicated_and_tensor_parallel_models_save_and_load(tmp_path):
    init = Net(hidden=8)

    def save_both(topo, path, init):
        ddp = replicate(copy.deepcopy(init), topo)
        checkpoint.save(os.path.join(path, "ddp"), td.TrainState(model=ddp, step=1), topo)
        return True

    def save_tp(topo, path, init):
        tp = parallelize(copy.deepcopy(init), topo, {"inp": "colwise", "out": "rowwise"})
        checkpoint.save(os.path.join(path, "tp"), td.TrainState(model=tp, step=1), topo)
        back = parallelize(Net(hidden=8), topo, {"inp": "colwise", "out": "rowwise"})
        checkpoint.load(os.path.join(path, "tp"), td.TrainState(model=back), topo)
        return [p.full_tensor() for p in back.parameters()]

    td.in_process(save_both, 2, str(tmp_path), init, timeout=60, debug="INFO")
    for params in td.in_process(save_tp, 2, str(tmp_path), init, timeout=60, tp=2):
        assert all(map(torch.equal, params, init.parameters()))
    for kind in ("ddp", "tp"):
        model = Net(hidden=8)
        checkpoint.load(tmp_path / kind, td.TrainState(model=model), td.Topology.single())
        assert all(map(torch.equal, model.parameters(), init.parameters())), kind


# --------------------------------------------------------------------------- layout
def _save_plain(path, step, model=None, **kw):
    model = model or Net()
    return checkpoint.save(path, td.TrainState(model=model, step=step), td.Topology.single(), **kw)


def test_keep_and_newest_complete_wins(tmp_path):
    for step in (1, 2, 3):
        _save_plain(tmp_path, step)
    (tmp_path / "step_00000009.tmp-deadbeef").mkdir()  # an interrupted save
    model = Net()
    state = checkpoint.load(tmp_path, td.TrainState(model=model), td.Topology.single())
    assert state.step == 3
    _save_plain(tmp_path, 4, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]
    first = Net()
    _save_plain(tmp_path, 4, model=first)  # the same step again replaces it
    state = checkpoint.load(
        tmp_path / "step_00000004", td.TrainState(model=model), td.Topology.single()
    )
    assert all(map(torch.equal, model.parameters(), first.parameters()))
