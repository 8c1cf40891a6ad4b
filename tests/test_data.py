"""`shard_loader`: sharding, padding, seeding and resuming, checked against the global order.

The loader communicates nothing, so most checks build one loader per rank of a (not live)
``Topology`` in this process and put their batches side by side. The checks that need real
collectives (``gather_for_metrics`` over the data-parallel axis; a ``dp x tp`` mesh) run in an
in-process world.

Samples are their own indices (``TensorDataset(arange(n))``), so a batch says exactly which
samples it holds.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

import torchdist as td
from torchdist import CheckpointError, Topology
from torchdist.data import ShardedLoader, epoch_order, shard_loader

N, B = 22, 4  # the case: 22 samples, batch 4 per rank


def ids(n: int = N) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def loaders(world: int, n: int = N, **kw) -> list:
    return [
        shard_loader(ids(n), Topology(world_size=world, rank=r), batch_size=B, **kw)
        for r in range(world)
    ]


def global_batches(ranks: list, *, strip_padding: bool = True, steps: int | None = None):
    """Each step's global batch (ranks' batches concatenated in dp order), padding removed."""
    iters = [iter(loader) for loader in ranks]
    out = []
    while steps is None or len(out) < steps:
        parts = [next(it, None) for it in iters]
        if all(p is None for p in parts):
            break
        rows = torch.cat([p[0] for p in parts if p is not None])
        if strip_padding:  # what gather_for_metrics keeps
            rows = rows[: len(ranks[0].dataset) - ranks[0].batch_start]
        out.append(rows)
    return out


# --------------------------------------------------------------------------- sharding
def test_gather_for_metrics_sees_each_sample_once_on_two_ranks():
    def fn(topo):
        loader = shard_loader(ids(), topo, batch_size=B, seed=3)
        seen, sizes = [], []
        for (x,) in loader:
            sizes.append(len(x))
            seen.append(
                td.gather_for_metrics(x, topo, dataset_len=N, samples_seen=loader.batch_start)
            )
        return torch.cat(seen), sizes, len(loader), loader.epoch

    for gathered, sizes, length, epoch in td.in_process(fn, 2, timeout=30):
        assert sorted(gathered.tolist()) == list(range(N))  # each sample exactly once
        assert torch.equal(gathered, epoch_order(N, 3, 0))  # in global order
        assert sizes == [B, B, B] and length == 3  # the last global batch was padded
        assert epoch == 1  # the epoch ended


def test_even_batches_pads_the_last_batch_with_the_epoch_start():
    ranks = loaders(2, seed=1)
    order = epoch_order(N, 1, 0)
    last = [list(loader)[-1][0] for loader in ranks]
    assert torch.equal(torch.cat(last), torch.cat([order[16:], order[:2]]))


def test_uneven_last_batch_and_drop_last():
    uneven = [[x for (x,) in loader] for loader in loaders(2, even_batches=False)]
    assert [len(x) for x in uneven[0]] == [4, 4, 4]
    assert [len(x) for x in uneven[1]] == [4, 4, 2]
    assert sorted(torch.cat([*uneven[0], *uneven[1]]).tolist()) == list(range(N))
    ranks = loaders(2, drop_last=True)
    dropped = [[x for (x,) in loader] for loader in ranks]
    assert [loader.epoch for loader in ranks] == [1, 1]
    assert [len(x) for x in dropped[0] + dropped[1]] == [4] * 4
    order = epoch_order(N, 0, 0)
    assert sorted(torch.cat(dropped[0] + dropped[1]).tolist()) == sorted(order[:16].tolist())
    assert len(loaders(2, drop_last=True)[1]) == 2


def test_a_rank_with_nothing_left_yields_no_batch():
    ranks = loaders(3, n=9, even_batches=False)  # G = 12 > 9: ranks get 4, 4, 1
    assert [len(loader) for loader in ranks] == [1, 1, 1]
    ranks = loaders(3, n=20, even_batches=False)  # second global batch: 8 samples -> 4, 4, 0
    assert [len(loader) for loader in ranks] == [2, 2, 1]
    assert [len(list(loader)) for loader in ranks] == [2, 2, 1]
    assert [loader.epoch for loader in ranks] == [1, 1, 1]  # every rank finished the epoch
    assert [len(list(loader)) for loader in ranks] == [2, 2, 1]


def test_tp_peers_see_identical_batches_on_a_dp_x_tp_mesh():
    def fn(topo):
        loader = shard_loader(ids(), topo, batch_size=B, seed=5)
        mine = torch.cat([x for (x,) in loader])
        return topo.dp_rank(), topo.index("tp"), td.gather(mine[None], topo)

    results = td.in_process(fn, 4, timeout=30, dp_shard=2, tp=2)
    everyone = results[0][2]  # rows in global rank order
    for rank, (dp, tp, _) in enumerate(results):
        peer = rank ^ 1  # the other tp rank of the same dp group
        assert results[peer][0] == dp and results[peer][1] != tp
        assert torch.equal(everyone[rank], everyone[peer])
    assert not torch.equal(everyone[0], everyone[2])  # different dp groups: different samples


def test_a_batch_moves_to_the_topology_device_and_uses_collate_fn():
    topo = Topology.single()
    loader = shard_loader(
        list(range(10)), topo, batch_size=3, collate_fn=lambda s: s, shuffle=False
    )
    assert next(iter(loader)) == [0, 1, 2]
    (x,) = next(iter(shard_loader(ids(), topo, batch_size=3)))
    assert x.device == topo.device


def test_getitems_is_used_for_whole_batches():
    class Batched(torch.utils.data.Dataset):
        calls = 0

        def __len__(self):
            return 8

        def __getitem__(self, i):
            raise AssertionError("expected __getitems__")

        def __getitems__(self, indices):
            Batched.calls += 1
            return [torch.tensor(i) for i in indices]

    loader = shard_loader(Batched(), Topology.single(), batch_size=4, shuffle=False)
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert Batched.calls == 2


def test_workers_give_the_same_batches():
    topo = Topology(world_size=2, rank=1)
    plain = [x for (x,) in shard_loader(ids(), topo, batch_size=B, seed=2)]
    workers = [x for (x,) in shard_loader(ids(), topo, batch_size=B, seed=2, num_workers=1)]
    assert len(plain) == len(workers) and all(map(torch.equal, plain, workers))


# --------------------------------------------------------------------------- seeding
def test_order_is_a_pure_function_of_seed_and_epoch():
    before = torch.get_rng_state()
    state = random.getstate()
    a = [torch.cat(global_batches(loaders(2, seed=7)))]
    assert torch.equal(torch.get_rng_state(), before) and random.getstate() == state
    b = [torch.cat(global_batches(loaders(2, seed=7)))]
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], torch.cat(global_batches(loaders(2, seed=8))))
    ranks = loaders(2, seed=7)
    first = torch.cat(global_batches(ranks))
    second = torch.cat(global_batches(ranks))  # the next pass is epoch 1
    assert ranks[0].epoch == 2 and not torch.equal(first, second)
    assert torch.equal(second, epoch_order(N, 7, 1))
    for loader in ranks:
        loader.set_epoch(1)
    assert torch.equal(torch.cat(global_batches(ranks)), second)
    assert torch.equal(torch.cat(global_batches(loaders(2, shuffle=False))), torch.arange(N))


# --------------------------------------------------------------------------- resume
def remaining_after(world: int, steps: int, resume_world: int):
    """Consume ``steps`` global batches at ``world`` ranks, resume at ``resume_world``."""
    ranks = loaders(world, seed=11)
    global_batches(ranks, steps=steps)
    state = ranks[0].state_dict()
    assert all(loader.state_dict() == state for loader in ranks)  # global, not per rank
    resumed = loaders(resume_world, seed=11)
    for loader in resumed:
        loader.load_state_dict(state)
    return state, resumed


def test_resume_at_the_same_world_size_gives_the_same_batches():
    ranks = loaders(2, seed=11)
    uninterrupted = [[x for (x,) in loader] for loader in ranks]
    state, resumed = remaining_after(2, 2, 2)
    assert state["cursor"] == 2 * B * 2 and state["epoch"] == 0
    for r, loader in enumerate(resumed):
        rest = [x for (x,) in loader]
        assert len(rest) == 1 and all(map(torch.equal, rest, uninterrupted[r][2:]))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_repeats_and_skips_nothing(before, after):
    order = epoch_order(N, 11, 0)
    state, resumed = remaining_after(before, 2, after)
    rest = torch.cat(global_batches(resumed))
    assert torch.equal(rest, order[state["cursor"] :])  # exactly the next samples, in order
    assert all(loader.epoch == 1 for loader in resumed)
    assert torch.equal(torch.cat(global_batches(resumed)), epoch_order(N, 11, 1))


def test_drop_last_after_a_resume_at_a_larger_world_drops_the_short_tail():
    one = loaders(1, seed=2, drop_last=True)[0]
    next(iter(one))  # 4 samples consumed
    two = loaders(2, seed=2, drop_last=True)
    for loader in two:
        loader.load_state_dict(one.state_dict())
    rest = global_batches(two)
    assert [len(b) for b in rest] == [8]  # order[4:12]; order[12:16] cannot fill a batch of 8
    assert torch.equal(rest[0], epoch_order(N, 2, 0)[4:12])
    assert all(loader.epoch == 1 and loader.state_dict()["cursor"] == 0 for loader in two)


def test_a_state_saved_after_the_last_batch_resumes_into_the_next_epoch():
    ranks = loaders(1, seed=4)
    for _ in ranks[0]:
        state = ranks[0].state_dict()  # saved in the loop body of the last batch
    assert state == {**state, "epoch": 0, "cursor": N}
    resumed = loaders(1, seed=4)[0]
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat([x for (x,) in resumed])[:N], epoch_order(N, 4, 1))


def test_breaking_out_keeps_the_cursor():
    loader = loaders(1, seed=4)[0]
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert loader.state_dict()["cursor"] == 2 * B and loader.batch_start == B
    rest = torch.cat([x for (x,) in loader])[: N - 2 * B]  # without the padding
    assert torch.equal(rest, epoch_order(N, 4, 0)[2 * B :])


# --------------------------------------------------------------------------- bad inputs
def test_a_state_from_another_dataset_or_seed_is_refused():
    state = loaders(1, seed=1)[0].state_dict()
    with pytest.raises(CheckpointError, match="dataset_len=22.*dataset_len=21"):
        loaders(1, n=21, seed=1)[0].load_state_dict(state)
    with pytest.raises(CheckpointError, match="seed=1"):
        loaders(1, seed=2)[0].load_state_dict(state)
    with pytest.raises(CheckpointError, match="newer"):
        loaders(1, seed=1)[0].load_state_dict({**state, "version": 99})
    with pytest.raises(CheckpointError, match="expected"):
        loaders(1, seed=1)[0].load_state_dict({"cursor": 3})


def test_bad_datasets_and_arguments():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(TypeError, match="map-style.*IterableDataset Stream"):
        ShardedLoader(Stream(), Topology.single(), batch_size=2)  # shard_loader streams it
    with pytest.raises(TypeError, match="__getitem__"):
        shard_loader({1, 2}, Topology.single(), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        shard_loader(ids(), Topology.single(), batch_size=0)
