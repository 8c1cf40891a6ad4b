"""Pytree collectives over real gloo process groups.

Numerics run in an in-process world (``td.in_process``: ranks are threads, each with a real gloo
group); the same core checks run once more in real processes (``td.spawn``), marked
``multiprocess``. Expected values are computed in the test process from the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import torchdist as td
from torchdist import CollectiveError, Topology, TopologyError

WORLDS = [2, 4]


def _rank_values(n: int, r: int) -> torch.Tensor:
    """Rank ``r`` of ``n`` holds ``arange(n) + 1 + n*r``: together ``1..n*n``."""
    return torch.arange(n) + 1 + n * r


def _tree(r: int) -> dict:
    """A nested tree with several dtypes and a 0-d leaf, distinct on every rank."""
    return {
        "loss": torch.tensor(float(r) + 0.5),  # 0-d float32
        "stats": (
            torch.tensor([r, 10 * r + 1], dtype=torch.int64),
            torch.tensor([[r + 0.25, -r], [2.0 * r, 1.0]], dtype=torch.float64),
        ),
        "inner": {"h": torch.tensor([r + 1.0, 2.0], dtype=torch.bfloat16)},
        "flags": [torch.tensor([r % 2 == 0, True])],
    }


def _assert_tree_equal(actual, expected):
    import optree

    a_leaves, a_def = optree.tree_flatten(actual)
    e_leaves, e_def = optree.tree_flatten(expected)
    assert a_def == e_def
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert a.dtype == e.dtype, (a, e)
        assert a.shape == e.shape, (a, e)
        assert torch.equal(a, e), (a, e)


# --------------------------------------------------------------------------- core checks


def _core_checks(topo: Topology) -> dict:
    """The checks every world size must pass; run in threads and in real processes."""
    n, r = topo.world_size, topo.rank
    mine = _rank_values(n, r)
    before = mine.clone()
    out = {
        "gather": td.gather(mine, topo),
        "gather_object": td.gather_object([r], topo),
        "gather_object_dict": td.gather_object({"rank": r}, topo),
        "broadcast": td.broadcast(mine, topo),
        "broadcast_last": td.broadcast(mine, topo, src=n - 1),
        # placeholder of another shape and dtype on the other ranks
        "broadcast_placeholder": td.broadcast(
            mine if r == 1 else torch.zeros(1, dtype=torch.float32), topo, src=1
        ),
        "broadcast_objects": td.broadcast(
            {"t": mine, "name": f"rank{r}", "cfg": {"lr": 0.1 * r, "layers": [r, r]}}, topo, src=1
        ),
        "sum": td.all_reduce(mine, topo, op="sum"),
        "mean": td.all_reduce(mine.float(), topo, op="mean"),
        "max": td.all_reduce(mine, topo, op="max"),
        "min": td.all_reduce(mine, topo, op="min"),
        "tree_sum": td.all_reduce(_tree(r), topo),
        "tree_gather": td.gather(_tree(r), topo),
        "tree_broadcast": td.broadcast(_tree(r), topo, src=n - 1),
    }
    assert torch.equal(mine, before), "a collective modified its input in place"
    return out


def _check_core(results: list[dict], n: int) -> None:
    assert len(results) == n
    everything = torch.arange(1, n * n + 1)
    trees = [_tree(r) for r in range(n)]
    for out in results:
        assert torch.equal(out["gather"], everything)
        assert out["gather_object"] == list(range(n))
        assert out["gather_object_dict"] == [{"rank": q} for q in range(n)]
        assert torch.equal(out["broadcast"], torch.arange(1, n + 1))
        assert torch.equal(out["broadcast_last"], _rank_values(n, n - 1))
        assert out["broadcast_placeholder"].dtype == torch.int64
        assert torch.equal(out["broadcast_placeholder"], _rank_values(n, 1))
        objs = out["broadcast_objects"]
        assert torch.equal(objs["t"], _rank_values(n, 1))
        assert objs["name"] == "rank1"
        assert objs["cfg"] == {"lr": 0.1, "layers": [1, 1]}
        stacked = torch.stack([_rank_values(n, q) for q in range(n)])
        assert torch.equal(out["sum"], stacked.sum(0))
        assert torch.allclose(out["mean"], stacked.float().mean(0))
        assert torch.equal(out["max"], stacked.max(0).values)
        assert torch.equal(out["min"], stacked.min(0).values)

        expected_sum = {
            "loss": sum(t["loss"] for t in trees),
            "stats": tuple(torch.stack([t["stats"][i] for t in trees]).sum(0) for i in range(2)),
            "inner": {
                "h": torch.stack([t["inner"]["h"] for t in trees]).float().sum(0).to(torch.bfloat16)
            },
            "flags": [torch.stack([t["flags"][0] for t in trees]).any(0)],
        }
        # bool sum on gloo is a logical or; compare the reduction by value
        tree_sum = out["tree_sum"]
        _assert_tree_equal(
            {k: v for k, v in tree_sum.items() if k != "flags"},
            {k: v for k, v in expected_sum.items() if k != "flags"},
        )
        assert tree_sum["flags"][0].dtype == torch.bool
        assert torch.equal(tree_sum["flags"][0], expected_sum["flags"][0])

        expected_gather = {
            "loss": torch.stack([t["loss"] for t in trees]),  # 0-d: one row per rank
            "stats": tuple(torch.cat([t["stats"][i] for t in trees]) for i in range(2)),
            "inner": {"h": torch.cat([t["inner"]["h"] for t in trees])},
            "flags": [torch.cat([t["flags"][0] for t in trees])],
        }
        _assert_tree_equal(out["tree_gather"], expected_gather)
        _assert_tree_equal(out["tree_broadcast"], trees[n - 1])


@pytest.mark.parametrize("n", WORLDS)
def test_core_collectives_in_process(n):
    _check_core(td.in_process(_core_checks, n, timeout=30), n)


@pytest.mark.multiprocess
@pytest.mark.parametrize("n", WORLDS)
def test_core_collectives_in_real_processes(n):
    _check_core(td.spawn(_core_checks, n, timeout=60), n)


# --------------------------------------------------------------------------- all_reduce


def test_all_reduce_two_ranks_exact_values():
    def fn(topo):
        x = torch.tensor([1.0, 2.0]) if topo.rank == 0 else torch.tensor([3.0, 4.0])
        return {op: td.all_reduce(x, topo, op=op) for op in ("sum", "mean", "max", "min")}

    for out in td.in_process(fn, 2, timeout=30):
        assert out["sum"].tolist() == [4.0, 6.0]
        assert out["mean"].tolist() == [2.0, 3.0]
        assert out["max"].tolist() == [3.0, 4.0]
        assert out["min"].tolist() == [1.0, 2.0]


def test_all_reduce_returns_new_tensors_and_keeps_input():
    xs = [torch.randn(3, 4) for _ in range(2)]  # random tensors built outside the ranks

    def fn(topo, xs):
        x = xs[topo.rank]
        before = x.clone()
        out = td.all_reduce({"a": x, "b": [x[0]]}, topo, op="mean")
        return out, torch.equal(x, before), out["a"].data_ptr() != x.data_ptr()

    for out, unchanged, fresh in td.in_process(fn, 2, xs, timeout=30):
        assert unchanged and fresh
        assert torch.allclose(out["a"], (xs[0] + xs[1]) / 2)
        assert torch.allclose(out["b"][0], (xs[0][0] + xs[1][0]) / 2)


@pytest.mark.parametrize("n", WORLDS)
def test_zero_dim_tensors(n):
    def fn(topo):
        x = torch.tensor(float(topo.rank + 1))
        return (
            td.all_reduce(x, topo),
            td.all_reduce(x, topo, op="mean"),
            td.gather(x, topo),
            td.broadcast(x, topo, src=n - 1),
        )

    for total, mean, gathered, bcast in td.in_process(fn, n, timeout=30):
        assert total.shape == () and total.item() == n * (n + 1) / 2
        assert mean.shape == () and mean.item() == pytest.approx((n + 1) / 2)
        assert gathered.tolist() == [float(q + 1) for q in range(n)]
        assert bcast.shape == () and bcast.item() == float(n)


# --------------------------------------------------------------------------- gather


@pytest.mark.parametrize("n", WORLDS)
def test_gather_non_contiguous_views(n):
    bases = [torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(n)]

    def fn(topo, bases):
        view = bases[topo.rank].t()  # 3x2, not contiguous
        assert not view.is_contiguous()
        strided = bases[topo.rank][:, ::2]  # 2x2 strided slice
        return td.gather({"t": view, "s": strided}, topo)

    expected_t = torch.cat([b.t() for b in bases])
    expected_s = torch.cat([b[:, ::2] for b in bases])
    for out in td.in_process(fn, n, bases, timeout=30):
        assert torch.equal(out["t"], expected_t)
        assert torch.equal(out["s"], expected_s)


@pytest.mark.parametrize("n", WORLDS)
def test_gather_unequal_first_dims(n):
    def rows(r):  # 0, 2, 1, 0, ... rows on rank r, including empty ranks
        count = (2 * r + 1) % 3
        return torch.arange(count * 2, dtype=torch.float32).reshape(count, 2) + 100 * r

    def fn(topo):
        return td.gather({"x": rows(topo.rank), "ids": torch.arange(topo.rank + 1)}, topo)

    expected_x = torch.cat([rows(r) for r in range(n)])
    expected_ids = torch.cat([torch.arange(r + 1) for r in range(n)])
    for out in td.in_process(fn, n, timeout=30):
        assert torch.equal(out["x"], expected_x)
        assert torch.equal(out["ids"], expected_ids)


def test_gather_mismatched_trailing_shape_raises():
    def fn(topo):
        return td.gather({"ok": torch.ones(2), "bad": torch.ones(2, topo.rank + 1)}, topo)

    with pytest.raises(CollectiveError, match=r"differs across ranks.*rank 0: .*\(2, 1\).*rank 1"):
        td.in_process(fn, 2, timeout=30)


def test_gather_mismatched_dtype_raises():
    def fn(topo):
        dtype = torch.float32 if topo.rank == 0 else torch.float64
        return td.gather(torch.ones(2, dtype=dtype), topo)

    with pytest.raises(CollectiveError, match=r"differs across ranks in dtype"):
        td.in_process(fn, 2, timeout=30)


def test_gather_mismatched_structure_raises():
    def fn(topo):
        tree = [torch.ones(1)] * (topo.rank + 1)
        return td.gather(tree, topo)

    with pytest.raises(CollectiveError, match=r"different numbers of tensors \(\[1, 2\]\)"):
        td.in_process(fn, 2, timeout=30)


# --------------------------------------------------------------------------- broadcast


def test_broadcast_dtype_outside_the_table_is_not_silently_replaced():
    """A dtype gloo cannot reduce (uint32) still broadcasts with its dtype and values, or fails on
    every rank with CollectiveError naming it; never as another dtype.

    Regression: non-source ranks used to build their placeholders as ``_DTYPES[-2]`` (complex64)
    for any dtype missing from the table, so float8/uint32 broadcasts mismatched (NCCL) or hit a
    collective-fingerprint RuntimeError (gloo).
    """

    def fn(topo):
        x = torch.full((3,), 7 if topo.rank == 0 else 0, dtype=torch.uint32)
        return td.broadcast(x, topo)

    try:
        results = td.in_process(fn, 2, timeout=60)
    except CollectiveError as exc:
        assert "uint32" in str(exc)
    else:
        for out in results:
            assert out.dtype == torch.uint32
            assert out.tolist() == [7, 7, 7]


# --------------------------------------------------------------------------- pad_across_ranks


@pytest.mark.parametrize("n", WORLDS)
def test_pad_across_ranks(n):
    def length(r):
        return n + 1 if r == 0 else r

    def fn(topo):
        x = torch.arange(length(topo.rank)) + 1
        x2 = torch.ones(2, length(topo.rank))
        return (
            td.pad_across_ranks(x, topo, value=-1),
            td.pad_across_ranks(x, topo, value=-1, pad_first=True),
            td.pad_across_ranks({"m": x2}, topo, dim=1, value=7),
            x,
        )

    for r, (back, front, tree, x) in enumerate(td.in_process(fn, n, timeout=30)):
        missing = n + 1 - length(r)
        own = torch.arange(length(r)) + 1
        assert torch.equal(x, own)  # input untouched
        assert torch.equal(back, torch.cat([own, torch.full((missing,), -1)]))
        assert torch.equal(front, torch.cat([torch.full((missing,), -1), own]))
        assert tree["m"].shape == (2, n + 1)
        assert torch.equal(tree["m"][:, : length(r)], torch.ones(2, length(r)))
        assert bool((tree["m"][:, length(r) :] == 7).all())


# --------------------------------------------------------------------------- gather_for_metrics


@pytest.mark.parametrize("n", WORLDS)
def test_gather_for_metrics_drops_padded_tail(n):
    batch = 3

    def fn(topo):
        preds = torch.arange(batch) + batch * topo.rank  # global batch 0..n*batch-1
        labels = preds.float() * 10
        return {
            "all": td.gather_for_metrics(preds, topo),
            "cut": td.gather_for_metrics(
                {"p": preds, "y": labels}, topo, dataset_len=n * batch - 2
            ),
            "seen": td.gather_for_metrics(preds, topo, dataset_len=10 * n, samples_seen=9 * n + 1),
            "past": td.gather_for_metrics(preds, topo, dataset_len=5, samples_seen=5),
        }

    full = torch.arange(n * batch)
    for out in td.in_process(fn, n, timeout=30):
        assert torch.equal(out["all"], full)
        assert torch.equal(out["cut"]["p"], full[: n * batch - 2])
        assert torch.equal(out["cut"]["y"], full[: n * batch - 2].float() * 10)
        assert torch.equal(out["seen"], full[: n - 1])
        assert out["past"].shape == (0,)


def test_gather_for_metrics_gathers_over_dp_only():
    # world 4, dp_shard=2, tp=2: tp peers hold the same samples and are gathered once
    def fn(topo):
        samples = torch.tensor([10 * topo.dp_rank(), 10 * topo.dp_rank() + 1])
        return td.gather_for_metrics(samples, topo, dataset_len=3)

    for out in td.in_process(fn, 4, timeout=30, dp_shard=2, tp=2):
        assert out.tolist() == [0, 1, 10]


# --------------------------------------------------------------------------- errors


def test_non_tensor_leaf_to_all_reduce_names_the_path():
    def fn(topo):
        return td.all_reduce({"loss": torch.ones(1), "extra": {"names": ["a", 3]}}, topo)

    with pytest.raises(CollectiveError, match=r"leaf at extra/names/0 is a str"):
        td.in_process(fn, 2, timeout=30)
    with pytest.raises(CollectiveError, match=r"leaf at extra/names/0 is a str"):
        fn(Topology.single())
    with pytest.raises(CollectiveError, match=r"leaf at <root> is a float"):
        td.all_reduce(1.5, Topology.single())
    with pytest.raises(CollectiveError, match=r"gather needs tensors.*leaf at 1 is a int"):
        td.gather([torch.ones(1), 2], Topology.single())


def test_bad_reduction_arguments_raise():
    def fn(topo):
        errors = []
        for kwargs in ({"op": "mean"}, {"op": "avg"}, {"op": "prod"}):
            try:
                td.all_reduce(torch.tensor([1, 2]), topo, **kwargs)
            except CollectiveError as exc:
                errors.append(str(exc))
        # the world is still usable after the refused calls (nothing was half-sent)
        return errors, td.all_reduce(torch.tensor([1, 2]), topo)

    for errors, total in td.in_process(fn, 2, timeout=30):
        assert len(errors) == 3
        assert "op='mean' of a torch.int64 tensor would round" in errors[0]
        assert "unknown reduction 'avg'" in errors[1]
        assert "unknown reduction 'prod'" in errors[2]
        assert total.tolist() == [2, 4]


def test_non_live_multi_rank_topology_raises():
    topo = Topology(world_size=2, rank=0)
    x = torch.ones(2)
    calls = [
        lambda: td.all_reduce(x, topo),
        lambda: td.gather(x, topo),
        lambda: td.gather_object([0], topo),
        lambda: td.broadcast(x, topo),
        lambda: td.pad_across_ranks(x, topo),
        lambda: td.gather_for_metrics(x, topo),
        lambda: td.barrier(topo),
    ]
    for call in calls:
        with pytest.raises(TopologyError, match=r"need a live topology.*td.distributed"):
            call()


def test_single_process_collectives_are_identities():
    topo = Topology.single()
    tree = {"a": torch.arange(3.0), "b": (torch.tensor([[1, 2]]),), "c": [torch.ones(2, 2)]}
    snapshot = {"a": tree["a"].clone(), "b": (tree["b"][0].clone(),), "c": [tree["c"][0].clone()]}
    for op in ("sum", "max", "min"):
        _assert_tree_equal(td.all_reduce(tree, topo, op=op), tree)
    mean_tree = {"a": tree["a"], "c": tree["c"]}
    _assert_tree_equal(td.all_reduce(mean_tree, topo, op="mean"), mean_tree)
    _assert_tree_equal(td.gather(tree, topo), tree)
    _assert_tree_equal(td.pad_across_ranks(tree, topo), tree)
    _assert_tree_equal(td.gather_for_metrics(tree, topo), tree)
    out = td.all_reduce(tree, topo)
    assert out["a"].data_ptr() != tree["a"].data_ptr()  # a new tensor, not the input

    mixed = {"t": torch.ones(2), "name": "x", "n": 3}
    bcast = td.broadcast(mixed, topo)
    assert bcast["name"] == "x" and bcast["n"] == 3 and torch.equal(bcast["t"], mixed["t"])
    assert td.gather_object([5, 6], topo) == [5, 6]
    assert td.gather_object("obj", topo) == ["obj"]
    assert td.gather(torch.tensor(2.0), topo).tolist() == [2.0]  # 0-d: one row
    metrics = td.gather_for_metrics(torch.arange(4), topo, dataset_len=3)
    assert metrics.tolist() == [0, 1, 2]
    td.barrier(topo)
    _assert_tree_equal(tree, snapshot)
    with pytest.raises(CollectiveError, match=r"src 1 is not a rank of a group of 1"):
        td.broadcast(mixed, topo, src=1)


# --------------------------------------------------------------------------- sub-meshes


def test_axes_and_sub_meshes_in_one_world():
    """World 4, dp_shard=2 x tp=2: reductions over each axis and over a DeviceMesh directly."""

    def value(rank):
        return torch.tensor([rank + 1.0, 10.0 * (rank + 1)])

    def fn(topo):
        x = value(topo.rank)
        return {
            "world": td.all_reduce(x, topo),
            "dp_shard": td.all_reduce(x, topo, axis="dp_shard"),
            "dp": td.all_reduce(x, topo, axis="dp", op="max"),
            "tp": td.all_reduce(x, topo, axis="tp"),
            "tp_mesh": td.all_reduce(x, topo.mesh["tp"]),
            "tp_tuple": td.all_reduce(x, topo, axis=("tp",)),
            "both": td.all_reduce(x, topo, axis=("dp_shard", "tp")),
            "both_again": td.all_reduce(x, topo, axis=("dp_shard", "tp"), op="mean"),
            "gather_tp": td.gather(x[None], topo, axis="tp"),
            "gather_dp_mesh": td.gather(x[None], topo.mesh["dp_shard"]),
            "bcast_tp": td.broadcast(x, topo, axis="tp", src=1),
            "objects_dp": td.gather_object(topo.rank, topo, axis="dp_shard"),
            "topo": topo,
        }

    results = td.in_process(fn, 4, timeout=30, dp_shard=2, tp=2)
    total = sum(value(q) for q in range(4))
    for out in results:
        topo = out["topo"]
        tp, dp = topo.group_ranks("tp"), topo.group_ranks("dp_shard")
        assert len(tp) == 2 and len(dp) == 2 and set(tp) != set(dp)
        assert torch.equal(out["world"], total)
        assert torch.equal(out["dp_shard"], sum(value(q) for q in dp))
        assert torch.equal(out["dp"], torch.stack([value(q) for q in dp]).max(0).values)
        assert torch.equal(out["tp"], sum(value(q) for q in tp))
        assert not torch.equal(out["tp"], out["dp_shard"])
        assert torch.equal(out["tp_mesh"], out["tp"])
        assert torch.equal(out["tp_tuple"], out["tp"])
        assert torch.equal(out["both"], total)
        assert torch.allclose(out["both_again"], total / 4)
        assert torch.equal(out["gather_tp"], torch.stack([value(q) for q in tp]))
        assert torch.equal(out["gather_dp_mesh"], torch.stack([value(q) for q in dp]))
        assert torch.equal(out["bcast_tp"], value(tp[1]))
        assert out["objects_dp"] == list(dp)


def test_multi_dim_mesh_without_axis_raises():
    def fn(topo):
        try:
            td.all_reduce(torch.ones(1), topo.mesh["dp_shard", "tp"])
        except TopologyError as exc:
            return str(exc)
        return None

    for message in td.in_process(fn, 4, timeout=30, dp_shard=2, tp=2):
        assert message is not None and "2-D mesh" in message and "pick one axis" in message


def test_over_must_be_topology_or_mesh():
    with pytest.raises(TopologyError, match=r"cannot communicate over a str"):
        td.all_reduce(torch.ones(1), "world")
