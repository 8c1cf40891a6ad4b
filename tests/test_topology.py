"""Pure tests of `Topology`: validation, value semantics, axis arithmetic, `from_env`.

No process group is started here; every check is arithmetic on the frozen value.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import torchdist as td
from torchdist import Topology, TopologyError
from torchdist.topology import AXES

# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # axes whose product is not the world size
        (dict(world_size=4, dp_shard=2), r"multiply to 2, but world_size is 4"),
        (dict(world_size=4, dp_shard=2, tp=4), r"multiply to 8, but world_size is 4"),
        (dict(world_size=8, dp_replicate=2, dp_shard=2, tp=1), r"multiply to 4.*world_size is 8"),
        # two -1s
        (dict(world_size=8, dp_shard=-1, tp=-1), r"all -1; only one axis can fill"),
        (dict(world_size=8, pp=-1, cp=-1), r"\['pp', 'cp'\] are all -1"),
        # rank out of range, negative and >= world
        (dict(world_size=4, rank=-1), r"rank -1 is out of range for world_size 4"),
        (dict(world_size=4, rank=4), r"rank 4 is out of range for world_size 4"),
        (dict(world_size=1, rank=1), r"rank 1 is out of range for world_size 1"),
        # world size not divisible for the -1 fill (explicit or the default dp_shard fill)
        (dict(world_size=6, tp=4), r"world_size 6 is not divisible.*dp_shard=-1 cannot fill"),
        (dict(world_size=6, tp=-1, dp_replicate=4), r"not divisible.*tp=-1 cannot fill"),
        (dict(world_size=2, tp=4), r"world_size 2 is not divisible"),
        # local rank out of range
        (dict(world_size=4, rank=0, local_rank=4), r"local_rank 4 is out of range for 4"),
        (dict(world_size=4, rank=0, local_rank=-1), r"local_rank -1 is out of range"),
        (dict(world_size=4, rank=3, local_rank=2, local_world_size=2), r"local_rank 2 is out"),
        (dict(world_size=4, local_world_size=3), r"local_world_size 3 does not divide"),
        # non-int sizes
        (dict(world_size="4"), r"world_size must be an int, got '4' \(str\)"),
        (dict(world_size=4.0), r"world_size must be an int, got 4.0 \(float\)"),
        (dict(world_size=True), r"world_size must be an int"),
        (dict(world_size=2, rank=1.0), r"rank must be an int"),
        (dict(world_size=0), r"world_size must be at least 1"),
        (dict(world_size=4, tp=0), r"tp=0 is not a positive int or -1"),
        (dict(world_size=4, tp=2.0), r"tp=2.0 is not a positive int or -1"),
        (dict(world_size=4, cp=-2), r"cp=-2 is not a positive int or -1"),
        # backends
        (dict(backend="nccl"), r"backend 'nccl' needs CUDA devices.*backend='gloo'"),
        (dict(backend="tcp"), r"unknown backend 'tcp'; expected one of \['gloo', 'nccl'"),
        (dict(device="potato"), r"device 'potato' is not a torch device"),
    ],
)
def test_invalid_topology_raises_with_message(kwargs, match):
    with pytest.raises(TopologyError, match=match):
        Topology(**kwargs)


def test_topology_error_is_a_value_error():
    with pytest.raises(ValueError):
        Topology(world_size=3, tp=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_device_without_cuda_raises(device):
    with pytest.raises(TopologyError, match=r"asks for CUDA, but this machine has no usable CUDA"):
        Topology(device=device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_beyond_the_count_raises():
    count = torch.cuda.device_count()
    assert Topology(device="cuda:0").backend == "nccl"
    with pytest.raises(TopologyError, match=rf"cuda:{count} does not exist.*{count} CUDA device"):
        Topology(device=f"cuda:{count}")


def test_from_env_unknown_axis_raises():
    with pytest.raises(TopologyError, match=r"unknown mesh axis \['foo'\]; the axes are"):
        Topology.from_env(foo=2, env={})
    with pytest.raises(TopologyError, match=r"unknown mesh axis \['dp'\]"):
        Topology.from_env(dp=2, env={})


def test_unknown_axis_name_in_arithmetic_raises():
    topo = Topology(world_size=4, tp=2)
    with pytest.raises(TopologyError, match=r"unknown mesh axis 'model'"):
        topo.size("model")
    with pytest.raises(TopologyError, match=r"unknown mesh axis 'model'"):
        topo.group_ranks("model")
    with pytest.raises(TopologyError, match=r"rank 4 is out of range for world_size 4"):
        topo.coords(4)
    with pytest.raises(TopologyError, match=r"rank -1 is out of range"):
        topo.group_ranks("tp", rank=-1)


# --------------------------------------------------------------------------- value semantics


def test_equal_topologies_hash_equal_and_work_as_keys():
    a = Topology(world_size=8, rank=3, tp=2)
    b = Topology(world_size=8, rank=3, tp=2, dp_shard=4, device=torch.device("cpu"))
    c = Topology(world_size=8, rank=3, tp=2, dp_shard=-1, backend="gloo")
    assert a == b == c
    assert hash(a) == hash(b) == hash(c)
    assert len({a, b, c}) == 1
    table = {a: "plan"}
    assert table[c] == "plan"

    different = [
        Topology(world_size=8, rank=4, tp=2),
        Topology(world_size=8, rank=3, tp=4),
        Topology(world_size=8, rank=3, tp=2, dp_replicate=2),
        Topology(world_size=8, rank=3, tp=2, master_port=29501),
    ]
    assert all(d != a for d in different)
    assert len({a, *different}) == 1 + len(different)


def test_mesh_takes_no_part_in_equality_or_hash():
    # the live mesh needs a process group; equality of a live topology with its plain twin is
    # checked in a world in test_worlds.py::test_live_topology_replace_and_equality
    mesh_field = {f.name: f for f in dataclasses.fields(Topology)}["mesh"]
    assert mesh_field.compare is False
    assert mesh_field.hash in (None, False)
    assert mesh_field.repr is False
    assert mesh_field.default is None
    a = Topology(world_size=4, rank=1, tp=2)
    assert not a.is_live
    assert "mesh" not in repr(a)


def test_frozen():
    topo = Topology(world_size=4, tp=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        topo.rank = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        topo.tp = 4  # type: ignore[misc]


def test_replace_variants_revalidate():
    topo = Topology(world_size=4, rank=2)
    assert topo.dp_shard == 4  # the default fill is resolved on construction

    with pytest.raises(TopologyError, match=r"multiply to 8, but world_size is 4"):
        dataclasses.replace(topo, tp=2)

    variant = dataclasses.replace(topo, tp=2, dp_shard=-1)
    assert variant.axes == {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2}
    assert variant.rank == 2 and variant.world_size == 4
    assert topo.tp == 1  # the original is untouched

    assert dataclasses.replace(topo, rank=3).rank == 3
    with pytest.raises(TopologyError, match=r"rank 4 is out of range"):
        dataclasses.replace(topo, rank=4)
    with pytest.raises(TopologyError, match=r"backend 'nccl' needs CUDA"):
        dataclasses.replace(topo, backend="nccl")

    # the method spelling behaves the same
    assert topo.replace(tp=2, dp_shard=-1) == variant
    with pytest.raises(TopologyError):
        topo.replace(tp=2)


# --------------------------------------------------------------------------- axes and fill


@pytest.mark.parametrize("axis", AXES)
def test_minus_one_fills_each_axis(axis):
    fixed = {"tp": 2} if axis != "tp" else {"dp_replicate": 2}
    topo = Topology(world_size=8, **fixed, **{axis: -1})
    assert getattr(topo, axis) == 4
    assert topo.axes[axis] == 4
    # the default dp_shard fill is off when another axis fills
    if axis != "dp_shard":
        assert topo.dp_shard == 1
    assert list(topo.axes) == list(AXES)
    assert topo.mesh_shape == tuple(topo.axes[a] for a in AXES)
    assert torch.Size(topo.mesh_shape).numel() == 8


def test_default_dp_shard_fill_and_size_one_axes_kept():
    topo = Topology(world_size=8, tp=2)
    assert topo.axes == {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2}
    assert topo.dp_size == 4
    assert topo.size("dp") == 4
    assert topo.size(("dp_shard", "tp")) == 8

    single = Topology(world_size=1)
    assert single.axes == {name: 1 for name in AXES}
    assert single.mesh_shape == (1, 1, 1, 1, 1)

    # explicit dp_shard with no -1 anywhere: no fill
    assert Topology(world_size=6, dp_shard=3, tp=2).axes["dp_shard"] == 3


def test_docstring_example():
    topo = Topology(world_size=8, rank=5, tp=2, dp_replicate=2)
    assert topo.axes == {"pp": 1, "dp_replicate": 2, "dp_shard": 2, "cp": 1, "tp": 2}
    assert topo.coords() == {"pp": 0, "dp_replicate": 1, "dp_shard": 0, "cp": 0, "tp": 1}
    assert topo.group_ranks("tp") == (4, 5)


# --------------------------------------------------------------------------- coordinates


def _expected_group(mesh: torch.Tensor, coords: tuple[int, ...], names: tuple[str, ...]):
    """Ranks sharing every coordinate outside ``names``, in row-major mesh order."""
    index = tuple(slice(None) if AXES[i] in names else c for i, c in enumerate(coords))
    return tuple(mesh[index].flatten().tolist())


@pytest.mark.parametrize(
    "axes",
    [
        dict(dp_replicate=2, dp_shard=2, tp=2),
        dict(pp=2, dp_shard=2, cp=2),
        dict(dp_replicate=2, cp=2, tp=2),
    ],
)
def test_coordinates_and_groups_of_every_rank_2x2x2(axes):
    topos = [Topology(world_size=8, rank=r, **axes) for r in range(8)]
    shape = topos[0].mesh_shape
    mesh = torch.arange(8).reshape(shape)
    group_axes = {
        "tp": ("tp",),
        "cp": ("cp",),
        "pp": ("pp",),
        "dp_shard": ("dp_shard",),
        "dp_replicate": ("dp_replicate",),
        "dp": ("dp_replicate", "dp_shard"),
    }
    for r, topo in enumerate(topos):
        (found,) = (mesh == r).nonzero().tolist()
        expected_coords = dict(zip(AXES, found, strict=True))
        assert topo.coords() == expected_coords
        assert topos[0].coords(r) == expected_coords  # the same from any rank's view
        for axis, names in group_axes.items():
            group = _expected_group(mesh, tuple(found), names)
            assert topo.group_ranks(axis) == group, (r, axis)
            assert topos[0].group_ranks(axis, rank=r) == group
            assert topo.index(axis) == group.index(r)
            assert len(group) == topo.size(axis)
        assert topo.dp_rank() == _expected_group(mesh, tuple(found), group_axes["dp"]).index(r)

    for axis, names in group_axes.items():
        groups = sorted(
            {
                _expected_group(mesh, tuple((mesh == r).nonzero()[0].tolist()), names)
                for r in range(8)
            }
        )
        assert topos[0].all_groups(axis) == tuple(groups)
        # every rank in exactly one group
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(8))


def test_groups_of_dp_replicate_dp_shard_tp_explicitly():
    topo = Topology(world_size=8, rank=5, dp_replicate=2, dp_shard=2, tp=2)
    # rank 5 = (dp_replicate=1, dp_shard=0, tp=1)
    assert topo.coords()["dp_replicate"] == 1
    assert topo.group_ranks("tp") == (4, 5)
    assert topo.group_ranks("dp_shard") == (5, 7)
    assert topo.group_ranks("dp_replicate") == (1, 5)
    assert topo.group_ranks("dp") == (1, 3, 5, 7)
    assert topo.dp_rank() == 2
    assert topo.index("dp_shard") == 0
    assert topo.all_groups("tp") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert topo.all_groups("dp") == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert topo.all_groups(("dp_shard", "tp")) == ((0, 1, 2, 3), (4, 5, 6, 7))


# --------------------------------------------------------------------------- from_env


def test_from_env_without_variables_is_single_process():
    topo = Topology.from_env(env={})
    expected_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert topo == Topology.single(device=expected_device)
    assert (topo.world_size, topo.rank, topo.local_rank, topo.local_world_size) == (1, 0, 0, 1)
    assert topo.device == torch.device(expected_device)
    assert not topo.is_live
    assert not topo.agent_store


def test_single():
    topo = Topology.single()
    assert topo.world_size == 1 and topo.rank == 0 and topo.local_rank == 0
    assert topo.device == torch.device("cpu")
    assert topo.backend == "gloo"
    assert topo.axes == {name: 1 for name in AXES}
    assert not topo.is_live
    assert topo.group_ranks("dp") == (0,)


def test_from_env_torchrun():
    env = {
        "WORLD_SIZE": "8",
        "RANK": "5",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "12345",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    topo = Topology.from_env(env=env, device="cpu", tp=2)
    assert (topo.world_size, topo.rank, topo.local_rank, topo.local_world_size) == (8, 5, 1, 4)
    assert topo.master_addr == "10.1.2.3"
    assert topo.master_port == 12345
    assert topo.agent_store is True
    assert topo.axes["tp"] == 2 and topo.axes["dp_shard"] == 4
    assert topo.backend == "gloo"

    env["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    assert Topology.from_env(env=env, device="cpu").agent_store is False
    del env["TORCHELASTIC_USE_AGENT_STORE"], env["MASTER_ADDR"], env["MASTER_PORT"]
    plain = Topology.from_env(env=env, device="cpu")
    assert (plain.master_addr, plain.master_port, plain.agent_store) == ("127.0.0.1", 29500, False)


def test_from_env_torchrun_without_local_variables():
    topo = Topology.from_env(env={"WORLD_SIZE": "2", "RANK": "1"}, device="cpu")
    assert (topo.world_size, topo.rank, topo.local_rank, topo.local_world_size) == (2, 1, 1, 2)


def test_from_env_open_mpi():
    env = {
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    topo = Topology.from_env(env=env, device="cpu")
    assert (topo.world_size, topo.rank, topo.local_rank, topo.local_world_size) == (4, 3, 1, 2)
    assert topo.dp_shard == 4


def test_from_env_mpich():
    topo = Topology.from_env(env={"PMI_SIZE": "4", "PMI_RANK": "2"}, device="cpu", tp=2)
    assert (topo.world_size, topo.rank, topo.local_rank, topo.local_world_size) == (4, 2, 2, 4)
    assert topo.coords() == {"pp": 0, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 0}
    with_local = Topology.from_env(
        env={"PMI_SIZE": "4", "PMI_RANK": "3", "MPI_LOCALNRANKS": "2"}, device="cpu"
    )
    assert (with_local.local_rank, with_local.local_world_size) == (1, 2)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "1"}, r"RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, r"WORLD_SIZE is set but RANK is not"),
        ({"OMPI_COMM_WORLD_RANK": "0"}, r"OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE"),
        ({"PMI_SIZE": "4"}, r"PMI_SIZE is set but PMI_RANK is not"),
    ],
)
def test_from_env_half_set_launcher_raises(env, match):
    with pytest.raises(TopologyError, match=match):
        Topology.from_env(env=env, device="cpu")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, r"WORLD_SIZE='two' is not a non-negative integer"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK='-1' is not a non-negative integer"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1.5"}, r"LOCAL_RANK='1.5'"),
        ({"WORLD_SIZE": "", "RANK": "0"}, r"WORLD_SIZE='' is not a non-negative integer"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "http"}, r"MASTER_PORT='http'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"rank 2 is out of range for world_size 2"),
        ({"PMI_SIZE": "4", "PMI_RANK": "x"}, r"PMI_RANK='x'"),
    ],
)
def test_from_env_bad_values_raise(env, match):
    with pytest.raises(TopologyError, match=match):
        Topology.from_env(env=env, device="cpu")


@pytest.mark.parametrize("value", ["²", "1²"])
@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "MASTER_PORT"])
def test_from_env_unicode_digit_strings_raise_topology_error(name, value):
    # str.isdigit() accepts "²", which int() rejects: the error must still be ours, naming the
    # variable (regression: a bare ValueError from int() escaped).
    env = {"WORLD_SIZE": "2", "RANK": "0", name: value}
    with pytest.raises(TopologyError, match=name):
        Topology.from_env(env=env, device="cpu")


def test_from_env_reads_nothing_but_the_given_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")
    assert Topology.from_env(env={}).world_size == 1
    live_env = Topology.from_env(device="cpu")  # env=None: os.environ
    assert (live_env.world_size, live_env.rank) == (8, 3)


def test_public_names():
    assert td.Topology is Topology
    assert issubclass(td.TopologyError, td.TorchdistError)
