"""Checkpoint checks that need a process boundary.

* Bit-exact resume of a ``shard``ed model on 2 ranks: each rank must own its RNG (in-process
  ranks are threads sharing one), so it runs under ``td.spawn``; one spawn covers the
  uninterrupted run, the interrupted one and the resumed one.
* Crash safety: a real process saving checkpoints is stopped while a save is being written
  and killed with SIGKILL; the previous checkpoint must load and the partial one be ignored.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from _checkpoint_models import Net, loss_fn
from torch.utils.data import TensorDataset

import torchdist as td
from torchdist import checkpoint
from torchdist.data import shard_loader
from torchdist.sharding import shard
from torchdist.transforms import compose, optimize, value_and_grad


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _bit_exact_sharded(topo, path):
    g = torch.Generator().manual_seed(123)
    data = TensorDataset(torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g))

    def fresh(seed):
        torch.manual_seed(seed)  # same initial weights on every rank
        model = shard(Net(hidden=15), topo)  # uneven shards
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        loader = shard_loader(data, topo, batch_size=4, seed=1)
        td.set_seed(seed + 1000, topo, per_rank=True)  # then a different RNG on each rank
        state = td.TrainState(model=model, optimizer=opt, scheduler=sched)
        return state, compose(optimize())(value_and_grad(loss_fn)), loader

    def train(state, step, loader, steps):
        done = 0
        while done < steps:
            for batch in loader:
                state, _ = step(state, batch)
                done += 1
                if done == steps:
                    break
        return state

    def snapshot(state, loader):
        opt_state = state.optimizer.state_dict()["state"]
        return {
            "weights": [_local(p) for p in state.model.parameters()],
            "adam": [_local(t) for s in opt_state.values() for t in s.values()],
            "sched": state.scheduler.state_dict(),
            "step": state.step,
            "draws": (torch.rand(4), random.random(), np.random.rand(3)),
            "next_batch": next(iter(loader)),
        }

    state, step, loader = fresh(0)
    uninterrupted = snapshot(train(state, step, loader, 6), loader)
    state, step, loader = fresh(0)
    checkpoint.save(path, train(state, step, loader, 3), topo, loader=loader)
    state, step, loader = fresh(7)  # fresh objects, other weights, other RNG states
    state = checkpoint.load(path, state, topo, loader=loader)
    resumed = snapshot(train(state, step, loader, 3), loader)
    return uninterrupted, resumed


@pytest.mark.multiprocess
def test_bit_exact_resume_of_a_sharded_model_on_two_ranks(tmp_path):
    results = td.spawn(_bit_exact_sharded, 2, str(tmp_path), timeout=120)
    draws = []
    for a, b in results:
        assert a["step"] == b["step"] == 6
        assert all(map(torch.equal, a["weights"], b["weights"]))
        assert len(a["adam"]) == 12 and all(map(torch.equal, a["adam"], b["adam"]))
        assert a["sched"] == b["sched"]
        (ta, ra, na), (tb, rb, nb) = a["draws"], b["draws"]
        assert torch.equal(ta, tb) and ra == rb and np.array_equal(na, nb)
        assert all(map(torch.equal, a["next_batch"], b["next_batch"]))
        draws.append(ta)
    assert not torch.equal(draws[0], draws[1])  # each rank restored its own RNG state


# --------------------------------------------------------------------------- crash safety
def _save_forever(path: str) -> None:
    """Save step 1, 2, 3, ... of a 32 MB model whose every weight equals its step."""
    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)])
    topo = td.Topology.single()
    for step in itertools.count(1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        checkpoint.save(path, td.TrainState(model=model, step=step), topo)


def _partial_save(path: str) -> str | None:
    """A ``.tmp-`` directory whose DCP data file is being written, if there is one."""
    for name in os.listdir(path):
        if ".tmp-" in name:
            tmp = os.path.join(path, name)
            try:
                files = os.listdir(tmp)
                if (
                    any(
                        f.endswith(".distcp") and os.path.getsize(os.path.join(tmp, f)) > 0
                        for f in files
                    )
                    and checkpoint.MARKER not in files
                ):
                    return tmp
            except FileNotFoundError:  # renamed meanwhile: that save completed
                pass
    return None


@pytest.mark.multiprocess
def test_a_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    proc = multiprocessing.get_context("fork").Process(target=_save_forever, args=(str(tmp_path),))
    gc.freeze()  # an earlier in-process world's garbage must not be finalised in the child
    try:
        proc.start()
    finally:
        gc.unfreeze()
    deadline = time.monotonic() + 60
    partial = None
    try:
        while partial is None and time.monotonic() < deadline:
            done = [n for n in os.listdir(tmp_path) if n.startswith("step_") and ".tmp-" not in n]
            if done and _partial_save(str(tmp_path)):
                os.kill(proc.pid, signal.SIGSTOP)  # freeze it, then look again
                partial = _partial_save(str(tmp_path))
                if partial is None:
                    os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.001)
        assert partial is not None, "never caught a save in the middle of writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    partial_step = int(os.path.basename(partial).split(".tmp-")[0].removeprefix("step_"))
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(8)])
    state = checkpoint.load(tmp_path, td.TrainState(model=model), td.Topology.single())
    assert state.step == partial_step - 1  # the previous checkpoint, complete
    assert all(bool((p == float(state.step)).all()) for p in model.parameters())
    assert os.path.isdir(partial)  # left behind, ignored, and cleaned by the next keep=
    checkpoint.save(tmp_path, td.TrainState(model=model, step=100), td.Topology.single(), keep=1)
    assert os.listdir(tmp_path) == ["step_00000100"]
