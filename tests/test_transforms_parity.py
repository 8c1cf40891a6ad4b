"""Multi-rank numerics of the step transforms, in in-process worlds (ranks are threads).

The oracle is parity (DESIGN.md): N-rank training with ``sync_grads`` must end where
single-process training on the concatenated global batch ends, and ``sync_grads``' gradients
must be DDP's. The single-process reference is itself checked against a hand-written torch
loop, so the chain "N ranks == our single-process path == plain torch" holds end to end.

Ranks share the global RNG, so models and data are built outside the rank function and each
rank deep-copies them. Collectives are counted with the c10d sequence number of the
data-parallel group (every collective issued on the group advances it, whichever Python or C++
path issued it), and their dtypes/sizes with a counting wrapper around
``torch.distributed.all_reduce`` that calls the real collective.

DDP runs with ``debug="INFO"``: in torch 2.13 on CPU/gloo, constructing
``DistributedDataParallel`` under ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` segfaults, in plain torch
too (threads or processes), so those worlds use the next-most-verbose level.
"""

from __future__ import annotations

import collections
import copy
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import torchdist as td
from torchdist.transforms import (
    accumulate,
    clip_grads,
    compose,
    optimize,
    sync_grads,
    value_and_grad,
)
from torchdist.transforms._accumulate import split_batch

STEPS = 5
GLOBAL_BATCH = 32
LR = 0.1
MAX_NORM = 0.3  # small enough that clipping acts on some steps (asserted below)
ATOL = 1e-6
DDP_DEBUG = "INFO"  # DETAIL segfaults DDP's constructor in torch 2.13 (see module docstring)


# --------------------------------------------------------------------------- shared fixtures
def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def make_batches(steps: int = STEPS, size: int = GLOBAL_BATCH):
    return [(torch.randn(size, 8), torch.randn(size, 1)) for _ in range(steps)]


def shard(batch, topo):
    return tuple(td.split_between_ranks(t, topo) for t in batch)


def transforms_for(config: str, topo) -> list:
    """The composition under test: the brief's order, outermost first."""
    if config == "plain":
        return [sync_grads(topo)]
    assert config == "accumulate_clip"
    return [clip_grads(MAX_NORM), sync_grads(topo), accumulate(2)]


def train(model, batches, topo, config):
    """Train ``model`` in place with the composed step; return (step fn, per-update metrics,
    the final state). With accumulation each batch is fed as 2 calls (one micro-batch each)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = compose(optimize(opt), *transforms_for(config, topo))(value_and_grad(loss_fn))
    state = step.init(td.TrainState(model=model, optimizer=opt))
    k = 1 if config == "plain" else 2
    history = []
    for batch in batches:
        for micro in split_batch(batch, k):
            state, metrics = step(state, micro)
        history.append(metrics)  # the window's last call: it reports the update
    assert state.step == len(batches) * k
    return step, history, state


def train_by_hand(model, batches, config):
    """Plain torch: backward, (accumulate), clip_grad_norm_, opt.step, zero_grad."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    norms = []
    for x, y in batches:
        if config == "plain":
            loss_fn(model, (x, y)).backward()
        else:
            for mx, my in zip(x.chunk(2), y.chunk(2), strict=True):
                (loss_fn(model, (mx, my)) / 2).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad()
    return norms


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
    return max((u - v).abs().max().item() for u, v in zip(a, b, strict=True))


def global_grads(model0, batch):
    ref = copy.deepcopy(model0)
    loss_fn(ref, batch).backward()
    return grads_of(ref)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("config", ["plain", "accumulate_clip"])
def test_single_process_path_equals_plain_torch(config):
    model0, batches = make_mlp(), make_batches()
    ours, hand = copy.deepcopy(model0), copy.deepcopy(model0)
    step, history, state = train(ours, batches, td.Topology.single(), config)
    norms = train_by_hand(hand, batches, config)

    assert "one rank" in step.report(state)["sync_grads"]["steps_aside"]
    assert max_diff(params_of(ours), params_of(hand)) <= ATOL
    assert max_diff(params_of(ours), params_of(model0)) > 1e-3  # it trained
    if config == "accumulate_clip":
        reported = torch.stack([m["grad_norm"] for m in history])
        torch.testing.assert_close(reported, torch.stack(norms), rtol=1e-6, atol=1e-7)
        assert (reported > MAX_NORM).any(), "clipping never acted; lower MAX_NORM"


@pytest.mark.parametrize("config", ["plain", "accumulate_clip"])
@pytest.mark.parametrize("world", [2, 4])
def test_sync_grads_training_matches_single_process(world, config):
    model0, batches = make_mlp(), make_batches()

    def rank(topo):
        model = copy.deepcopy(model0)
        step, history, state = train(model, [shard(b, topo) for b in batches], topo, config)
        return params_of(model), history, step.report(state)["sync_grads"]

    results = td.in_process(rank, world)

    reference = copy.deepcopy(model0)
    _, ref_history, _ = train(reference, batches, td.Topology.single(), config)
    for r, (params, history, info) in enumerate(results):
        diff = max_diff(params, params_of(reference))
        assert diff <= ATOL, f"rank {r} drifted {diff:.2e} from single-process training"
        assert "steps_aside" not in info and info["buckets"] >= 1
        if config == "accumulate_clip":  # every rank clips by the global norm
            torch.testing.assert_close(
                torch.stack([m["grad_norm"] for m in history]),
                torch.stack([m["grad_norm"] for m in ref_history]),
                rtol=1e-5,
                atol=1e-6,
            )
    assert max_diff(results[0][0], params_of(model0)) > 1e-3  # it trained


@pytest.mark.parametrize("world", [2, 4])
def test_sync_grads_gradients_equal_ddp(world):
    model0, (batch,) = make_mlp(), make_batches(steps=1)

    def rank(topo):
        local = shard(batch, topo)
        ddp = nn.parallel.DistributedDataParallel(
            copy.deepcopy(model0), process_group=topo.submesh("dp").get_group()
        )
        loss_fn(ddp, local).backward()
        ours = copy.deepcopy(model0)
        step = sync_grads(topo)(value_and_grad(loss_fn))
        step(td.TrainState(model=ours), local)
        return grads_of(ddp.module), grads_of(ours)

    results = td.in_process(rank, world, debug=DDP_DEBUG)
    expected = global_grads(model0, batch)
    for ddp_grads, our_grads in results:
        assert max_diff(our_grads, ddp_grads) <= ATOL
        assert max_diff(our_grads, expected) <= ATOL
    assert max_diff(results[0][1], results[-1][1]) == 0.0  # every rank holds the same average


# --------------------------------------------------------------------------- collectives
@pytest.fixture
def all_reduce_log(monkeypatch):
    """Record (dtype, numel) of every ``dist.all_reduce`` per rank thread; the real one runs."""
    log: dict[str, list] = collections.defaultdict(list)
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        log[threading.current_thread().name].append((tensor.dtype, tensor.numel()))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    return log


def _seq(group) -> int:
    return group._get_sequence_number_for_group()


@pytest.mark.parametrize("bucket_mb", [25.0, 0.001])
def test_accumulate_syncs_only_on_the_last_call_of_a_window(bucket_mb, all_reduce_log):
    model0, batches = make_mlp(), make_batches(steps=2)
    n_params = sum(p.numel() for p in model0.parameters())

    def rank(topo):
        group = topo.submesh("dp").get_group()
        me = threading.current_thread().name
        out = {}
        for n in (1, 4):
            model = copy.deepcopy(model0)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            step = compose(optimize(opt), sync_grads(topo, bucket_mb=bucket_mb), accumulate(n))(
                value_and_grad(loss_fn)
            )
            state = step.init(td.TrainState(model=model, optimizer=opt))
            per_call, logged, updates = [], [], []
            for batch in batches:
                for micro in split_batch(shard(batch, topo), n):  # one loader batch per call
                    before, logged_before = _seq(group), len(all_reduce_log[me])
                    state, metrics = step(state, micro)
                    per_call.append(_seq(group) - before)
                    logged.append(all_reduce_log[me][logged_before:])
                    updates.append(bool(metrics.get("update", True)))
            out[n] = dict(
                per_call=per_call,
                logged=[entry for entry in logged if entry],
                updates=updates,
                buckets=step.report(state)["sync_grads"]["buckets"],
                params=params_of(model),
            )
        return out

    results = td.in_process(rank, 2)
    for out in results:
        one, four = out[1], out[4]
        buckets = one["buckets"]
        assert four["buckets"] == buckets
        if bucket_mb < 0.01:
            assert buckets >= 3, "a tiny bucket_mb should split this MLP into several buckets"
        else:
            assert buckets == 1
        # One all-reduce per bucket per optimizer step, with or without accumulation: none on
        # calls 0..2 of a window, every bucket on the last call's backward.
        assert one["per_call"] == [buckets] * len(batches)
        assert four["per_call"] == [0, 0, 0, buckets] * len(batches)
        assert four["updates"] == [False, False, False, True] * len(batches)
        # The collectives are fp32 gradient buckets covering every parameter exactly once.
        assert len(one["logged"]) == len(four["logged"]) == len(batches)
        for logged in one["logged"] + four["logged"]:
            assert len(logged) == buckets
            assert {dtype for dtype, _ in logged} == {torch.float32}
            assert sum(numel for _, numel in logged) == n_params
        # Accumulating changes nothing numerically (equal micro-batches of a mean loss).
        assert max_diff(one["params"], four["params"]) <= ATOL
    reference = copy.deepcopy(model0)
    train(reference, batches, td.Topology.single(), "plain")
    assert max_diff(results[0][1]["params"], params_of(reference)) <= ATOL


# --------------------------------------------------------------------------- stepping aside
def test_sync_grads_steps_aside_on_ddp_and_averages_once(all_reduce_log):
    model0, batches = make_mlp(), make_batches(steps=2)

    def rank(topo):
        group = topo.submesh("dp").get_group()
        me = threading.current_thread().name
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model0), process_group=group)
        step = sync_grads(topo)(value_and_grad(loss_fn))
        logged_before = len(all_reduce_log[me])
        state, _ = step(td.TrainState(model=ddp), shard(batches[0], topo))
        ours_logged = len(all_reduce_log[me]) - logged_before
        grads = grads_of(ddp.module)

        alone = nn.parallel.DistributedDataParallel(copy.deepcopy(model0), process_group=group)
        loss_fn(alone, shard(batches[0], topo)).backward()

        # accumulate on a DDP model turns DDP's own sync off on micro-steps (no_sync).
        acc_model = nn.parallel.DistributedDataParallel(copy.deepcopy(model0), process_group=group)
        acc = compose(sync_grads(topo), accumulate(2))(value_and_grad(loss_fn))
        acc_state = td.TrainState(model=acc_model)
        for micro in split_batch(shard(batches[1], topo), 2):
            acc_state, _ = acc(acc_state, micro)
        report = step.report(state)
        return grads, grads_of(alone.module), report, ours_logged, grads_of(acc_model.module)

    results = td.in_process(rank, 2, debug=DDP_DEBUG)
    expected = global_grads(model0, batches[0])
    expected_acc = global_grads(model0, batches[1])
    for grads, alone, info, ours_logged, acc_grads in results:
        reason = info["sync_grads"]["steps_aside"]
        assert "DistributedDataParallel" in reason
        assert "buckets" not in info["sync_grads"]
        assert ours_logged == 0  # sync_grads issued nothing of its own
        assert max_diff(grads, alone) <= ATOL  # averaged once: DDP alone, not halved
        assert max_diff(grads, expected) <= ATOL
        assert max_diff(acc_grads, expected_acc) <= ATOL


def test_sync_grads_steps_aside_on_a_single_rank():
    model0, (batch,) = make_mlp(), make_batches(steps=1)
    model = copy.deepcopy(model0)
    step = sync_grads(td.Topology.single())(value_and_grad(loss_fn))
    state = step.init(td.TrainState(model=model))
    reason = step.report(state)["sync_grads"]["steps_aside"]  # decided before the first call
    step(state, batch)
    assert "one rank" in reason and "'dp'" in reason
    assert max_diff(grads_of(model), global_grads(model0, batch)) == 0.0

    def rank(topo):  # a live one-rank world steps aside too, and communicates nothing
        group = topo.submesh("dp").get_group()
        live = copy.deepcopy(model0)
        live_step = sync_grads(topo)(value_and_grad(loss_fn))
        before = _seq(group)
        state, _ = live_step(td.TrainState(model=live), batch)
        reason = live_step.report(state)["sync_grads"].get("steps_aside")
        return reason, _seq(group) - before, grads_of(live)

    ((live_reason, issued, grads),) = td.in_process(rank, 1)
    assert live_reason is not None and "one rank" in live_reason
    assert issued == 0
    assert max_diff(grads, global_grads(model0, batch)) == 0.0
