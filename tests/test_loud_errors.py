"""Inputs that once gave silent wrong results now raise our own errors (issue 15, "Silent today").

Launcher environments are explicit dicts (``Topology.from_env(env=...)``); cross-rank checks run
in threaded gloo worlds (``td.in_process``).
"""

from __future__ import annotations

import math

import pytest
import torch

import torchdist as td
from torchdist.errors import CheckpointError, CollectiveError, ConfigError, StepError, TopologyError

# --------------------------------------------------------------------------- launchers
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}  # fmt: skip
SRUN = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_ID": "0"}  # fmt: skip
MV2 = {"MV2_COMM_WORLD_SIZE": "6", "MV2_COMM_WORLD_RANK": "4",
       "MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_LOCAL_SIZE": "3"}  # fmt: skip
TORCHRUN_AGENT = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                  "TORCHELASTIC_RUN_ID": "abc", "GROUP_RANK": "1"}  # fmt: skip


def where(env):
    t = td.Topology.from_env(env=env, device="cpu")
    return t.world_size, t.rank, t.local_rank, t.local_world_size


@pytest.mark.parametrize(
    "env, expected",
    [
        (OMPI, (4, 3, 1, 2)),
        (SRUN, (8, 5, 1, 4)),
        (MV2, (6, 4, 1, 3)),
        ({**SRUN, "SLURM_TASKS_PER_NODE": "2(x2),4", "SLURM_NODEID": "0"}, (8, 5, 1, 2)),
        # mpirun inside an allocation: MPI is the inner launcher, SLURM's values describe orted
        ({**SRUN, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", **OMPI}, (4, 3, 1, 2)),
        # torchrun per node under srun: the agent's values win
        ({**SRUN, **TORCHRUN_AGENT}, (4, 2, 0, 2)),
        # a wrapper that copies the MPI values into WORLD_SIZE/RANK: they agree, accepted
        ({**OMPI, "WORLD_SIZE": "4", "RANK": "3"}, (4, 3, 3, 4)),
        # an sbatch script's own shell: SLURM_PROCID=0 but no job step -> one process
        ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, (1, 0, 0, 1)),
        ({"PMI_SIZE": "2", "PMI_RANK": "1"}, (2, 1, 1, 2)),
        ({}, (1, 0, 0, 1)),
    ],
)
def test_launcher_environments_are_read(env, expected):
    assert where(env) == expected


@pytest.mark.parametrize("launcher", [OMPI, SRUN, MV2])
def test_stale_world_size_against_a_launcher_is_refused(launcher):
    with pytest.raises(TopologyError, match=r"WORLD_SIZE=1 RANK=0 but .*unset WORLD_SIZE"):
        where({"WORLD_SIZE": "1", "RANK": "0", **launcher})


def test_pmix_only_and_conflicting_mpi_are_refused():
    with pytest.raises(TopologyError, match=r"PMIX_RANK=2 is set but no launcher variable gives"):
        where({"PMIX_RANK": "2", "PMIX_NAMESPACE": "job.0"})
    with pytest.raises(TopologyError, match=r"MPI launchers disagree"):
        where({**OMPI, "PMI_SIZE": "2", "PMI_RANK": "0"})
    with pytest.raises(TopologyError, match=r"SLURM_PROCID='x' is not a non-negative integer"):
        where({**SRUN, "SLURM_PROCID": "x"})
    with pytest.raises(TopologyError, match=r"local_world_size 5 does not divide world_size 8"):
        where({**SRUN, "SLURM_TASKS_PER_NODE": "3,5", "SLURM_NODEID": "1"})


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("scale", [math.inf, 0.0, -1.0, math.nan])
def test_loss_scale_init_must_be_finite_and_positive(scale):
    with pytest.raises(ConfigError, match=r"init_scale=.*finite number > 0"):
        td.LossScale.initial("cpu", init_scale=scale)


@pytest.mark.parametrize("max_norm", [math.nan, math.inf, 0.0, -1.0, "1"])
def test_clip_grads_max_norm_must_be_finite_and_positive(max_norm):
    from torchdist.transforms import clip_grads

    with pytest.raises(StepError, match=r"max_norm.*finite number > 0"):
        clip_grads(max_norm)


# --------------------------------------------------------------------------- collectives
def _mismatch(kind):
    def fn(topo):
        r = topo.rank
        if kind == "keys":
            return td.all_reduce({"loss": torch.ones(())} if r == 0 else {"acc": torch.ones(())},
                                 topo)  # fmt: skip
        if kind == "shape":
            return td.all_reduce({"loss": torch.ones(2 + r)}, topo)
        if kind == "structure":
            return td.all_reduce([torch.ones(1)] if r == 0 else (torch.ones(1),), topo)
        if kind == "broadcast":
            return td.broadcast({"a": torch.ones(1)} if r == 0 else {"b": torch.ones(1)}, topo)
        if kind == "pad_ndim":
            return td.pad_across_ranks(torch.ones(2) if r == 0 else torch.ones(2, 2), topo)
        if kind == "pad_dim":
            return td.pad_across_ranks(torch.ones(2, 3), topo, dim=2)
        raise AssertionError(kind)

    return fn


@pytest.mark.parametrize(
    "kind, message",
    [
        ("keys", r"all_reduce: leaf '(loss|acc)' differs across ranks in keys "
                 r"\(rank 0: .*, rank 1: .*\)"),
        ("shape", r"all_reduce: leaf 'loss' differs .*in shape \(rank 0: float32\(2,\), "
                  r"rank 1: float32\(3,\)\)"),
        ("structure", r"all_reduce: the pytree structure differs"),
        ("broadcast", r"broadcast: leaf '(a|b)' differs"),
        ("pad_ndim", r"pad_across_ranks: leaf '<root>' differs .*rank 0: float32\(2,\), "
                     r"rank 1: float32\(2, 2\)"),
        ("pad_dim", r"pad_across_ranks\(dim=2\): the leaf at <root> has shape \(2, 3\), which "
                    r"has no dim 2"),
    ],
)  # fmt: skip
def test_pytree_collectives_check_structure_and_shapes_across_ranks(kind, message):
    with pytest.raises(CollectiveError, match=message):
        td.in_process(_mismatch(kind), 2, timeout=30)


def test_the_check_is_off_on_request_and_agreeing_trees_pass():
    def fn(topo):
        tree = {"loss": torch.full((), float(topo.rank)), "n": torch.ones(3)}
        checked = td.all_reduce(tree, topo, check=True)
        unchecked = td.all_reduce(tree, topo, check=False)
        return float(checked["loss"]), float(unchecked["loss"])

    assert td.in_process(fn, 2, timeout=30) == [(1.0, 1.0), (1.0, 1.0)]


def test_pad_across_ranks_rejects_a_bad_dim_on_one_process():
    with pytest.raises(CollectiveError, match=r"no dim -3 \(valid: -2..1\)"):
        td.pad_across_ranks({"x": torch.ones(2, 2)}, td.Topology.single(), dim=-3)


# --------------------------------------------------------------------------- data
def test_empty_dataset_and_epochs_with_no_batch_are_refused():
    topo = td.Topology.single()
    with pytest.raises(ConfigError, match=r"empty dataset"):
        td.data.shard_loader([], topo, batch_size=2)
    with pytest.raises(ConfigError, match=r"drop_last=True.*3 samples, fewer than one global"):
        td.data.shard_loader(list(range(3)), topo, batch_size=4, drop_last=True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epoch": -1}, r"epoch=-1 is negative"),
        ({"cursor": "4"}, r"cursor='4' is a str, expected an int"),
        ({"cursor": 2.0}, r"cursor=2.0 is a float"),
        ({"epoch": True}, r"epoch=True is a bool"),
        ({"shuffle": 1}, r"shuffle=1 is a int, expected a bool"),
    ],
)
def test_invalid_loader_state_is_refused_before_use(change, message):
    loader = td.data.shard_loader(list(range(10)), td.Topology.single(), batch_size=2)
    state = {**loader.state_dict(), **change}
    with pytest.raises(CheckpointError, match=message):
        loader.load_state_dict(state)
    assert (loader.epoch, loader.state_dict()["cursor"]) == (0, 0)  # untouched


# --------------------------------------------------------------------------- low-bit AdamW
def test_low_bit_adamw_refuses_a_block_size_that_fits_no_tensor():
    pytest.importorskip("torchao")
    from torchdist.precision import low_bit_adamw

    big = torch.nn.Linear(64, 64, bias=False)  # 4096 elements
    with pytest.raises(td.CompositionError, match=r"block_size=300 divides the size of no param"):
        low_bit_adamw(big.parameters(), block_size=300)
    with pytest.raises(td.CompositionError, match=r"no parameter has 4096 or more elements"):
        low_bit_adamw(torch.nn.Linear(4, 4).parameters())
    with pytest.raises(td.CompositionError, match=r"block_size must be a positive int"):
        low_bit_adamw(big.parameters(), block_size=0)
    low_bit_adamw(big.parameters(), block_size=512)  # divides 4096: fine
