"""Process control: split_between_ranks (pure), main_first and sync_rng (real processes),
set_seed, is_main, barrier, print0."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

import torchdist as td
from torchdist import Topology, TopologyError

ITEMS = 17


# --------------------------------------------------------------------------- split_between_ranks


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_between_ranks_sizes_and_order(n):
    items = list(range(100, 100 + ITEMS))
    shares = [td.split_between_ranks(items, Topology(world_size=n, rank=r)) for r in range(n)]
    for r, share in enumerate(shares):
        expected = ITEMS // n + 1 if r < ITEMS % n else ITEMS // n
        assert len(share) == expected, (n, r)
        assert isinstance(share, list)
    # contiguous slices that cover the input in order
    assert [x for share in shares for x in share] == items
    start = 0
    for share in shares:
        assert share == items[start : start + len(share)]
        start += len(share)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_between_ranks_padded(n):
    items = list(range(ITEMS))
    want = math.ceil(ITEMS / n)
    unpadded = [td.split_between_ranks(items, Topology(world_size=n, rank=r)) for r in range(n)]
    for r in range(n):
        topo = Topology(world_size=n, rank=r)
        padded = td.split_between_ranks(items, topo, pad=True)
        assert len(padded) == want
        assert padded[: len(unpadded[r])] == unpadded[r]
        assert all(x == items[-1] for x in padded[len(unpadded[r]) :])  # repeats of the last item
        tensor = td.split_between_ranks(torch.arange(ITEMS), topo, pad=True)
        assert tensor.tolist() == padded


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_between_ranks_types(n):
    seq = list(range(ITEMS))
    letters = "abcdefghijklmnopq"
    assert len(letters) == ITEMS
    matrix = torch.arange(ITEMS * 2).reshape(ITEMS, 2)
    tuple_parts, str_parts, tensor_parts, dict_parts = [], [], [], []
    for r in range(n):
        topo = Topology(world_size=n, rank=r)
        expected = td.split_between_ranks(seq, topo)
        t = td.split_between_ranks(tuple(seq), topo)
        assert isinstance(t, tuple) and list(t) == expected
        s = td.split_between_ranks(letters, topo)
        assert isinstance(s, str) and s == "".join(letters[i] for i in expected)
        m = td.split_between_ranks(matrix, topo)
        assert isinstance(m, torch.Tensor) and torch.equal(m, matrix[expected])
        d = td.split_between_ranks({"ids": seq, "text": list(letters)}, topo)
        assert d == {"ids": expected, "text": [letters[i] for i in expected]}
        tuple_parts.append(t)
        str_parts.append(s)
        tensor_parts.append(m)
        dict_parts.append(d)
    assert sum(tuple_parts, ()) == tuple(seq)
    assert "".join(str_parts) == letters
    assert torch.equal(torch.cat(tensor_parts), matrix)
    assert sum((d["ids"] for d in dict_parts), []) == seq

    if n > 1:
        padded = td.split_between_ranks(letters, Topology(world_size=n, rank=n - 1), pad=True)
        assert len(padded) == math.ceil(ITEMS / n) and padded.endswith("q")


def test_split_between_ranks_dp_axis_gives_tp_peers_the_same_share():
    items = list(range(ITEMS))
    topos = [Topology(world_size=8, rank=r, tp=2) for r in range(8)]  # dp = 4 groups
    shares = {r: td.split_between_ranks(items, t, axis="dp") for r, t in enumerate(topos)}
    for topo in topos:
        peers = topo.group_ranks("tp")
        assert all(shares[p] == shares[topo.rank] for p in peers)
    by_dp = [shares[topos[0].all_groups("tp")[i][0]] for i in range(4)]
    assert [x for share in by_dp for x in share] == items
    assert [len(s) for s in by_dp] == [5, 4, 4, 4]
    # over the whole world, tp peers get different shares
    world = [td.split_between_ranks(items, t) for t in topos]
    assert world[0] != world[1]


def test_split_between_ranks_errors():
    topo = Topology(world_size=2, rank=0)
    with pytest.raises(TopologyError, match=r"values of one length"):
        td.split_between_ranks({"a": [1, 2], "b": [1]}, topo)
    assert td.split_between_ranks([], topo) == []
    assert td.split_between_ranks([], Topology(world_size=2, rank=1), pad=True) == []
    # fewer items than ranks: padded ranks repeat the last item
    assert td.split_between_ranks([1], Topology(world_size=4, rank=3)) == []
    assert td.split_between_ranks([1], Topology(world_size=4, rank=3), pad=True) == [1]


# --------------------------------------------------------------------------- seeds and rng


def test_set_seed_returns_the_seed_used():
    assert td.set_seed(7) == 7
    a = torch.rand(3)
    assert td.set_seed(7, Topology(world_size=4, rank=3)) == 7
    assert torch.equal(torch.rand(3), a)
    assert td.set_seed(7, Topology(world_size=4, rank=3), per_rank=True) == 10
    b = (torch.rand(3), random.random())
    td.set_seed(10)
    assert torch.equal(torch.rand(3), b[0]) and random.random() == b[1]
    with pytest.raises(TopologyError, match=r"per_rank=True\) needs the topology"):
        td.set_seed(0, per_rank=True)


def test_sync_rng_single_process_keeps_state():
    td.set_seed(3)
    state = torch.get_rng_state()
    py_state = random.getstate()
    generator = torch.Generator().manual_seed(5)
    g_state = generator.get_state()
    td.sync_rng(Topology.single(), generator=generator)
    assert torch.equal(torch.get_rng_state(), state)
    assert random.getstate() == py_state
    assert torch.equal(generator.get_state(), g_state)


# --------------------------------------------------------------------------- is_main, print0


def test_is_main():
    assert td.is_main(Topology.single())
    assert td.is_main(Topology(world_size=4, rank=0))
    assert not td.is_main(Topology(world_size=4, rank=1))
    # local rank 0 on the second host
    second_host = Topology(world_size=4, rank=2, local_rank=0, local_world_size=2)
    assert not td.is_main(second_host)
    assert td.is_main(second_host, local=True)
    assert not td.is_main(
        Topology(world_size=4, rank=3, local_rank=1, local_world_size=2), local=True
    )


def test_print0_prints_once_in_a_world(capsys):
    def fn(topo):
        td.print0(topo, "hello from", "the main rank", sep="|")
        td.barrier(topo)
        return td.is_main(topo)

    assert td.in_process(fn, 4, timeout=30) == [True, False, False, False]
    out = capsys.readouterr().out
    assert out.count("hello from|the main rank\n") == 1


def test_print0_single_and_non_main(capsys):
    td.print0(Topology.single(), "single")
    td.print0(Topology(world_size=2, rank=1), "never")
    out = capsys.readouterr().out
    assert out == "single\n"


def test_barrier_orders_ranks_in_process():
    events: list[tuple[str, int]] = []

    def fn(topo):
        if topo.rank == 0:
            time.sleep(0.3)
        events.append(("before", topo.rank))
        td.barrier(topo)
        events.append(("after", topo.rank))
        td.barrier(topo, axis="tp")
        return True

    assert td.in_process(fn, 4, timeout=30, dp_shard=2, tp=2) == [True] * 4
    kinds = [kind for kind, _ in events]
    assert kinds == ["before"] * 4 + ["after"] * 4
    # rank 0 arrived late (it slept), yet nobody left the barrier before it arrived
    assert ("before", 0) in events[:4]


# --------------------------------------------------------------------------- real processes


def _control_in_processes(topo, path):

    rank = topo.rank
    # main_first: rank 0 writes first even though it sleeps first
    with td.main_first(topo):
        if rank == 0:
            time.sleep(0.3)
        with open(path, "a") as f:
            f.write(f"{rank}\n")
    with td.main_first(topo, local=True):
        with open(path, "a") as f:
            f.write(f"local {rank}\n")

    seed_used = td.set_seed(0, topo, per_rank=True)
    return (seed_used, *_sync_and_draw(topo, generator=None))


def _rng_snapshot(generator):
    import numpy

    snap = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": numpy.random.get_state()[1].copy(),
    }
    if generator is not None:
        snap["generator"] = generator.get_state()
    return snap


def _sync_and_draw(topo, generator):
    import numpy

    before = _rng_snapshot(generator)
    td.sync_rng(topo, generator=generator)
    after = _rng_snapshot(generator)
    draws = {
        "torch": torch.rand(3),
        "python": random.random(),
        "numpy": float(numpy.random.rand()),
    }
    if generator is not None:
        draws["generator"] = torch.rand(2, generator=generator)
    td.barrier(topo)
    return before, after, draws


def _check_synced(befores, afters, draws):
    keys = set(befores[0])
    # before the sync: every rank's state differs from rank 0's
    for other in befores[1:]:
        assert not torch.equal(other["torch"], befores[0]["torch"])
        assert other["python"] != befores[0]["python"]
        assert not (other["numpy"] == befores[0]["numpy"]).all()
        if "generator" in keys:
            assert not torch.equal(other["generator"], befores[0]["generator"])
    # after: identical everywhere, equal to rank 0's state before
    for after in afters:
        assert torch.equal(after["torch"], befores[0]["torch"])
        assert after["python"] == befores[0]["python"]
        assert (after["numpy"] == befores[0]["numpy"]).all()
        if "generator" in keys:
            assert torch.equal(after["generator"], befores[0]["generator"])
    for d in draws[1:]:
        assert torch.equal(d["torch"], draws[0]["torch"])
        assert d["python"] == draws[0]["python"]
        assert d["numpy"] == draws[0]["numpy"]
        if "generator" in keys:
            assert torch.equal(d["generator"], draws[0]["generator"])


@pytest.mark.multiprocess
def test_main_first_and_sync_rng_in_real_processes(tmp_path):
    n = 3
    path = tmp_path / "order.txt"
    results = td.spawn(_control_in_processes, n, str(path), timeout=60)

    lines = path.read_text().splitlines()
    first = [line for line in lines if not line.startswith("local")]
    assert first[0] == "0"
    assert sorted(first) == ["0", "1", "2"]
    local = [line for line in lines if line.startswith("local")]
    assert local[0] == "local 0" and len(local) == n
    # the main rank wrote its first line before it entered the second block
    assert lines.index("local 0") > lines.index("0")

    seeds = [seed for seed, *_ in results]
    assert seeds == [0, 1, 2]
    befores = [before for _, before, _, _ in results]
    afters = [after for _, _, after, _ in results]
    draws = [d for *_, d in results]
    _check_synced(befores, afters, draws)
    # and they are rank 0's draws: the seed 0 stream
    torch.manual_seed(0)
    assert torch.equal(draws[0]["torch"], torch.rand(3))


def _sync_with_generator(topo):
    td.set_seed(0, topo, per_rank=True)
    generator = torch.Generator().manual_seed(100 + topo.rank)
    return _sync_and_draw(topo, generator)


@pytest.mark.multiprocess
def test_sync_rng_with_generator_in_real_processes():
    """sync_rng(generator=g) syncs g as well as the global generators.

    Regression: broadcast returned its uint8 leaves as views into one packed buffer; the
    generator's state was packed first (optree sorts dict keys), so torch.set_rng_state received
    a view with a non-zero storage offset, which segfaults in torch 2.13 (exit code -11 on every
    rank). On a GPU topology the "cuda" state sorts first too, so plain sync_rng(topo) crashed.
    """
    results = td.spawn(_sync_with_generator, 2, timeout=60)
    _check_synced(*(list(part) for part in zip(*results, strict=True)))
