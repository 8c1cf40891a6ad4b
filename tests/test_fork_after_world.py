"""A process that ran a world can still fork: no process group is left for a child to free.

Regression: a root mesh and its flattened ``"dp"`` mesh form a reference cycle that held the
world's gloo groups, and an FSDP2 or DDP model holds its groups through hook closures. The first
garbage collection inside a forked child (a DataLoader worker, a process forked by hand) then ran
the groups' destructors there: the child hung, or died of SIGSEGV (exit -11). This is how the
real-process teardown test in test_worlds.py crashed on CI.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import torchdist as td
from torchdist.sharding import replicate, shard


def _exit_code_of_a_forked_collection() -> int | None:
    """Fork a child by hand (no gc.freeze, unlike td.spawn) that runs one full collection."""
    proc = multiprocessing.get_context("fork").Process(target=gc.collect)
    proc.start()
    proc.join(60)
    if proc.is_alive():  # hung in a destructor
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def _one_all_reduce(topo):
    return float(td.all_reduce(torch.ones(1), topo))


def _train(transform):
    def rank(topo):
        torch.manual_seed(0)
        model = transform(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), topo)
        model(torch.randn(4, 8)).sum().backward()
        return sorted(n for n, _ in model.named_parameters())

    return rank


WORLDS = {
    "distributed, one process": lambda: _in_distributed(),
    "in_process, 2x2 mesh": lambda: td.in_process(_one_all_reduce, 4, timeout=60, dp_shard=2, tp=2),
    "in_process, shard": lambda: td.in_process(_train(shard), 2, timeout=60),
    "in_process, replicate": lambda: td.in_process(_train(replicate), 2, timeout=60),
}


def _in_distributed():
    with td.distributed(td.Topology.single()) as live:
        return _one_all_reduce(live)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", list(WORLDS))
def test_a_child_forked_after_a_world_can_collect_garbage(world):
    assert WORLDS[world]()  # the world ran (a result per rank, or the reduced value)
    assert _exit_code_of_a_forked_collection() == 0


def test_the_process_group_is_released_when_the_world_ends():
    """Without waiting for the collector: the live topology still in scope must not keep it."""
    with td.distributed(td.Topology.single()) as live:
        group = weakref.ref(dist.group.WORLD)
        assert group() is not None and live.mesh.size() == 1
    assert group() is None
    assert live.mesh.mesh_dim_names  # the dead mesh is still there to look at


@pytest.mark.multiprocess
def test_a_dataloader_worker_after_an_in_process_world(tmp_path):
    class Collecting(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            gc.collect()  # what any worker's allocations trigger sooner or later
            return torch.tensor(float(i))

    td.in_process(_train(shard), 2, timeout=60)
    loader = torch.utils.data.DataLoader(Collecting(), batch_size=4, num_workers=2, timeout=60)
    assert sorted(float(x) for batch in loader for x in batch) == [float(i) for i in range(16)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_worlds_do_not_leave_their_gloo_threads_behind():
    """Each leaked gloo group keeps its worker threads: before the fix, 40 small worlds in one
    process (a notebook's afternoon) left about 1,700 threads behind."""
    world = lambda: td.in_process(_one_all_reduce, 4, timeout=60, dp_shard=2, tp=2)
    world()  # first-use threads (torch's own pools) start here
    before = len(os.listdir("/proc/self/task"))
    for _ in range(5):
        world()
    after = len(os.listdir("/proc/self/task"))
    assert after <= before + 8, (before, after)


def _rank(topo: td.Topology) -> int:
    return topo.rank


def test_spawn_and_loader_workers_keep_the_callers_own_gc_freeze():
    """A process that froze its heap itself (a server before forking its workers; this suite,
    after collection) keeps it frozen through torchdist's forks: ``gc.unfreeze`` after them
    would thaw the caller's objects too."""
    gc.freeze()
    frozen = gc.get_freeze_count()
    assert td.spawn(_rank, 2, timeout=60) == [0, 1]
    assert gc.get_freeze_count() >= frozen
    loader = td.shard_loader(list(range(8)), td.Topology.single(), batch_size=4, shuffle=False,
                           num_workers=1)
    assert [batch.tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert gc.get_freeze_count() >= frozen


def test_a_fork_without_a_callers_freeze_leaves_the_collector_as_it_was():
    """Without the caller's freeze, the parent's objects are collectable again after the fork."""
    from torchdist.runtime._forksafe import collector_frozen

    frozen_before = gc.get_freeze_count()
    gc.unfreeze()  # this test's premise: nothing frozen (the suite froze its imports)
    try:
        with collector_frozen():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0
    finally:
        if frozen_before:
            gc.freeze()
