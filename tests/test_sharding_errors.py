"""The sharding transforms' bad inputs, and what a transformed model looks like.

Every bad input raises torchdist's own error type (``ShardingError``, ``CompositionError``,
``TopologyError``) with a message that names the fix (TESTING.md). Checks that need a process
group share a few in-process worlds; those that do not run without one.

Structure: ``shard`` leaves each rank ``1/N`` of every parameter (dim 0, in ``torch.chunk``
pieces: ceil-sized, the last ones shorter or empty), and no model transform renames a parameter.
``checkpoint_activations`` (one process) gives the same loss and gradients and really recomputes:
ops are counted in the backward with a ``TorchDispatchMode``.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _sharding_models import PLAN, Block, Model
from torch.utils._python_dispatch import TorchDispatchMode

import torchdist as td
from torchdist.errors import CompositionError, ShardingError, TopologyError
from torchdist.sharding import is_sharded, materialize, parallelize, replicate, shard
from torchdist.transforms import checkpoint_activations

ORDER = "The order that works"


with torch.random.fork_rng():
    torch.manual_seed(0)
    MODEL0 = Model()
NAMES = [n for n, _ in MODEL0.named_parameters()]
KEYS = list(MODEL0.state_dict())


def fresh() -> Model:
    return copy.deepcopy(MODEL0)


def raises(kind, *fragments):
    """``pytest.raises(kind)`` that also checks the message names each fragment (the fix)."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(kind)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.ctx.__exit__(*exc)
            if suppressed:
                message = str(self.info.value)
                for fragment in fragments:
                    assert fragment in message, f"{fragment!r} not in: {message}"
            return suppressed

    return _Check()


# --------------------------------------------------------------------------- no process group
def test_checkpoint_activations_bad_inputs_and_names():
    with raises(ShardingError, "unknown policy", "'full' or 'selective'"):
        checkpoint_activations(fresh(), policy="everything")
    once = checkpoint_activations(fresh(), policy="selective")
    assert [n for n, _ in once.named_parameters()] == NAMES and list(once.state_dict()) == KEYS
    with raises(CompositionError, "already checkpointed", ORDER):
        checkpoint_activations(once)
    with raises(ShardingError, "no parameters"):
        checkpoint_activations(nn.Sequential(nn.ReLU(), nn.ReLU()))
    with raises(ShardingError, "found no repeated blocks", "blocks="):
        checkpoint_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with raises(ShardingError, "matched no submodule", "blocks=None"):
        checkpoint_activations(fresh(), blocks=lambda name, module: False)
    with raises(ShardingError, "matched no submodule"):
        checkpoint_activations(fresh(), blocks=[nn.Conv2d])
    with raises(ShardingError, "list of module types"):
        checkpoint_activations(fresh(), blocks=["Block"])
    checkpoint_activations(fresh(), blocks=[Block])  # a list of types is a valid spec


def test_materialize_needs_exactly_one_source():
    with raises(ShardingError, "exactly one of init= or full_state_dict="):
        materialize(fresh(), "cpu")
    with raises(ShardingError, "exactly one of init= or full_state_dict="):
        materialize(fresh(), "cpu", init=lambda m: None, full_state_dict=MODEL0.state_dict())


@pytest.mark.parametrize("transform", ["shard", "replicate", "parallelize"])
def test_transforms_need_a_live_topology_or_a_mesh(transform):
    apply = {
        "shard": lambda m, over: shard(m, over),
        "replicate": lambda m, over: replicate(m, over),
        "parallelize": lambda m, over: parallelize(m, over, PLAN),
    }[transform]
    for not_live in (td.Topology.single(), td.Topology(world_size=4, rank=1, tp=2)):
        with raises(TopologyError, "needs a live topology", "td.distributed(topo)"):
            apply(fresh(), not_live)
    with raises(TopologyError, "a live Topology or a DeviceMesh", "str"):
        apply(fresh(), "dp_shard")
    with raises(ShardingError, "has no parameters"):
        apply(nn.ReLU(), td.Topology.single())


def test_parallelize_plan_is_checked_against_the_model():
    topo = td.Topology.single()  # the plan is checked before any mesh is needed
    with raises(ShardingError, "'nonexistent.*' matches no module", "named_modules()"):
        parallelize(fresh(), topo, {"nonexistent.*": "colwise"})
    with raises(ShardingError, "'layers.*.up' matches no module", "'blocks.0.up'"):
        parallelize(fresh(), topo, {"layers.*.up": "colwise"})  # names the modules it meant
    with raises(ShardingError, "plan is empty"):
        parallelize(fresh(), topo, {})


# --------------------------------------------------------------------------- live worlds
def test_shard_and_parallelize_bad_inputs_in_a_live_world():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    def rank(topo):
        sharded = shard(fresh(), topo)
        assert is_sharded(sharded) and not is_sharded(fresh())
        with raises(CompositionError, "already sharded", ORDER):
            shard(sharded, topo)
        with raises(CompositionError, "apply shard or replicate, not both", ORDER):
            replicate(sharded, topo)
        with raises(CompositionError, "tensor parallelism must be applied before FSDP", ORDER):
            parallelize(sharded, topo, PLAN)
        with raises(ShardingError, "already an FSDPModule", "unsharded model"):
            shard(fully_shard(fresh(), mesh=topo.mesh["dp_shard"]), topo)
        for apply in (shard, replicate, lambda m, t: parallelize(m, t, PLAN)):
            with raises(ShardingError, "ReLU has no parameters"):
                apply(nn.ReLU(), topo)
        with raises(ShardingError, "the blocks predicate matched no submodule", "blocks=None"):
            shard(fresh(), topo, blocks=lambda name, module: False)
        with raises(ShardingError, "blocks=['Conv2d'] matched no submodule", "children"):
            shard(fresh(), topo, blocks=[nn.Conv2d])
        with raises(ShardingError, "list of module types"):
            shard(fresh(), topo, blocks=["Block"])
        by_types = shard(fresh(), topo, blocks=[Block])
        assert all(isinstance(b, FSDPModule) for b in by_types.blocks)
        by_name = shard(fresh(), topo, blocks=lambda name, module: name == "out")
        assert isinstance(by_name.out, FSDPModule) and not isinstance(by_name.blocks[0], FSDPModule)
        with raises(ShardingError, "unknown style 'diagonal'", "'colwise'", "ParallelStyle"):
            parallelize(fresh(), topo, {"blocks.*.up": "diagonal"})
        with raises(ShardingError, "'nonexistent.*' matches no module"):
            parallelize(fresh(), topo, {"nonexistent.*": "colwise"})
        with raises(ShardingError, "replicate needs a 1-D mesh", "one axis of the mesh"):
            replicate(fresh(), topo.mesh[("dp_replicate", "dp_shard")])
        return True

    assert td.in_process(rank, 2) == [True, True]


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _loss_grads_and_backward_ops(model, x, y):
    saved = [0]

    def pack(t):
        saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.mse_loss(model(x), y)
    with _OpCount() as ops:
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ops.ops, saved[0]


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpoint_activations_same_loss_and_gradients(policy):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 5, generator=gen)
    loss0, grads0, ops0, saved0 = _loss_grads_and_backward_ops(fresh(), x, y)
    model = checkpoint_activations(fresh(), policy=policy)
    loss, grads, ops, saved = _loss_grads_and_backward_ops(model, x, y)
    torch.testing.assert_close(loss, loss0, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads, grads0, rtol=0, atol=1e-6)
    # It really recomputes: the backward re-runs the blocks' gelu (a plain backward never runs
    # it) and fewer activations are stored outside the checkpointed blocks ...
    assert ops0["gelu"] == 0 and ops["gelu"] == 2
    assert saved < saved0
    # ... and "selective" keeps the matmul outputs, so only the cheap ops are recomputed.
    assert ops0["addmm"] == 0
    assert (ops["addmm"] > 0) if policy == "full" else (ops["addmm"] == 0)


def test_blocks_given_as_one_type_is_accepted_or_refused_clearly():
    """``blocks=Block`` (a type, not a list of types): used as ``[Block]``, or a ShardingError
    that names the fix; never a bare TypeError."""
    try:
        model = checkpoint_activations(fresh(), blocks=Block)
    except ShardingError as exc:
        assert "list of module types" in str(exc)
    else:
        assert "checkpoint_activations" in td.marks.applied(model)

    def rank(topo):
        try:
            model = shard(fresh(), topo, blocks=Block)
        except ShardingError as exc:
            return str(exc)
        return all(hasattr(b, "unshard") for b in model.blocks)

    for result in td.in_process(rank, 2):
        assert result is True or "list of module types" in result


def test_meshes_of_the_wrong_rank_raise_our_error():
    def rank(topo):
        with raises(ShardingError, "1-D"):
            parallelize(fresh(), topo.mesh[("dp_shard", "tp")], PLAN)
        with raises(ShardingError, "2-D"):
            shard(fresh(), topo.mesh[("dp_replicate", "dp_shard", "tp")])
        return True

    td.in_process(rank, 4, dp_shard=2, tp=2)


def test_shard_with_offload_works_on_a_cpu_only_machine():
    """``offload=True`` keeps state on the CPU; on a machine that is only CPU it must not fail."""
    x = torch.randn(4, 8)

    def rank(topo):
        outs = []
        for offload in (False, True):
            model = shard(fresh(), topo, offload=offload)
            model(x).square().mean().backward()
            outs.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
        return outs

    for plain, offloaded in td.in_process(rank, 2):
        for name in NAMES:
            torch.testing.assert_close(offloaded[name], plain[name])


def test_replicate_bad_inputs_and_names_in_a_live_world():
    def rank(topo):
        replicated = replicate(fresh(), topo)
        names = [n for n, _ in replicated.named_parameters()]
        keys = list(replicated.state_dict())
        with raises(CompositionError, "cannot also be sharded", ORDER):
            shard(replicated, topo)
        with raises(CompositionError, "already replicated", ORDER):
            replicate(replicated, topo)
        with raises(CompositionError, "tensor parallelism must be applied before replicate"):
            parallelize(replicated, topo, PLAN)
        both = replicate(checkpoint_activations(fresh()), topo)
        both(torch.randn(2, 8)).sum().backward()  # runs, names unchanged
        return names, keys, [n for n, _ in both.named_parameters()]

    for names, keys, both in td.in_process(rank, 2, dp_replicate=2):
        assert names == both == NAMES and keys == KEYS


@pytest.mark.multiprocess
def test_replicate_trains_under_detail_debug_in_real_processes():
    """torch 2.13's DDP crashes (SIGSEGV) on a group made under TORCH_DISTRIBUTED_DEBUG=DETAIL;
    ``replicate`` must work around it in real processes too (td.spawn defaults to DETAIL), train
    like one process on the global batch, and leave the debug level as it found it."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 8, generator=gen), torch.randn(8, 5, generator=gen)) for _ in range(3)
    ]

    def rank(topo):
        # A forked child whose parent already ran intra-op parallel work (pytest has) hangs in
        # its first parallel op unless it stays on one thread: see test_spawn_after_...
        torch.set_num_threads(1)
        model = replicate(fresh(), topo)
        level = str(dist.get_debug_level())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in batches:
            x, y = td.split_between_ranks(x, topo), td.split_between_ranks(y, topo)
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return level, {n: p.detach() for n, p in model.named_parameters()}

    reference = fresh()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in batches:
        F.mse_loss(reference(x), y).backward()
        opt.step()
        opt.zero_grad()
    for level, params in td.spawn(rank, 2, timeout=120, dp_replicate=2):
        assert level == "DebugLevel.DETAIL"
        for name, param in reference.named_parameters():
            torch.testing.assert_close(params[name], param.detach(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize(
    "world, axes",
    [(2, {}), (4, {}), (4, dict(dp_replicate=2, dp_shard=2))],
    ids=["2", "4", "hsdp-2x2"],
)
def test_each_rank_holds_its_dim0_chunk_of_every_parameter(world, axes):
    from torch.distributed.tensor import Replicate, Shard

    def rank(topo):
        model = shard(fresh(), topo)
        return topo.index("dp_shard"), {
            n: (p.placements, p.to_local().clone(), tuple(p.shape))
            for n, p in model.named_parameters()
        }

    n_shard = axes.get("dp_shard", world)
    hsdp = "dp_replicate" in axes
    results = td.in_process(rank, world, **axes)
    for name, full in MODEL0.named_parameters():
        locals_ = {}
        for index, params in results:
            placements, local, shape = params[name]
            assert shape == tuple(full.shape)  # the DTensor still has the full shape
            assert placements == ((Replicate(), Shard(0)) if hsdp else (Shard(0),))
            chunks = torch.chunk(full.detach(), n_shard, dim=0)
            want = chunks[index] if index < len(chunks) else full[:0]
            assert local.shape[0] == want.shape[0] <= -(-full.shape[0] // n_shard)  # ceil(n/N)
            assert torch.equal(local, want)
            locals_[index] = local
        assert sum(t.numel() for t in locals_.values()) == full.numel()  # 1/N each, all covered
    # The head's 5 rows: 3+2 on 2 ranks, 2+2+1+0 on 4 ranks.
    rows = {index: params["out.weight"][1].shape[0] for index, params in results}
    assert [rows[i] for i in range(n_shard)] == {2: [3, 2], 4: [2, 2, 1, 0]}[n_shard]


def test_no_model_transform_renames_a_parameter():
    from torch.distributed.tensor import Shard

    def rank(topo):
        out = {
            "shard": shard(fresh(), topo),
            "parallelize": parallelize(fresh(), topo, PLAN),
            "checkpoint_activations": checkpoint_activations(fresh()),
            "parallelize+checkpoint_activations+shard": shard(
                checkpoint_activations(parallelize(fresh(), topo, PLAN), policy="selective"), topo
            ),
        }
        tp = out["parallelize"]
        layout = (tp.blocks[0].up.weight.placements, tp.blocks[0].down.weight.placements)
        return layout, {
            k: ([n for n, _ in m.named_parameters()], list(m.state_dict())) for k, m in out.items()
        }

    for layout, names in td.in_process(rank, 4, dp_shard=2, tp=2):
        assert layout == ((Shard(0),), (Shard(1),))  # colwise splits rows, rowwise columns
        for transform, (params, keys) in names.items():
            assert params == NAMES, transform
            assert keys == KEYS, transform


@pytest.mark.multiprocess
def test_spawn_after_the_parent_used_intra_op_threads():
    """td.spawn forks by default; a child forked after the parent ran an OpenMP-parallel op (any
    sizeable matmul, so: any test process) must still be able to run one."""
    big = torch.randn(512, 512)
    (big @ big).sum()  # starts the parent's intra-op thread pool (when it has >1 thread)

    def rank(topo):
        a = torch.randn(256, 256)
        return bool(torch.isfinite(a @ a).all())

    assert td.spawn(rank, 2, timeout=60) == [True, True]
